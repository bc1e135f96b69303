"""The user's path: a VisionTrim folder loaded by Auto classes with `trust_remote_code=True`, generate, pipeline."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from visiontrim.architectures import FAMILY_BUILDERS, architecture_named

from helpers import NON_DEFAULT_SETTINGS, QUESTION_PROMPT, load_remote, save_checkpoint, working_directory


# The remote code a folder ships: the family-agnostic core, then each family's own files, nothing of another family.
CORE_FILES = {
    "compression_visiontrim.py",
    "configuration_visiontrim.py",
    "modeling_visiontrim_utils.py",
    "processing_visiontrim.py",
}
LLAVA_FILES = CORE_FILES | {
    "configuration_visiontrim_llava.py",
    "llm_stage_visiontrim.py",
    "modeling_visiontrim_llava.py",
    "processing_visiontrim_llava.py",
}
# The Qwen families share the M-RoPE core and the Pillow video processors.
QWEN_CORE_FILES = CORE_FILES | {"mrope_visiontrim.py", "video_processing_visiontrim.py"}
QWEN_FILES = QWEN_CORE_FILES | {
    "configuration_visiontrim_qwen2_vl.py",
    "modeling_visiontrim_qwen2_vl.py",
    "processing_visiontrim_qwen2_vl.py",
}
QWEN3_FILES = QWEN_CORE_FILES | {
    "configuration_visiontrim_qwen3_vl.py",
    "modeling_visiontrim_qwen3_vl.py",
    "processing_visiontrim_qwen3_vl.py",
}
ONEVISION_FILES = CORE_FILES | {
    "configuration_visiontrim_llava_onevision.py",
    "modeling_visiontrim_llava_onevision.py",
    "processing_visiontrim_llava_onevision.py",
    "video_processing_visiontrim.py",
}
SHIPPED_FILES = {
    "llava": LLAVA_FILES,
    "llava-next": LLAVA_FILES,
    "video-llava": LLAVA_FILES | {"video_processing_visiontrim.py"},
    "llava-next-video": LLAVA_FILES | {"video_processing_visiontrim.py"},
    "llava-onevision": ONEVISION_FILES,
    "qwen2.5-vl": QWEN_FILES,
    "qwen2-vl": QWEN_FILES,
    "qwen3-vl": QWEN3_FILES,
    "qwen3-vl-moe": QWEN3_FILES,
}
REMOTE_CODE_FILES = tuple(sorted(LLAVA_FILES))


def test_checkpoint_folder_is_a_hub_repository(checkpoint):
    for name in REMOTE_CODE_FILES + (
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (checkpoint / name).is_file(), name
    assert (checkpoint / "guidance_tokenizer" / "tokenizer.json").is_file()
    assert not list(checkpoint.glob("*.bin"))  # safetensors only, never pickle
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_visiontrim_llava.VisionTrimLlavaConfig",
        "AutoModelForImageTextToText": "modeling_visiontrim_llava.VisionTrimLlavaForConditionalGeneration",
    }
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_visiontrim_llava.VisionTrimProcessor"}
    assert processor_config["reduction_ratio"] == config["reduction_ratio"]
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert {"model.logit_scale", "model.visual_projection.weight"} <= names


def test_the_readme_snippet(checkpoint, photos, tmp_path):
    with working_directory(tmp_path):
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
        out = model.generate(
            **processor(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt"), max_new_tokens=8
        )
    assert type(model).__name__ == "VisionTrimLlavaForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules.")
    prompt_length = len(processor(images=photos[0], text=QUESTION_PROMPT)["input_ids"][0])
    assert prompt_length == len(processor.tokenizer(QUESTION_PROMPT)["input_ids"]) - 1 + 64
    assert out.shape == (1, prompt_length + 8)


def test_save_and_reload_keep_every_setting_and_weight(tmp_path, photos):
    model, processor = load_remote(
        save_checkpoint(tmp_path / "first", seed=3, visual_tokens=128, **NON_DEFAULT_SETTINGS)
    )
    model.save_pretrained(tmp_path / "second")
    processor.save_pretrained(tmp_path / "second")
    for name in REMOTE_CODE_FILES:
        assert (tmp_path / "second" / name).read_text() == (tmp_path / "first" / name).read_text()
    again, processor_again = load_remote(tmp_path / "second")
    for field in ("reduction_ratio", *NON_DEFAULT_SETTINGS):
        assert getattr(again.config, field) == getattr(model.config, field), field
    assert (again.config.visual_tokens, again.config.dominant_tokens, again.config.complement_tokens) == (128, 64, 64)
    assert processor_again.visual_tokens == 128
    weights = again.state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(weights[name], weight), name
    inputs = processor_again(images=photos[0], text=QUESTION_PROMPT, return_tensors="pt")
    torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_budget_override_at_load_keeps_processor_and_model_in_step(checkpoint, photos):
    model, processor = load_remote(checkpoint, visual_tokens=192)
    inputs = processor(images=photos[1], text=QUESTION_PROMPT, return_tensors="pt")
    output = model(**inputs)
    assert output.image_outputs.pooler_output[0].shape[0] == 192 == processor.visual_tokens


def test_pipeline_with_chat_and_plain_prompts(checkpoint, photos, tmp_path):
    with working_directory(tmp_path):
        pipe = pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True)
    assert type(pipe.model).__name__ == "VisionTrimLlavaForConditionalGeneration"
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": photos[0]}, {"type": "text", "text": "What animal is this?"}],
        }
    ]
    chat = pipe(text=messages, max_new_tokens=4, do_sample=False)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(chat[0]["generated_text"][-1]["content"], str)
    plain = pipe(images=photos[1], text=QUESTION_PROMPT, max_new_tokens=4, do_sample=False, return_full_text=False)
    assert isinstance(plain[0]["generated_text"], str)

    # The chat prompt's question reached TGVC: the pipeline's answer equals generate() with that guidance.
    model, processor = pipe.model, pipe.processor
    chat_without_pixels = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]}
    ]
    prompt = processor.apply_chat_template(chat_without_pixels, add_generation_prompt=True)
    inputs = processor(images=photos[0], text=prompt, return_tensors="pt")
    assert (
        processor.guidance_tokenizer.decode(inputs["guidance_input_ids"][0], skip_special_tokens=True)
        == "what animal is this ?"
    )
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert chat[0]["generated_text"][-1]["content"] == answer


@pytest.mark.parametrize("name", ["eager", "sdpa"])
def test_attention_implementation_choice_reaches_every_tower(checkpoint, name):
    model, _ = load_remote(checkpoint, attn_implementation=name)
    inner = model.model
    assert inner.vision_tower.config._attn_implementation == name
    assert inner.guidance_encoder.config._attn_implementation == name
    assert inner.language_model.config._attn_implementation == name


def test_flash_attention_2_without_flash_attn_fails_with_transformers_own_error(checkpoint):
    # flash-attn is an optional extra, never imported by the remote code: without it, asking for it fails at load with
    # Transformers' own message, not with one of ours or a NameError from inside the model.
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ImportError, match="FlashAttention2 has been toggled on.*package for FlashAttention2"):
        load_remote(checkpoint, attn_implementation="flash_attention_2")


def test_flash_attention_2_is_requested_like_any_transformers_model(checkpoint):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (optional extra, needs CUDA)")
    model, _ = load_remote(
        checkpoint, attn_implementation="flash_attention_2", dtype=torch.bfloat16, device_map="cuda"
    )
    assert model.model.vision_tower.config._attn_implementation == "flash_attention_2"


# Loads a folder and runs one prompt in a fresh interpreter in which `import visiontrim` fails: only the folder's copy
# of the code can run.
WITHOUT_PACKAGE = """
import sys
from importlib.abc import MetaPathFinder


class NoVisionTrim(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "visiontrim" or name.startswith("visiontrim."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, NoVisionTrim())
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, photo = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=Image.open(photo), text="USER: <image>\\nWhat is it? ASSISTANT:", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=2, return_dict_in_generate=True)
print(type(model).__module__, int(inputs["input_ids"].shape[1]), int(output.sequences.shape[1]))
"""


def run_without_package(script: str, arguments: list, work: Path, timeout: int) -> str:
    """Runs `script` (one of the `*WITHOUT_PACKAGE` scripts) on `arguments` in a fresh interpreter; its stdout."""
    environment = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(work / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, arguments)],
        capture_output=True,
        text=True,
        cwd=work,
        env=environment,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_saved_folder_runs_with_the_package_unimportable(tmp_path):
    from visiontrim.tools.demo import sample_photo

    folder = save_checkpoint(tmp_path / "checkpoint", llm_stage_layer=1, llm_stage_tokens=8)
    output = run_without_package(WITHOUT_PACKAGE, [folder, sample_photo("chelsea.jpg")], tmp_path, timeout=300)
    module, prompt_length, generated_length = output.split()
    assert module.startswith("transformers_modules.") and generated_length == str(int(prompt_length) + 2)


def test_a_damaged_weight_file_is_named_at_load(tmp_path):
    folder = save_checkpoint(tmp_path / "checkpoint")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])  # cut short: a broken download
    with pytest.raises(OSError, match=rf"{weights} cannot be read as safetensors .*damaged or incomplete"):
        load_remote(folder)


def test_pipeline_chat_with_only_an_image(checkpoint, photos, tmp_path):
    with working_directory(tmp_path):
        pipe = pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": photos[0]}]}]
    reply = pipe(text=messages, max_new_tokens=3, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


# Loads each folder given and generates from an image and a question in a fresh interpreter in which `import
# visiontrim` fails, printing the model's class and module.
EACH_FOLDER_WITHOUT_PACKAGE = (
    WITHOUT_PACKAGE.split("folder, photo = sys.argv[1:]")[0]
    + """
photo, *folders = sys.argv[1:]
for folder in folders:
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(photo).convert("RGB")], text=[prompt], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2, output.shape
    print(type(model).__name__, type(model).__module__)
"""
)


def test_each_folder_ships_the_core_and_its_own_family_only(tmp_path):
    from visiontrim.tools.build import build_config, build_model, build_processor
    from visiontrim.tools.build_onevision import build_onevision_config, build_onevision_processor
    from visiontrim.tools.build_qwen import build_qwen_config, build_qwen_model, build_qwen_processor
    from visiontrim.tools.demo import sample_photo

    copies = []
    for arch, expected in SHIPPED_FILES.items():
        folder = tmp_path / arch
        if arch.startswith("qwen"):
            config = build_qwen_config(arch)
            build_qwen_model(config).save_pretrained(folder)
            build_qwen_processor(config).save_pretrained(folder)
        elif arch == "llava-onevision":
            config = build_onevision_config()
            build_model(config).save_pretrained(folder)
            build_onevision_processor(config).save_pretrained(folder)
        else:
            config = build_config(arch=arch)
            build_model(config).save_pretrained(folder)
            build_processor(config).save_pretrained(folder)
        written = {path.name for path in folder.rglob("*.py")}
        assert written == expected, (arch, written ^ expected)
        family = architecture_named(arch).family
        others = [re.compile(rf"visiontrim_{other}\b") for other in FAMILY_BUILDERS if other != family]
        for name in written:
            imports = [line for line in (folder / name).read_text().splitlines() if "import" in line]
            assert not [line for line in imports if any(other.search(line) for other in others)], (arch, name)
        copies.append(tmp_path / "copies" / arch)
        shutil.copytree(folder, copies[-1])  # only what save_pretrained wrote travels
    output = run_without_package(EACH_FOLDER_WITHOUT_PACKAGE, [sample_photo("chelsea.jpg"), *copies], tmp_path, 600)
    loaded = [line.split() for line in output.splitlines()]
    assert [name for name, _ in loaded] == [
        "VisionTrimLlavaForConditionalGeneration",
        "VisionTrimLlavaNextForConditionalGeneration",
        "VisionTrimVideoLlavaForConditionalGeneration",
        "VisionTrimLlavaNextVideoForConditionalGeneration",
        "VisionTrimLlavaOnevisionForConditionalGeneration",
        "VisionTrimQwen2_5_VLForConditionalGeneration",
        "VisionTrimQwen2VLForConditionalGeneration",
        "VisionTrimQwen3VLForConditionalGeneration",
        "VisionTrimQwen3VLMoeForConditionalGeneration",
    ]
    assert all(module.startswith("transformers_modules.") for _, module in loaded)
