# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The LLaVA-family converter: a LLaVA-1.5, LLaVA-NeXT, Video-LLaVA or LLaVA-NeXT-Video checkpoint plus the CLIP model
its vision tower comes from become a VisionTrim repository folder. Sources are in the llava-hf layout (the stock
Transformers classes) or, for LLaVA-1.5 / 1.6, the original LLaVA one (`LlavaLlamaForCausalLM`: `model.layers.*`,
`model.mm_projector.*`, the vision tower named in `mm_vision_tower`). For Video-LLaVA, `--clip` is the video encoder's
CLIP model (LanguageBind's video encoder in `CLIPModel` format: its text tower guides both towers) and `--image-clip`
the image encoder's (its `visual_projection` and `logit_scale` pair the image tower with that text tower). Every key
is mapped explicitly; a conversion that would leave a source key unused, a target weight unfilled or mismatched widths
is refused before anything is written.
"""

import argparse
import dataclasses
import json
import logging
import math
import re
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AddedToken,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    MistralConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from ... import __version__
from ...architectures import ARCHITECTURES, Architecture, architecture_named
from ...configuration_visiontrim_llava import VisionTrimSettings
from ...video_processing_visiontrim import VisionTrimVideoProcessor
from .repository import (
    DTYPES,
    ConversionError,
    check_output,
    check_requested,
    is_hub_id,
    new_revision,
    read_chat_template,
    resolve,
    source_architecture,
    write_repository,
)


logger = logging.getLogger("visiontrim.convert")

IMAGE_TOKEN = "<image>"
# llava-hf's LLaVA-1.5 / LLaVA-1.6 (Vicuna) chat template: "USER: <image>\n<question> ASSISTANT:".
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Original LLaVA checkpoint keys -> VisionTrim keys. The vision tower of LLaVA-1.6 checkpoints is fine-tuned and
# stored with the weights; LLaVA-1.5 checkpoints only name it in `mm_vision_tower`.
ORIGINAL_KEY_MAP = (
    (r"^model\.embed_tokens\.", "model.language_model.embed_tokens."),
    (r"^model\.layers\.", "model.language_model.layers."),
    (r"^model\.norm\.", "model.language_model.norm."),
    (r"^lm_head\.", "lm_head."),
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.image_newline$", "model.image_newline"),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
)
# Buffers that older Transformers versions saved with the weights and that the models recompute: not weights.
RECOMPUTED_BUFFERS = (r"\.rotary_emb\.inv_freq$", r"\.position_ids$")
# CLIPModel keys -> VisionTrim keys: the text tower guides every vision tower of the model.
CLIP_TEXT_KEY_MAP = (
    (r"^text_model\.", "model.guidance_encoder.text_model."),
    (r"^text_projection\.weight$", "model.guidance_encoder.text_projection.weight"),
)
CARD_TEMPLATE = "model_card.md"


@dataclass
class LlavaSource:
    """What a LLaVA checkpoint contributes, with weights already under VisionTrim key names."""

    architecture: Architecture
    layout: str  # "llava-hf" or "original"
    name: str
    weights: dict[str, torch.Tensor]
    config: dict  # VisionTrim config fields from the checkpoint (text_config, vision settings, ...)
    tokenizer: object
    image_processor: object
    chat_template: str
    generation_config: GenerationConfig
    vision_hidden_size: int
    video_processor: VisionTrimVideoProcessor | None = None

    def has_tower(self, tower: str) -> bool:
        return any(key.startswith(f"model.{tower}.") for key in self.weights)


@dataclass
class ClipSource:
    name: str
    model: CLIPModel
    tokenizer: CLIPTokenizer


def map_keys(
    tensors: dict[str, torch.Tensor], key_map: tuple[tuple[str, str], ...], ignored: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """
    Renames `tensors` by the first matching pattern of `key_map`, dropping the `ignored` ones (recomputed buffers);
    returns the renamed tensors and the keys nothing matched.
    """
    mapped, unused = {}, []
    for key, tensor in tensors.items():
        if any(re.search(pattern, key) for pattern in ignored):
            continue
        for pattern, replacement in key_map:
            if re.search(pattern, key):
                mapped[re.sub(pattern, replacement, key)] = tensor
                break
        else:
            unused.append(key)
    return mapped, unused


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: safetensors (single or sharded) or, for old checkpoints, PyTorch bins."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        files = [folder / single] if (folder / single).is_file() else []
        if (folder / index).is_file():
            shards = json.loads((folder / index).read_text())["weight_map"].values()
            files = [folder / shard for shard in sorted(set(shards))]
        if files:
            break
    else:
        raise ConversionError(f"{folder} holds no model.safetensors or pytorch_model.bin weights (nor their index).")
    tensors = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as weights:
                tensors.update({key: weights.get_tensor(key) for key in weights.keys()})  # noqa: SIM118 (not a dict)
        else:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return tensors


def is_original_layout(config: dict) -> bool:
    return "mm_vision_tower" in config or "mm_hidden_size" in config


def infer_architecture(config: dict, requested: str | None, source: str) -> Architecture:
    """
    The checkpoint's architecture: an original-layout one's from its image settings (LLaVA-1.5 or 1.6), a llava-hf
    one's from its model_type; refuses other checkpoints and an `--arch` that contradicts it.
    """
    if not is_original_layout(config):
        return source_architecture(config, source, "--llava", requested)
    is_next = config.get("image_aspect_ratio") == "anyres" or "image_grid_pinpoints" in config
    architecture = architecture_named("llava-next" if is_next else "llava")
    check_requested(architecture, requested, source)
    return architecture


def read_video_processor(folder: Path, name: str) -> VisionTrimVideoProcessor:
    """The Pillow VisionTrim video processor with the settings of the checkpoint's (torchvision) video processor."""
    for file_name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (folder / file_name).is_file():
            settings = json.loads((folder / file_name).read_text())
            break
    else:
        raise ConversionError(f"{name} has no video_preprocessor_config.json (nor preprocessor_config.json).")
    frame_settings = VisionTrimVideoProcessor.frame_settings
    return VisionTrimVideoProcessor(**{key: settings[key] for key in frame_settings if key in settings})


def read_llava_hf(folder: Path, architecture: Architecture, name: str) -> LlavaSource:
    """A llava-hf checkpoint, loaded by its stock Transformers class (which knows its key layout)."""
    stock_class = architecture.stock_class("model")
    stock, loading = stock_class.from_pretrained(folder, output_loading_info=True, dtype="auto")
    if loading["unexpected_keys"] or loading["missing_keys"] or loading["mismatched_keys"]:
        raise ConversionError(
            f"{name} does not load cleanly into {stock_class.__name__}: unused keys "
            f"{sorted(loading['unexpected_keys'])}, unfilled keys {sorted(loading['missing_keys'])}, mismatched "
            f"{sorted(loading['mismatched_keys'])}."
        )
    stock_config = stock.config
    fields = {field.name for field in dataclasses.fields(type(stock_config))} - {
        "architectures",
        "transformers_version",
    }
    if architecture.videos:
        # Transformers' video processors need torchvision: read their settings into the Pillow one instead.
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder)
        chat_template = read_chat_template(folder, tokenizer, VICUNA_CHAT_TEMPLATE)
        video_processor = read_video_processor(folder, name)
    else:
        processor = AutoProcessor.from_pretrained(folder)
        tokenizer, image_processor, video_processor = processor.tokenizer, processor.image_processor, None
        chat_template = processor.chat_template or VICUNA_CHAT_TEMPLATE
    return LlavaSource(
        architecture=architecture,
        layout="llava-hf",
        name=name,
        weights=dict(stock.state_dict()),
        config={field: getattr(stock_config, field) for field in fields if hasattr(stock_config, field)},
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=chat_template,
        generation_config=stock.generation_config,
        vision_hidden_size=stock_config.vision_config.hidden_size,
        video_processor=video_processor,
    )


def read_original(folder: Path, config: dict, architecture: Architecture, name: str, clip: ClipSource) -> LlavaSource:
    """An original-format LLaVA checkpoint (`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`), key by key."""
    weights, unused = map_keys(read_checkpoint_tensors(folder), ORIGINAL_KEY_MAP, RECOMPUTED_BUFFERS)
    if unused:
        raise ConversionError(f"{name} has keys this converter does not know where to put: {sorted(unused)}.")
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(
            f"{name}: only the mlp2x_gelu projector maps onto LLaVA's, got {config['mm_projector_type']}."
        )
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise ConversionError(
            f"{name}: mm_vision_select_feature must be 'patch' (CLS dropped), got "
            f"{config['mm_vision_select_feature']}."
        )

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    vocab_size = _pad_vocabulary(weights, len(tokenizer))

    text_config_class = MistralConfig if "Mistral" in "".join(config.get("architectures", [])) else LlamaConfig
    # The LLM's own fields, plus the RoPE ones that the config turns into `rope_parameters`.
    text_fields = {field.name for field in dataclasses.fields(text_config_class)} | {"rope_theta", "rope_scaling"}
    text_settings = {
        key: value
        for key, value in config.items()
        if key in text_fields and key != "architectures" and not (key == "rope_scaling" and value is None)
    }
    text_settings.update(vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id)
    text_config = text_config_class(**text_settings)
    clip_vision = clip.model.config.vision_config
    size = {"shortest_edge": clip_vision.image_size}
    crop_size = {"height": clip_vision.image_size, "width": clip_vision.image_size}
    clip_image_settings = {
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    settings = {
        "text_config": text_config,
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_feature_layer": config.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default",
        "pad_token_id": tokenizer.pad_token_id,
    }
    if architecture.anyres:
        settings["image_grid_pinpoints"] = config["image_grid_pinpoints"]
        image_processor = LlavaNextImageProcessorPil(
            size=size, crop_size=crop_size, image_grid_pinpoints=config["image_grid_pinpoints"], **clip_image_settings
        )
    else:
        # LLaVA-1.5 pads images to a square of the mean colour ("image_aspect_ratio": "pad").
        image_processor = LlavaImageProcessorPil(
            size=size, crop_size=crop_size, do_pad=config.get("image_aspect_ratio") == "pad", **clip_image_settings
        )
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return LlavaSource(
        architecture=architecture,
        layout="original",
        name=name,
        weights=weights,
        config=settings,
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=VICUNA_CHAT_TEMPLATE,
        generation_config=generation_config,
        vision_hidden_size=config.get("mm_hidden_size", clip_vision.hidden_size),
    )


def _pad_vocabulary(weights: dict[str, torch.Tensor], tokenizer_size: int) -> int:
    """
    Grows the embedding and LM head to the tokenizer (which gained `<image>` and maybe `<pad>`), rounded up to a
    multiple of 64 as llava-hf does. New rows are the mean of the existing ones: the `<image>` row is never read (image
    features replace it) and padding rows are never predicted by a trained head.
    """
    old_size = weights["model.language_model.embed_tokens.weight"].shape[0]
    new_size = max(old_size, 64 * math.ceil(tokenizer_size / 64))
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = weights[key]
        extra = rows.float().mean(dim=0, keepdim=True).to(rows.dtype).expand(new_size - old_size, -1)
        weights[key] = torch.cat([rows, extra])
    return new_size


def read_clip(folder: Path, name: str) -> ClipSource:
    model, loading = CLIPModel.from_pretrained(folder, output_loading_info=True, dtype="auto")
    if loading["missing_keys"] or loading["mismatched_keys"]:
        raise ConversionError(f"{name} is not a complete CLIPModel: missing {sorted(loading['missing_keys'])}.")
    return ClipSource(name=name, model=model, tokenizer=CLIPTokenizer.from_pretrained(folder))


def tower_sources(
    llava: LlavaSource, clip: ClipSource, image_clip: ClipSource | None
) -> list[tuple[str, ClipSource, str]]:
    """
    `(tower, CLIP source, head prefix)` for each vision tower of the model: the CLIP model it comes from, whose
    `visual_projection` / `logit_scale` become `model.{prefix}visual_projection` / `model.{prefix}logit_scale`.
    """
    if llava.architecture.name == "video-llava":
        return [("video_tower", clip, "video_"), ("image_tower", image_clip or clip, "")]
    return [("vision_tower", clip, "")]


def check_widths(llava: LlavaSource, clip: ClipSource) -> None:
    """The CLIP text side must fit the LLaVA vision tower: same width, and one joint space."""
    clip_vision = clip.model.config.vision_config
    projector_in = llava.weights["model.multi_modal_projector.linear_1.weight"].shape[1]
    if not llava.vision_hidden_size == clip_vision.hidden_size == projector_in:
        raise ConversionError(
            f"Vision widths differ: {llava.name}'s tower has {llava.vision_hidden_size} and its projector takes "
            f"{projector_in}, but {clip.name}'s vision tower has {clip_vision.hidden_size}: pass the CLIP model "
            "LLaVA's vision tower comes from (openai/clip-vit-large-patch14-336 for LLaVA-1.5 and 1.6)."
        )
    if llava.layout == "llava-hf":
        llava_vision = llava.config["vision_config"]
        for field in ("image_size", "patch_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(llava_vision, field) != getattr(clip_vision, field):
                raise ConversionError(
                    f"Vision towers differ: {llava.name} has vision_config.{field}={getattr(llava_vision, field)}, "
                    f"{clip.name} has {getattr(clip_vision, field)}: pass the CLIP model LLaVA's tower comes from."
                )


def vision_tower_distance(llava: LlavaSource, clip_vision: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Relative L2 distance of the LLaVA vision tower from CLIP's, and how many of its tensors differ."""
    difference = reference = 0.0
    differing = 0
    for key, tensor in clip_vision.items():
        own = llava.weights[key].float()
        delta = (own - tensor.float()).square().sum().item()
        difference += delta
        reference += tensor.float().square().sum().item()
        differing += delta > 0
    return math.sqrt(difference / max(reference, 1e-30)), differing


def assemble_weights(
    llava: LlavaSource, clip: ClipSource, image_clip: ClipSource | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """
    Every target weight, from the LLaVA checkpoint then CLIP (the text tower from `clip`; each vision tower's CLIP
    head, and its weights where the checkpoint has none, from its own CLIP model); and sentences on where the towers
    came from.
    """
    weights = dict(llava.weights)
    provenance = []
    for tower, source, prefix in tower_sources(llava, clip, image_clip):
        key_map = CLIP_TEXT_KEY_MAP + (
            (r"^visual_projection\.weight$", f"model.{prefix}visual_projection.weight"),
            (r"^logit_scale$", f"model.{prefix}logit_scale"),
            (r"^vision_model\.", f"model.{tower}."),
        )
        clip_weights, clip_unused = map_keys(dict(source.model.state_dict()), key_map)
        if clip_unused:
            raise ConversionError(f"{source.name} has keys that are not CLIP's: {sorted(clip_unused)}.")
        if source is clip:  # the text tower that guides every vision tower
            weights.update(
                {key: value for key, value in clip_weights.items() if key.startswith("model.guidance_encoder.")}
            )
        clip_vision = {key: value for key, value in clip_weights.items() if key.startswith(f"model.{tower}.")}
        tower_name = tower.replace("_", " ")
        if llava.has_tower(tower):
            missing = sorted(set(clip_vision) - set(weights))
            if missing:
                raise ConversionError(f"{llava.name}'s {tower_name} lacks weights CLIP has: {missing}.")
            distance, differing = vision_tower_distance(llava, clip_vision)
            provenance.append(
                f"The {tower_name} is {llava.name}'s own (LLaVA's weights always win); it differs from "
                f"{source.name}'s in {differing} of {len(clip_vision)} tensors, relative L2 distance {distance:.4g}."
            )
        else:
            weights.update(clip_vision)
            provenance.append(
                f"{llava.name} stores no vision tower, so it is {source.name}'s, as `mm_vision_tower` names it."
            )
        head = (f"model.{prefix}visual_projection.weight", f"model.{prefix}logit_scale")
        weights.update({key: clip_weights[key] for key in head})
    return weights, " ".join(provenance)


def build_config(llava: LlavaSource, clip: ClipSource, budget: dict) -> VisionTrimSettings:
    config_class = llava.architecture.visiontrim_class("config")
    clip_config = clip.model.config
    settings = dict(llava.config)
    settings["vision_config"] = settings.get("vision_config") or clip_config.vision_config
    # CLIPModel projects with its top-level projection_dim; the text sub-config's own value may disagree.
    guidance_config = {**clip_config.text_config.to_dict(), "projection_dim": clip_config.projection_dim}
    return config_class(
        **settings,
        guidance_config=guidance_config,
        projection_dim=clip_config.projection_dim,
        **budget,
    )


def build_processor(llava: LlavaSource, clip: ClipSource, config: VisionTrimSettings) -> ProcessorMixin:
    processor_class = llava.architecture.visiontrim_class("processor")
    extra = {"crop_newline": config.crop_newline} if llava.architecture.anyres else {}
    if llava.video_processor is not None:
        extra["video_processor"] = llava.video_processor
    return processor_class(
        image_processor=llava.image_processor,
        tokenizer=llava.tokenizer,
        guidance_tokenizer=clip.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=llava.chat_template,
        reduction_ratio=config.reduction_ratio,
        empty_guidance=config.empty_guidance,
        guidance_max_length=min(clip.tokenizer.model_max_length, config.guidance_config.max_position_embeddings),
        **extra,
    )


def source_dtype(llava: LlavaSource) -> torch.dtype:
    """The dtype most of the LLaVA checkpoint's floating-point weights are stored in (`--dtype auto`)."""
    sizes: dict[torch.dtype, int] = {}
    for tensor in llava.weights.values():
        if tensor.is_floating_point():
            sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
    return max(sizes, key=sizes.get)


def build_model(
    architecture: Architecture, config: VisionTrimSettings, weights: dict[str, torch.Tensor], dtype: torch.dtype
) -> PreTrainedModel:
    """The VisionTrim model holding exactly `weights` (no weight left random); refuses missing or extra keys."""
    model_class = architecture.visiontrim_class("model")
    with torch.device("meta"):
        model = model_class(config)
    expected = {key: tensor.shape for key, tensor in model.state_dict().items()}
    unfilled, unused = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if unfilled or unused:
        raise ConversionError(
            f"The sources do not fill the VisionTrim model exactly: unfilled {unfilled}, unused {unused}."
        )
    for key, tensor in weights.items():
        if tensor.shape != expected[key]:
            raise ConversionError(
                f"{key}: the source has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key])}."
            )
    model.load_state_dict({key: tensor.to(dtype) for key, tensor in weights.items()}, assign=True, strict=True)
    return model.eval()


def describe_budget(architecture: Architecture, config: VisionTrimSettings) -> tuple[str, str]:
    """The card's budget sentence and its short form for the title."""
    tokens, patches = config.visual_tokens, config.num_patches
    if architecture.anyres:
        newline = int(config.crop_newline)
        budget = (
            f"{tokens} tokens per crop{' plus one `image_newline`' if newline else ''}: an image of c crops (a base "
            f"view and 2 to 4 high-res crops) gives c x {tokens + newline} tokens"
        )
        if architecture.videos:  # LLaVA-NeXT-Video: stock pools each frame 2 x 2
            budget += (
                f"; a video frame gives {tokens} of its {patches} patch tokens, unpooled (32 frames: {32 * tokens} "
                f"tokens instead of the stock {32 * patches // 4})"
            )
        return budget, f"{tokens} visual tokens per crop"
    if architecture.videos:  # Video-LLaVA: stock keeps each frame's patches and CLS
        budget = (
            f"{tokens} of {patches} visual tokens per image and per video frame (8 frames: {8 * tokens} tokens "
            f"instead of the stock {8 * (patches + 1)})"
        )
        return budget, f"{tokens} of {patches} visual tokens per frame"
    return f"{tokens} of {patches} visual tokens per image", f"{tokens} of {patches} visual tokens"


VIDEO_USAGE = """
Videos: give the processor each video as its sampled frames, an array `(frames, height, width, 3)` or a list of
images (it decodes no files; PyAV, `pip install av`, reads them):

```python
import av
import numpy as np

with av.open("clip.mp4") as container:
    frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
frames = frames[np.linspace(0, len(frames) - 1, 8).round().astype(int)]  # 8 frames, uniformly
prompt = "USER: <video>\\nWhat happens in this video? ASSISTANT:"
inputs = processor(videos=frames, text=prompt, return_tensors="pt").to(model.device)
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))
```
"""


SERVING_IMAGE = """## Serving with vLLM

With the `visiontrim` package installed beside vLLM (its vLLM plugin; `pip install --no-deps visiontrim`, since vLLM
pins an older Transformers), this folder serves with its compression, and an ordinary OpenAI chat request with an
image and a question guides TGVC by that question:

```bash
vllm serve $repo_id --revision $revision --trust-remote-code
```
"""
SERVING_VIDEO = """## Serving with vLLM

With the `visiontrim` package installed beside vLLM (its vLLM plugin; `pip install --no-deps visiontrim`, since vLLM
pins an older Transformers), this folder serves videos with their compression, and an ordinary OpenAI chat request
with a video and a question guides TGVC by that question. vLLM's LLaVA-NeXT-Video model takes videos only (one per
prompt); run images with Transformers as above.

```bash
vllm serve $repo_id --revision $revision --trust-remote-code
```
"""
SERVING_UNSUPPORTED = """## Serving with vLLM

Not supported: the visiontrim vLLM plugin serves the $served models, and refuses this architecture when it loads. Run
it with Transformers as above.
"""


def serving_section(architecture: Architecture) -> str:
    """The card's vLLM section for the architecture: images, videos (LLaVA-NeXT-Video), or not served."""
    if not architecture.vllm_served:
        return SERVING_UNSUPPORTED
    return SERVING_VIDEO if architecture.videos else SERVING_IMAGE


def render_card(
    llava: LlavaSource,
    clip: ClipSource,
    config: VisionTrimSettings,
    provenance: str,
    revision: str,
    license_name: str,
    repo_id: str | None,
    image_clip: ClipSource | None = None,
    weight_checksums: dict[str, str] | None = None,
) -> str:
    """The repository's README.md, from `hub_cards/model_card.md`, with the SHA-256 of each weight file."""
    cards = resources.files("visiontrim") / "hub_cards"
    template = string.Template((cards / CARD_TEMPLATE).read_text())
    architecture = llava.architecture
    budget, short_budget = describe_budget(architecture, config)
    clip_provenance = f"CLIP text tower, `text_projection` and the guidance tokenizer: {clip.name}" + (
        f"; the video tower's `video_visual_projection` and `video_logit_scale`: {clip.name}; the image tower's "
        f"`visual_projection` and `logit_scale`: {(image_clip or clip).name}."
        if architecture.name == "video-llava"
        else f"; `visual_projection` and `logit_scale`: {clip.name}."
    )
    hub_base = is_hub_id(llava.name)
    return template.substitute(
        license=license_name,
        base_model_metadata=f"base_model: {llava.name}\n" if hub_base else "",
        architecture=architecture.display_name,
        base_model=llava.name,
        base_model_link=f"[{llava.name}](https://huggingface.co/{llava.name})" if hub_base else f"`{llava.name}`",
        short_budget=short_budget,
        clip_model=clip.name,
        visiontrim_version=__version__,
        repo_id=repo_id or "path/to/this/folder",
        revision=revision,
        dvts_score=config.dvts_score,
        budget=budget,
        reduction_ratio=f"{config.reduction_ratio:.6f}",
        dominant=config.dominant_tokens,
        complement=config.complement_tokens,
        published_table=(cards / f"published_{architecture.name}.md").read_text().strip(),
        newline_note=", `image_newline`" if architecture.anyres else "",
        clip_provenance=clip_provenance,
        vision_provenance=provenance,
        video_usage=VIDEO_USAGE if architecture.videos else "",
        serving=string.Template(serving_section(architecture)).substitute(
            repo_id=repo_id or "path/to/this/folder",
            revision=revision,
            served=" and ".join(served.display_name for served in ARCHITECTURES if served.vllm_served),
        ),
        checksums="\n".join(f"| `{name}` | `{digest}` |" for name, digest in (weight_checksums or {}).items()),
    )


def convert_llava(args: argparse.Namespace, llava_folder: Path, llava_config: dict) -> Path:
    """
    Converts the `--llava` checkpoint (resolved to `llava_folder`, whose `config.json` is `llava_config`) with its
    `--clip` model (and Video-LLaVA's `--image-clip`) to `--output`.
    """
    output = Path(args.output)
    check_output(output, args.overwrite)
    budget = {}
    if args.tokens is not None:
        budget["visual_tokens"] = args.tokens
    if args.reduction_ratio is not None:
        budget["reduction_ratio"] = args.reduction_ratio
    if args.dvts_ratio is not None:
        budget["dominant_ratio"] = args.dvts_ratio

    if args.clip is None:
        raise ConversionError("--clip is required with --llava: the CLIP model whose text tower guides TGVC.")
    clip_folder = resolve(args.clip)
    architecture = infer_architecture(llava_config, args.arch, args.llava)
    clip = read_clip(clip_folder, args.clip)
    if args.image_clip is not None and architecture.name != "video-llava":
        raise ConversionError(
            f"--image-clip is for Video-LLaVA's separate image tower; {args.llava} is a {architecture.name} "
            "checkpoint: drop it."
        )
    image_clip = read_clip(resolve(args.image_clip), args.image_clip) if args.image_clip is not None else None
    if is_original_layout(llava_config):
        llava = read_original(llava_folder, llava_config, architecture, args.llava, clip)
    else:
        llava = read_llava_hf(llava_folder, architecture, args.llava)
    for _, source, _ in tower_sources(llava, clip, image_clip):
        check_widths(llava, source)
    weights, provenance = assemble_weights(llava, clip, image_clip)
    try:
        config = build_config(llava, clip, budget)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    dtype = source_dtype(llava) if args.dtype == "auto" else DTYPES[args.dtype]
    model = build_model(architecture, config, weights, dtype)
    model.generation_config = llava.generation_config
    processor = build_processor(llava, clip, config)
    revision = new_revision()

    def card(weight_checksums: dict[str, str]) -> str:
        return render_card(
            llava,
            clip,
            config,
            provenance,
            revision,
            args.license or "llama2",
            args.push_to_hub,
            image_clip,
            weight_checksums,
        )

    write_repository(output, model, processor, card, args, revision)
    logger.info("%s", provenance)
    return output
