# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The Qwen converter: a Qwen2.5-VL, Qwen2-VL or Qwen3-VL (dense or MoE) folder (Hub layout) becomes a VisionTrim
repository folder. The weights are the model's own (VisionTrim adds none), the config gains the VisionTrim settings,
and the processor counts the kept tokens.
"""

import argparse
import json
import string
from importlib import resources
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer

from ... import __version__
from ...architectures import QWEN3_FAMILY, QWEN_FAMILY
from ...video_processing_visiontrim import VisionTrimQwen3VLVideoProcessor, VisionTrimQwenVideoProcessor
from .repository import (
    ConversionError,
    check_output,
    is_hub_id,
    load_converted,
    new_revision,
    read_chat_template,
    read_config,
    resolve,
    source_architecture,
    write_repository,
)


CARD_TEMPLATE = "model_card_qwen.md"
SERVED = """## Serving with vLLM

With the `visiontrim` package installed beside vLLM (its vLLM plugin; `pip install --no-deps visiontrim`, since vLLM
pins an older Transformers), this folder serves images and videos with its compression, and an ordinary OpenAI chat
request guides TGVC by its question:

```bash
vllm serve $repo_id --revision $revision --trust-remote-code
```
"""
# What the Qwen card says per family: its tag, DVTS's scored block, an example image, what the family changes, and
# what published numbers say.
FAMILY_CARD = {
    QWEN_FAMILY: {
        "family": QWEN_FAMILY,
        "scored_block": "the last full-attention block",
        "example_size": "1008 x 756",
        "example_units": 972,
        "family_notes": "",
        "published": """\
VisionTrim's paper reports transfer results on Qwen2-VL and Qwen2.5-VL; its Qwen numbers are not published in a form we
could verify, so none are quoted here. Evaluate this folder on your own tasks before relying on it.""",
    },
    QWEN3_FAMILY: {
        "family": QWEN3_FAMILY,
        "scored_block": "the last vision block (each attends over the whole image)",
        "example_size": "1024 x 768",
        "example_units": 768,
        "family_notes": """ Qwen3-VL's DeepStack features (added to the
language model's first layers at the visual positions) keep the same tokens, selected and merged like the main ones,
and each video frame pair keeps its timestamp and at least one token.""",
        "published": """\
VisionTrim publishes no Qwen3-VL numbers. Third-party tables (the EADP paper, as reprinted) show what heavy pruning
costs Qwen3-VL-8B at 1,024 vision tokens (average of 8 benchmarks with DocVQA / InfoVQA): keeping 128 tokens (87.5%
pruned), the best training-free methods keep 70-74% of the uncompressed average; keeping 256 (75% pruned), about 78%.
LLaVA-1.5 keeps 93-96% at 64 of 576 tokens: Qwen models lose far more at the same ratio, document and OCR tasks
most. So the default for Qwen3-VL is `reduction_ratio=0.5`, not LLaVA's 0.889: half of each image's tokens (half its
KV cache and prefill) for a loss we expect to be small on natural-image questions, which we have not measured. Use 0.3
or less for documents, charts and OCR, and measure your own tasks before going past 0.6.""",
    },
}


def convert_qwen(args: argparse.Namespace) -> Path:
    """Converts the `--qwen` checkpoint to `--output`."""
    output = Path(args.output)
    check_output(output, args.overwrite)
    if args.clip is not None or args.image_clip is not None or args.tokens is not None:
        raise ConversionError(
            "Qwen models need no CLIP model (TGVC compares the question's own LLM embeddings) and take their budget "
            "as --reduction-ratio (images have any size): drop --clip, --image-clip and --tokens."
        )
    folder = resolve(args.qwen)
    source_config = read_config(folder, args.qwen)
    architecture = source_architecture(source_config, args.qwen, "--qwen", args.arch)
    model_class = architecture.visiontrim_class("model")
    settings = {"reduction_ratio": args.reduction_ratio, "dominant_ratio": args.dvts_ratio}
    model = load_converted(model_class, folder, args.qwen, source_config, settings, args.dtype)
    config = model.config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    video_config = folder / "video_preprocessor_config.json"
    video_size = json.loads(video_config.read_text()).get("size") if video_config.exists() else None
    video_processor_class = (
        VisionTrimQwen3VLVideoProcessor if architecture.family == QWEN3_FAMILY else VisionTrimQwenVideoProcessor
    )
    processor = architecture.visiontrim_class("processor")(
        image_processor=AutoImageProcessor.from_pretrained(folder),
        tokenizer=tokenizer,
        video_processor=video_processor_class(size=video_size),
        chat_template=read_chat_template(folder, tokenizer),
        reduction_ratio=config.reduction_ratio,
        empty_guidance=config.empty_guidance,
    )
    revision = new_revision()

    def card(weight_checksums: dict[str, str]) -> str:
        template = string.Template((resources.files("visiontrim") / "hub_cards" / CARD_TEMPLATE).read_text())
        hub_base = is_hub_id(args.qwen)
        repo_id = args.push_to_hub or "path/to/this/folder"
        family = FAMILY_CARD[architecture.family]
        serving = string.Template(SERVED).substitute(repo_id=repo_id, revision=revision)
        return template.substitute(
            license=args.license or "apache-2.0",
            base_model_metadata=f"base_model: {args.qwen}\n" if hub_base else "",
            architecture=architecture.display_name,
            base_model=args.qwen,
            base_model_link=f"[{args.qwen}](https://huggingface.co/{args.qwen})" if hub_base else f"`{args.qwen}`",
            kept_percent=f"{100 * (1 - config.reduction_ratio):.1f}",
            reduction_ratio=f"{config.reduction_ratio:.6f}",
            dominant_ratio=config.dominant_ratio,
            **family,
            serving=serving,
            example_budget=config.kept_tokens(family["example_units"]),
            visiontrim_version=__version__,
            repo_id=repo_id,
            revision=revision,
            checksums="\n".join(f"| `{file}` | `{digest}` |" for file, digest in weight_checksums.items()),
        )

    write_repository(output, model, processor, card, args, revision)
    return output
