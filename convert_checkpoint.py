# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Convert a LLaVA-1.5 or LLaVA-NeXT checkpoint plus the CLIP model its vision tower comes from into a VisionTrim
repository folder that loads with `from_pretrained(..., trust_remote_code=True)`.

    python convert_checkpoint.py --llava llava-hf/llava-1.5-7b-hf --clip openai/clip-vit-large-patch14-336 \\
        --output visiontrim-llava-1.5-7b --tokens 64

Sources are local folders or Hub ids, in the llava-hf layout (`LlavaForConditionalGeneration` /
`LlavaNextForConditionalGeneration`) or the original LLaVA one (`LlavaLlamaForCausalLM`: `model.layers.*`,
`model.mm_projector.*`, the vision tower named in `mm_vision_tower`). Every key is mapped explicitly; a conversion
that would leave a source key unused, a target weight unfilled or mismatched widths is refused before anything is
written.
"""

import argparse
import dataclasses
import json
import logging
import math
import re
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors import safe_open
from transformers import (
    AddedToken,
    AutoProcessor,
    AutoTokenizer,
    CLIPModel,
    CLIPTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    MistralConfig,
    PreTrainedModel,
)

from visiontrim import (
    VisionTrimLlavaConfig,
    VisionTrimLlavaForConditionalGeneration,
    VisionTrimLlavaNextConfig,
    VisionTrimLlavaNextForConditionalGeneration,
    VisionTrimLlavaNextProcessor,
    VisionTrimProcessor,
    __version__,
)


logger = logging.getLogger("visiontrim.convert")

ARCHITECTURES = ("llava", "llava-next")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
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
# CLIPModel keys -> VisionTrim keys (the vision tower only when the LLaVA checkpoint has none).
CLIP_KEY_MAP = (
    (r"^text_model\.", "model.guidance_encoder.text_model."),
    (r"^text_projection\.weight$", "model.guidance_encoder.text_projection.weight"),
    (r"^visual_projection\.weight$", "model.visual_projection.weight"),
    (r"^logit_scale$", "model.logit_scale"),
)
CLIP_VISION_KEY_MAP = ((r"^vision_model\.", "model.vision_tower."),)
CARD_TEMPLATE = "model_card.md"


class ConversionError(ValueError):
    """A conversion refused before anything was written; the message says what to change."""


@dataclass
class LlavaSource:
    """What a LLaVA checkpoint contributes, with weights already under VisionTrim key names."""

    arch: str
    layout: str  # "llava-hf" or "original"
    name: str
    weights: dict[str, torch.Tensor]
    config: dict  # VisionTrim config fields from the checkpoint (text_config, vision settings, ...)
    tokenizer: object
    image_processor: object
    chat_template: str
    generation_config: GenerationConfig
    vision_hidden_size: int

    @property
    def has_vision_tower(self) -> bool:
        return any(key.startswith("model.vision_tower.") for key in self.weights)


@dataclass
class ClipSource:
    name: str
    model: CLIPModel
    tokenizer: CLIPTokenizer


def resolve(source: str) -> Path:
    """A local folder as is, a Hub id downloaded (where the Hub is reachable)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        return Path(snapshot_download(source))
    except Exception as error:  # offline, unknown repository, bad id: all mean the same to the user
        raise ConversionError(
            f"{source} is neither a local checkpoint folder nor a Hub repository reachable from here ({error})."
        ) from error


def is_hub_id(source: str) -> bool:
    return not Path(source).exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


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


def infer_arch(config: dict, requested: str | None, source: str) -> str:
    if is_original_layout(config):
        is_next = config.get("image_aspect_ratio") == "anyres" or "image_grid_pinpoints" in config
    else:
        is_next = config.get("model_type") == "llava_next"
    arch = "llava-next" if is_next else "llava"
    if requested is not None and requested != arch:
        raise ConversionError(
            f"{source} is a {arch} checkpoint, but --arch {requested} was given: drop --arch or fix it."
        )
    return arch


def read_llava_hf(folder: Path, arch: str, name: str) -> LlavaSource:
    """A llava-hf checkpoint, loaded by its stock Transformers class (which knows its key layout)."""
    stock_class = LlavaNextForConditionalGeneration if arch == "llava-next" else LlavaForConditionalGeneration
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
    processor = AutoProcessor.from_pretrained(folder)
    return LlavaSource(
        arch=arch,
        layout="llava-hf",
        name=name,
        weights=dict(stock.state_dict()),
        config={field: getattr(stock_config, field) for field in fields if hasattr(stock_config, field)},
        tokenizer=processor.tokenizer,
        image_processor=processor.image_processor,
        chat_template=processor.chat_template or VICUNA_CHAT_TEMPLATE,
        generation_config=stock.generation_config,
        vision_hidden_size=stock_config.vision_config.hidden_size,
    )


def read_original(folder: Path, config: dict, arch: str, name: str, clip: ClipSource) -> LlavaSource:
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
    if arch == "llava-next":
        settings["image_grid_pinpoints"] = config["image_grid_pinpoints"]
        image_processor = LlavaNextImageProcessor(
            size=size, crop_size=crop_size, image_grid_pinpoints=config["image_grid_pinpoints"], **clip_image_settings
        )
    else:
        # LLaVA-1.5 pads images to a square of the mean colour ("image_aspect_ratio": "pad").
        image_processor = LlavaImageProcessor(
            size=size, crop_size=crop_size, do_pad=config.get("image_aspect_ratio") == "pad", **clip_image_settings
        )
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return LlavaSource(
        arch=arch,
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


def assemble_weights(llava: LlavaSource, clip: ClipSource) -> tuple[dict[str, torch.Tensor], str]:
    """Every target weight, from the LLaVA checkpoint then CLIP; and a sentence on where the vision tower came from."""
    clip_weights, clip_unused = map_keys(dict(clip.model.state_dict()), CLIP_KEY_MAP + CLIP_VISION_KEY_MAP)
    if clip_unused:
        raise ConversionError(f"{clip.name} has keys that are not CLIP's: {sorted(clip_unused)}.")
    clip_vision = {key: value for key, value in clip_weights.items() if key.startswith("model.vision_tower.")}
    weights = dict(llava.weights)
    if llava.has_vision_tower:
        missing = sorted(set(clip_vision) - set(weights))
        if missing:
            raise ConversionError(f"{llava.name}'s vision tower lacks weights CLIP has: {missing}.")
        distance, differing = vision_tower_distance(llava, clip_vision)
        provenance = (
            f"The vision tower is {llava.name}'s own (LLaVA's weights always win); it differs from {clip.name}'s in "
            f"{differing} of {len(clip_vision)} tensors, relative L2 distance {distance:.4g}."
        )
    else:
        weights.update(clip_vision)
        provenance = f"{llava.name} stores no vision tower, so it is {clip.name}'s, as `mm_vision_tower` names it."
    weights.update({key: value for key, value in clip_weights.items() if not key.startswith("model.vision_tower.")})
    return weights, provenance


def build_config(llava: LlavaSource, clip: ClipSource, budget: dict) -> VisionTrimLlavaConfig:
    config_class = VisionTrimLlavaNextConfig if llava.arch == "llava-next" else VisionTrimLlavaConfig
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


def build_processor(llava: LlavaSource, clip: ClipSource, config: VisionTrimLlavaConfig):
    processor_class = VisionTrimLlavaNextProcessor if llava.arch == "llava-next" else VisionTrimProcessor
    extra = {"crop_newline": config.crop_newline} if llava.arch == "llava-next" else {}
    return processor_class(
        image_processor=llava.image_processor,
        tokenizer=llava.tokenizer,
        guidance_tokenizer=clip.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=llava.chat_template,
        reduction_ratio=config.reduction_ratio,
        guidance_max_length=min(clip.tokenizer.model_max_length, config.guidance_config.max_position_embeddings),
        **extra,
    )


def build_model(
    config: VisionTrimLlavaConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype
) -> PreTrainedModel:
    """The VisionTrim model holding exactly `weights` (no weight left random); refuses missing or extra keys."""
    model_class = (
        VisionTrimLlavaNextForConditionalGeneration
        if isinstance(config, VisionTrimLlavaNextConfig)
        else VisionTrimLlavaForConditionalGeneration
    )
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


def render_card(
    llava: LlavaSource,
    clip: ClipSource,
    config: VisionTrimLlavaConfig,
    provenance: str,
    revision: str,
    license_name: str,
    repo_id: str | None,
) -> str:
    """The repository's README.md, from `hub_cards/model_card.md`."""
    cards = resources.files("visiontrim") / "hub_cards"
    template = string.Template((cards / CARD_TEMPLATE).read_text())
    is_next = llava.arch == "llava-next"
    newline = int(is_next and config.crop_newline)
    if is_next:
        budget = (
            f"{config.visual_tokens} tokens per crop{' plus one `image_newline`' if newline else ''}: an image of c "
            f"crops (a base view and 2 to 4 high-res crops) gives c x {config.visual_tokens + newline} tokens"
        )
        short_budget = f"{config.visual_tokens} visual tokens per crop"
    else:
        budget = f"{config.visual_tokens} of {config.num_patches} visual tokens per image"
        short_budget = f"{config.visual_tokens} of {config.num_patches} visual tokens"
    hub_base = is_hub_id(llava.name)
    return template.substitute(
        license=license_name,
        base_model_metadata=f"base_model: {llava.name}\n" if hub_base else "",
        architecture="LLaVA-NeXT" if is_next else "LLaVA-1.5",
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
        published_table=(cards / f"published_{llava.arch}.md").read_text().strip(),
        newline_note=", `image_newline`" if is_next else "",
        vision_provenance=provenance,
    )


def push_to_hub(folder: Path, repo_id: str, private: bool, revision: str, api: HfApi | None = None) -> str:
    """Uploads `folder` as one commit to `repo_id` and tags it `revision` (the tag the model card pins)."""
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=f"VisionTrim conversion ({revision})",
    )
    api.create_tag(repo_id, tag=revision, revision=commit.oid, repo_type="model")
    return commit.oid


def convert(args: argparse.Namespace) -> Path:
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise ConversionError(f"{output} exists and is not empty: choose another --output or pass --overwrite.")
    budget = {}
    if args.tokens is not None:
        budget["visual_tokens"] = args.tokens
    if args.reduction_ratio is not None:
        budget["reduction_ratio"] = args.reduction_ratio
    if args.dvts_ratio is not None:
        budget["dominant_ratio"] = args.dvts_ratio

    llava_folder, clip_folder = resolve(args.llava), resolve(args.clip)
    llava_config = json.loads((llava_folder / "config.json").read_text())
    arch = infer_arch(llava_config, args.arch, args.llava)
    clip = read_clip(clip_folder, args.clip)
    if is_original_layout(llava_config):
        llava = read_original(llava_folder, llava_config, arch, args.llava, clip)
    else:
        llava = read_llava_hf(llava_folder, arch, args.llava)
    check_widths(llava, clip)
    weights, provenance = assemble_weights(llava, clip)
    try:
        config = build_config(llava, clip, budget)
    except ValueError as error:
        raise ConversionError(str(error)) from error
    model = build_model(config, weights, DTYPES[args.dtype])
    model.generation_config = llava.generation_config
    processor = build_processor(llava, clip, config)
    revision = f"visiontrim-{__version__}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    card = render_card(llava, clip, config, provenance, revision, args.license, args.push_to_hub)

    # Written beside the output and moved into place only when complete: a failure leaves nothing behind.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}-"))
    try:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(card)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    logger.info("%s", provenance)
    logger.info("VisionTrim %s repository written to %s", config.model_type, output)
    if args.push_to_hub:
        commit = push_to_hub(output, args.push_to_hub, args.private, revision)
        logger.info("Uploaded to %s as commit %s, tagged %s", args.push_to_hub, commit, revision)
    return output


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="visiontrim-convert", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--llava", required=True, help="LLaVA checkpoint: local folder or Hub id (llava-hf or original layout)"
    )
    parser.add_argument(
        "--clip", required=True, help="CLIP model of its vision tower, e.g. openai/clip-vit-large-patch14-336"
    )
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--arch", choices=ARCHITECTURES, help="checked against the checkpoint (default: inferred)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--reduction-ratio", type=float, help="share of each crop's tokens removed (default 0.889)")
    budget.add_argument("--tokens", type=int, help="tokens kept per crop (default 64)")
    parser.add_argument("--dvts-ratio", type=float, help="share of kept tokens chosen by DVTS (default 0.75)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--license", default="llama2", help="license tag of the model card (default llama2)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder as one commit and tag it")
    parser.add_argument("--private", action="store_true", help="create the Hub repository private")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        convert(parse_arguments(argv))
    except ConversionError as error:
        logger.error("conversion refused: %s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
