"""
The converter (`visiontrim-convert`, `tools/convert/`) on tiny checkpoints written here in each source layout:
llava-hf (stock `save_pretrained`) and original LLaVA (its key names, config fields and tokenizer, written from a stock
model by the mapping below, which is independent of the converter's), for LLaVA-1.5 and LLaVA-NeXT, and llava-hf
Video-LLaVA and LLaVA-NeXT-Video, with tiny CLIP models as the CLIP sources; and sources it refuses.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from visiontrim import convert_checkpoint
from visiontrim.__main__ import main
from visiontrim.convert_checkpoint import ConversionError, convert, parse_arguments
from visiontrim.tools.build import (
    LLAVA_NEXT_PINPOINTS,
    Shapes,
    build_config,
    build_guidance_tokenizer,
    build_processor,
    build_tokenizer,
    clip_text_config,
    clip_vision_config,
    stock_processor,
)
from visiontrim.tools.build_qwen import (
    build_qwen_config,
    build_qwen_model,
    build_qwen_processor,
    stock_qwen_with_same_weights,
)
from visiontrim.tools.checksums import write_manifest
from visiontrim.tools.convert import repository

from helpers import QUESTION_PROMPT, load_remote


SHAPES = Shapes()
STOCK_CLASSES = {
    "llava": (LlavaConfig, LlavaForConditionalGeneration),
    "llava-next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    "video-llava": (VideoLlavaConfig, VideoLlavaForConditionalGeneration),
    "llava-next-video": (LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration),
}


def tiny_clip(folder: Path, seed: int, shapes: Shapes = SHAPES) -> CLIPModel:
    """A tiny CLIP model (the LLaVA tower's shapes, the guidance tower's) saved with its tokenizer, as on the Hub."""
    torch.manual_seed(seed)
    text, vision = clip_text_config(shapes).to_dict(), clip_vision_config(shapes).to_dict()
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=SHAPES.projection_dim)).eval()
    clip.save_pretrained(folder)
    build_guidance_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(folder)
    return clip


def stock_model(arch: str, vocab_size: int, image_token_id: int, seed: int):
    """A tiny stock LLaVA / LLaVA-NeXT / Video-LLaVA / LLaVA-NeXT-Video model with the test's shapes."""
    tiny = build_config(arch=arch)
    config_class, model_class = STOCK_CLASSES[arch]
    text_config = tiny.text_config
    text_config.vocab_size = vocab_size
    extra = {"image_grid_pinpoints": LLAVA_NEXT_PINPOINTS} if arch in ("llava-next", "llava-next-video") else {}
    if arch in ("video-llava", "llava-next-video"):
        extra["video_token_index"] = tiny.video_token_id
    config = config_class(
        vision_config=tiny.vision_config, text_config=text_config, image_token_index=image_token_id, **extra
    )
    torch.manual_seed(seed)
    return model_class(config).eval()


def llava_hf_source(folder: Path, arch: str, seed: int = 0):
    """A llava-hf checkpoint: the stock class's save_pretrained, with its processor (tokenizer holds <image>)."""
    tokenizer = build_tokenizer()
    model = stock_model(arch, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"), seed)
    model.save_pretrained(folder)
    stock_processor(build_processor(build_config(arch=arch, reduction_ratio=0))).save_pretrained(folder)
    return model


# Stock (Transformers v5) names -> original LLaVA names: the layout liuhaotian/llava-v1.5-7b and -v1.6-vicuna-7b use.
ORIGINAL_NAMES = (
    (r"^model\.language_model\.embed_tokens\.", "model.embed_tokens."),
    (r"^model\.language_model\.layers\.", "model.layers."),
    (r"^model\.language_model\.norm\.", "model.norm."),
    (r"^lm_head\.", "lm_head."),
    (r"^model\.multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
    (r"^model\.multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
    (r"^model\.image_newline$", "model.image_newline"),
    (r"^model\.vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
)


def original_source(folder: Path, arch: str, seed: int = 0, shards: bool = False, edit=None):
    """
    An original-format LLaVA checkpoint written from a stock model: the tokenizer has no <image>, the embedding and
    head only the tokenizer's rows, LLaVA-1.5 stores no vision tower (the CLIP source's is used) while LLaVA-1.6 stores
    its own, and old Transformers' recomputed buffers are in the file. Returns the stock model whose weights it holds.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(image_token=False)
    original_vocab = len(tokenizer)
    padded_vocab = 64 * math.ceil((original_vocab + 1) / 64)
    model = stock_model(arch, padded_vocab, original_vocab, seed)
    tensors = {}
    for key, tensor in model.state_dict().items():
        if arch == "llava" and key.startswith("model.vision_tower."):
            continue
        for pattern, replacement in ORIGINAL_NAMES:
            if re.search(pattern, key):
                name = re.sub(pattern, replacement, key)
                tensors[name] = (
                    tensor[:original_vocab] if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor
                )
                break
        else:
            raise AssertionError(f"test mapping misses {key}")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    if arch == "llava-next":
        tensors["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(577)[None]
    if edit is not None:
        edit(tensors)
    text = model.config.text_config
    config = {
        "_name_or_path": "./checkpoints/llava-tiny",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "vocab_size": original_vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "mm_hidden_size": SHAPES.vision_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "image_aspect_ratio": "pad",
    }
    if arch == "llava-next":
        config.update(
            image_aspect_ratio="anyres", image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, mm_patch_merge_type="spatial_unpad"
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    if shards:  # old checkpoints: pickled PyTorch shards with an index
        names = sorted(tensors)
        halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, keys in halves.items():
            torch.save({key: tensors[key] for key in keys}, folder / file)
        weight_map = {key: file for file, keys in halves.items() for key in keys}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors, folder / "model.safetensors")
    return model, original_vocab


def llava_hf_video_source(folder: Path, arch: str, seed: int = 0):
    """
    A llava-hf Video-LLaVA / LLaVA-NeXT-Video checkpoint as on the Hub: the stock model, tokenizer (with <image> and
    <video>), image processor, chat template, and the torchvision video processor's config (written as its JSON, since
    that class needs torchvision).
    """
    processor = build_processor(build_config(arch=arch, reduction_ratio=0))
    model = stock_model(arch, len(processor.tokenizer), processor.image_token_id, seed)
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)
    size = model.config.vision_config.image_size
    video_settings = {
        "video_processor_type": "VideoLlavaVideoProcessor"
        if arch == "video-llava"
        else "LlavaNextVideoVideoProcessor",
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "resample": 3,
        "do_resize": True,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "do_sample_frames": False,
    }
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_settings))
    return model


def run_convert(llava: Path, clip: Path, output: Path, *extra: str) -> Path:
    return convert(
        parse_arguments(
            ["--llava", str(llava), "--clip", str(clip), "--output", str(output), "--dtype", "float32", *extra]
        )
    )


def converted_inputs(processor, photos):
    return processor(
        images=photos,
        text=[QUESTION_PROMPT, QUESTION_PROMPT.replace("animal", "colour")],
        padding=True,
        return_tensors="pt",
    )


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tiny_clip(folder, seed=7)
    return folder


@pytest.mark.parametrize("arch", ["llava", "llava-next"])
def test_llava_hf_checkpoint_converts_to_a_loadable_repository_equal_to_stock(tmp_path, clip_folder, photos, arch):
    stock = llava_hf_source(tmp_path / "source", arch)
    output = run_convert(
        tmp_path / "source", clip_folder, tmp_path / "out", "--tokens", "64", "--max-shard-size", "300KB"
    )

    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((output / shard).is_file() for shard in shards)
    assert not list(output.glob("*.bin")) and not list(output.glob("*.pt"))
    for name in ("configuration_visiontrim_llava.py", "modeling_visiontrim_llava.py", "processing_visiontrim_llava.py",
                 "compression_visiontrim.py", "processor_config.json", "chat_template.jinja", "generation_config.json",
                 "tokenizer.json", "guidance_tokenizer/tokenizer.json", "README.md"):  # fmt: skip
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == ("visiontrim_llava_next" if arch == "llava-next" else "visiontrim_llava")
    assert (
        config["reduction_ratio"] == pytest.approx(1 - 64 / 576)
        and "AutoModelForImageTextToText" in config["auto_map"]
    )

    model, processor = load_remote(output)  # HF_HUB_OFFLINE=1 (conftest)
    clip = CLIPModel.from_pretrained(clip_folder)
    weights = model.state_dict()
    for key, tensor in stock.state_dict().items():
        assert torch.equal(weights[key], tensor), key  # the LLaVA checkpoint's tower wins over CLIP's
    assert torch.equal(weights["model.visual_projection.weight"], clip.visual_projection.weight)
    assert torch.equal(weights["model.logit_scale"], clip.logit_scale)
    assert torch.equal(weights["model.guidance_encoder.text_projection.weight"], clip.text_projection.weight)
    for key, tensor in clip.text_model.state_dict().items():
        assert torch.equal(weights[f"model.guidance_encoder.text_model.{key}"], tensor), key

    # At 64 tokens, the converted model is the stock LLaVA(-NeXT) fed the compressed image tokens.
    inputs = converted_inputs(processor, photos)
    compressed = model(**inputs)
    assert compressed.logits.shape == (*inputs["input_ids"].shape, model.config.text_config.vocab_size)
    newline = int(arch == "llava-next")
    assert [len(tokens) % (64 + newline) for tokens in compressed.image_outputs.pooler_output] == [0, 0]
    text = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    fed = stock(**text, mm_encoder_outputs={"image": compressed.image_outputs})
    torch.testing.assert_close(compressed.logits, fed.logits, rtol=0, atol=1e-5)
    off, off_processor = load_remote(output, reduction_ratio=0)
    off_inputs = converted_inputs(off_processor, photos)
    stock_inputs = {key: value for key, value in off_inputs.items() if not key.startswith("guidance_")}
    torch.testing.assert_close(off(**off_inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["video-llava", "llava-next-video"])
def test_llava_hf_video_checkpoint_converts_to_a_loadable_repository_equal_to_stock(
    tmp_path, clip_folder, photos, arch
):
    stock = llava_hf_video_source(tmp_path / "source", arch)
    extra = []
    video_clip = image_clip = CLIPModel.from_pretrained(clip_folder)
    clip = clip_folder
    if arch == "video-llava":  # LanguageBind's 224 px encoders: one for videos (with the text tower), one for images
        shapes = Shapes(image_size=224)
        video_clip, image_clip = (
            tiny_clip(tmp_path / "video-clip", 8, shapes),
            tiny_clip(tmp_path / "image-clip", 9, shapes),
        )
        clip, extra = tmp_path / "video-clip", ["--image-clip", str(tmp_path / "image-clip")]
    output = run_convert(tmp_path / "source", clip, tmp_path / "out", "--tokens", "16", *extra)

    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == f"visiontrim_{arch.replace('-', '_')}"
    video_processor = json.loads((output / "processor_config.json").read_text())["video_processor"]
    assert video_processor["video_processor_type"] == "VisionTrimVideoProcessor"
    model, processor = load_remote(output)
    assert type(processor.video_processor).__name__ == "VisionTrimVideoProcessor"
    size = stock.config.vision_config.image_size  # the video processor's settings are the source's
    assert processor.video_processor.crop_size == {"height": size, "width": size}
    weights = model.state_dict()
    for key, tensor in stock.state_dict().items():
        assert torch.equal(weights[key], tensor), key
    video_head = "model.video_" if arch == "video-llava" else "model."
    assert torch.equal(weights[f"{video_head}visual_projection.weight"], video_clip.visual_projection.weight)
    assert torch.equal(weights[f"{video_head}logit_scale"], video_clip.logit_scale)
    assert torch.equal(weights["model.visual_projection.weight"], image_clip.visual_projection.weight)
    for key, tensor in video_clip.text_model.state_dict().items():
        assert torch.equal(weights[f"model.guidance_encoder.text_model.{key}"], tensor), key

    clip_frames = torch.randint(0, 256, (4, 60, 80, 3), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    prompts = ["USER: <video>\nWhat happens? ASSISTANT:", QUESTION_PROMPT]
    inputs = processor(text=prompts, videos=[clip_frames.numpy()], images=photos[:1], padding=True)
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 4 * 16
    assert model(**inputs).logits.shape[0] == 2
    off, off_processor = load_remote(output, reduction_ratio=0)
    off_inputs = off_processor(text=prompts, videos=[clip_frames.numpy()], images=photos[:1], padding=True)
    stock_inputs = {key: value for key, value in off_inputs.items() if "guidance_" not in key}
    torch.testing.assert_close(off(**off_inputs).logits, stock(**stock_inputs).logits, rtol=0, atol=1e-5)
    card = (output / "README.md").read_text()
    name = {"video-llava": "Video-LLaVA", "llava-next-video": "LLaVA-NeXT-Video"}[arch]
    assert f"# VisionTrim {name}:" in card and 'prompt = "USER: <video>' in card
    serving = card.split("## Serving with vLLM\n\n")[1]
    if arch == "video-llava":
        assert serving.startswith("Not supported: the visiontrim vLLM plugin serves")
    else:  # vLLM's LLaVA-NeXT-Video takes videos only
        assert "this folder serves videos with their compression" in serving and "takes videos only" in serving


def test_image_clip_is_refused_outside_video_llava(tmp_path, clip_folder):
    llava_hf_source(tmp_path / "source", "llava")
    with pytest.raises(ConversionError, match="--image-clip is for Video-LLaVA"):
        run_convert(tmp_path / "source", clip_folder, tmp_path / "out", "--image-clip", str(clip_folder))


@pytest.mark.parametrize("arch", ["llava", "llava-next"])
def test_original_checkpoint_converts_key_by_key(tmp_path, clip_folder, photos, arch):
    stock, original_vocab = original_source(tmp_path / "source", arch, shards=arch == "llava-next")
    clip = CLIPModel.from_pretrained(clip_folder)
    output = run_convert(tmp_path / "source", clip_folder, tmp_path / "out")
    model, processor = load_remote(output, reduction_ratio=0)

    assert processor.tokenizer.convert_tokens_to_ids("<image>") == original_vocab == model.config.image_token_id
    assert model.config.text_config.vocab_size == stock.config.text_config.vocab_size  # rounded up to 64
    weights = model.state_dict()
    for key, tensor in stock.state_dict().items():
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(weights[key][:original_vocab], tensor[:original_vocab]), key
            mean = tensor[:original_vocab].mean(dim=0)
            torch.testing.assert_close(weights[key][original_vocab:], mean.expand(len(tensor) - original_vocab, -1))
        elif key.startswith("model.vision_tower.") and arch == "llava":
            # LLaVA-1.5 stores no tower: the CLIP source's is used.
            assert torch.equal(weights[key], clip.vision_model.state_dict()[key.removeprefix("model.vision_tower.")])
        else:
            assert torch.equal(weights[key], tensor), key
    if arch == "llava":
        stock.model.vision_tower.load_state_dict(clip.vision_model.state_dict())

    inputs = converted_inputs(processor, photos)
    stock_inputs = {key: value for key, value in inputs.items() if not key.startswith("guidance_")}
    torch.testing.assert_close(
        model(**inputs).logits[..., :original_vocab],
        stock(**stock_inputs).logits[..., :original_vocab],
        rtol=0,
        atol=1e-5,
    )
    if arch == "llava":
        assert type(processor.image_processor).__name__.startswith("LlavaImageProcessor")
        assert processor.image_processor.do_pad  # "image_aspect_ratio": "pad"
    card = (output / "README.md").read_text()
    provenance = "stores no vision tower" if arch == "llava" else "relative L2 distance"
    assert provenance in card


def test_model_card(tmp_path, clip_folder):
    original_source(tmp_path / "source", "llava-next")
    output = run_convert(
        tmp_path / "source", clip_folder, tmp_path / "out", "--tokens", "32", "--license", "apache-2.0"
    )
    card = (output / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "library_name: transformers" in metadata and "pipeline_tag: image-text-to-text" in metadata
    assert "license: apache-2.0" in metadata and "  - visiontrim" in metadata
    assert "base_model:" not in metadata  # a local folder is not a Hub id
    revision = re.search(r'revision = "(visiontrim-[\d.]+-\d{8}T\d{6}Z)"', card).group(1)
    assert (
        "trust_remote_code=True" in card and f"`visiontrim-convert --push-to-hub` creates the tag `{revision}`" in card
    )
    assert f"vllm serve path/to/this/folder --revision {revision} --trust-remote-code" in card
    assert "32 tokens per crop plus one `image_newline`" in card and "24 tokens chosen by DVTS and\n8 merged" in card
    assert "| LLaVA-1.6-Vicuna-7B, no compression | up to 2880 |" in card and "arXiv 2601.22674" in card
    assert "`modeling_visiontrim_llava.py`" in card and "import only `torch` and `transformers`" in card
    distance = re.search(r"differs from .* in (\d+) of (\d+) tensors, relative L2 distance ([\d.e+-]+)\.", card)
    # Random towers share only their freshly initialised LayerNorms (ones and zeros), so most tensors differ.
    assert distance and 0 < int(distance.group(1)) <= int(distance.group(2)) and float(distance.group(3)) > 0


def test_hub_id_sources_name_the_base_model(tmp_path, clip_folder, monkeypatch):
    llava_hf_source(tmp_path / "snapshot", "llava")
    downloads = []

    def fake_snapshot_download(repo_id):
        downloads.append(repo_id)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(repository, "snapshot_download", fake_snapshot_download)
    output = run_convert("llava-hf/llava-1.5-7b-hf", clip_folder, tmp_path / "out")
    assert downloads == ["llava-hf/llava-1.5-7b-hf"]
    card = (output / "README.md").read_text()
    assert "base_model: llava-hf/llava-1.5-7b-hf" in card.split("---")[1]
    assert "[llava-hf/llava-1.5-7b-hf](https://huggingface.co/llava-hf/llava-1.5-7b-hf)" in card


def assert_refused(tmp_path: Path, message: str, *arguments: str) -> None:
    before = set(tmp_path.iterdir())
    with pytest.raises(ConversionError, match=message):
        convert(parse_arguments([*arguments, "--dtype", "float32"]))
    assert set(tmp_path.iterdir()) == before  # nothing written, no staging folder left


def test_unused_source_key_is_refused(tmp_path, clip_folder):
    original_source(
        tmp_path / "source",
        "llava",
        edit=lambda tensors: tensors.update({"model.mm_projector.4.weight": torch.ones(2)}),
    )
    assert_refused(
        tmp_path, r"keys this converter does not know where to put: \['model.mm_projector.4.weight'\]",
        "--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(tmp_path / "out"),
    )  # fmt: skip


def test_unfilled_target_weight_is_refused(tmp_path, clip_folder):
    original_source(tmp_path / "source", "llava", edit=lambda tensors: tensors.pop("model.norm.weight"))
    assert_refused(
        tmp_path, r"do not fill the VisionTrim model exactly: unfilled \['model.language_model.norm.weight'\]",
        "--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(tmp_path / "out"),
    )  # fmt: skip


def test_unfilled_llava_hf_weight_is_refused(tmp_path, clip_folder):
    llava_hf_source(tmp_path / "source", "llava")
    weights = tmp_path / "source" / "model.safetensors"
    with safe_open(weights, "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys() if "post_layernorm" not in key}  # noqa: SIM118
    save_file(tensors, weights, metadata={"format": "pt"})
    assert_refused(
        tmp_path, r"does not load cleanly into LlavaForConditionalGeneration: .*unfilled keys \[.*post_layernorm",
        "--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(tmp_path / "out"),
    )  # fmt: skip


def test_mismatched_vision_widths_are_refused(tmp_path):
    original_source(tmp_path / "source", "llava")
    wide_clip = tmp_path / "wide_clip"
    clip = tiny_clip(wide_clip, seed=1)
    config = clip.config.to_dict()
    config["vision_config"]["hidden_size"] = 48
    CLIPModel(
        CLIPConfig(**{key: config[key] for key in ("text_config", "vision_config", "projection_dim")})
    ).save_pretrained(wide_clip)
    assert_refused(
        tmp_path, r"Vision widths differ: .* tower has 32 and its projector takes 32, but .* vision tower has 48",
        "--llava", str(tmp_path / "source"), "--clip", str(wide_clip), "--output", str(tmp_path / "out"),
    )  # fmt: skip


def test_existing_output_is_refused_unless_overwrite(tmp_path, clip_folder):
    llava_hf_source(tmp_path / "source", "llava")
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    arguments = ["--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(output)]
    assert_refused(tmp_path, r"exists and is not empty: choose another --output or pass --overwrite", *arguments)
    assert (output / "notes.txt").read_text() == "keep me"
    run_convert(tmp_path / "source", clip_folder, output, "--overwrite")
    assert not (output / "notes.txt").exists() and (output / "config.json").is_file()


def test_contradicting_arch_and_bad_budget_are_refused(tmp_path, clip_folder):
    llava_hf_source(tmp_path / "source", "llava")
    arguments = ["--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(tmp_path / "out")]
    assert_refused(
        tmp_path, r"is a llava checkpoint, but --arch llava-next was given", *arguments, "--arch", "llava-next"
    )
    assert_refused(tmp_path, r"visual_tokens must be an integer in \[1, 576\]", *arguments, "--tokens", "900")
    with pytest.raises(SystemExit):  # --tokens and --reduction-ratio are exclusive
        parse_arguments([*arguments, "--tokens", "64", "--reduction-ratio", "0.5"])


@pytest.mark.parametrize(
    ("model_type", "option", "message"),
    [
        ("qwen2_5_vl", "--llava", r"is a Qwen2.5-VL checkpoint: convert it with --qwen instead of --llava\."),
        ("llava_next", "--qwen", r"is a LLaVA-NeXT checkpoint: convert it with --llava instead of --qwen\."),
        ("visiontrim_llava", "--llava", r"is already a VisionTrim LLaVA-1.5 folder: load it as it is"),
        ("visiontrim_qwen2_vl", "--qwen", r"is already a VisionTrim Qwen2-VL folder"),
        (
            "idefics3",
            "--llava",
            r"model_type 'idefics3' is not an architecture VisionTrim supports: llava \(LLaVA-1\.5\), .*"
            r"llava-next-video \(LLaVA-NeXT-Video\), llava-onevision \(LLaVA-OneVision\), "
            r"qwen2\.5-vl \(Qwen2\.5-VL\), qwen2-vl \(Qwen2-VL\), qwen3-vl \(Qwen3-VL\), "
            r"qwen3-vl-moe \(Qwen3-VL-MoE\)\.",
        ),
    ],
)
def test_a_source_of_another_family_or_architecture_is_refused_naming_what_converts_it(
    tmp_path, clip_folder, model_type, option, message
):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": model_type}))
    clip = ["--clip", str(clip_folder)] if option == "--llava" else []
    assert_refused(tmp_path, message, option, str(source), *clip, "--output", str(tmp_path / "out"))


def test_an_arch_of_the_other_family_is_refused(tmp_path, clip_folder):
    llava_hf_source(tmp_path / "source", "llava")
    arguments = ["--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(tmp_path / "out")]
    assert_refused(
        tmp_path, r"is a llava checkpoint, but --arch qwen2.5-vl was given", *arguments, "--arch", "qwen2.5-vl"
    )


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records every call and the files present at upload time."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, **kwargs):
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        self.calls.append(("upload_folder", repo_id, kwargs, files))
        return type("CommitInfo", (), {"oid": "0123abcd"})()

    def create_tag(self, repo_id, **kwargs):
        self.calls.append(("create_tag", repo_id, kwargs))


def test_push_to_hub_uploads_the_folder_in_one_commit_and_tags_it(tmp_path, clip_folder, monkeypatch):
    llava_hf_source(tmp_path / "source", "llava")
    RecordingHfApi.calls = []
    monkeypatch.setattr(repository, "HfApi", RecordingHfApi)
    output = run_convert(
        tmp_path / "source", clip_folder, tmp_path / "out", "--push-to-hub", "me/visiontrim-tiny", "--private"
    )
    expected_files = sorted(str(path.relative_to(output)) for path in output.rglob("*") if path.is_file())
    assert "README.md" in expected_files and "guidance_tokenizer/tokenizer.json" in expected_files
    revision = re.search(r'revision = "([^"]+)"', (output / "README.md").read_text()).group(1)
    assert 'repo = "me/visiontrim-tiny"' in (output / "README.md").read_text()
    upload = {"repo_type": "model", "commit_message": f"VisionTrim conversion ({revision})"}
    assert RecordingHfApi.calls == [
        ("create_repo", "me/visiontrim-tiny", {"repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", "me/visiontrim-tiny", upload, expected_files),
        ("create_tag", "me/visiontrim-tiny", {"tag": revision, "revision": "0123abcd", "repo_type": "model"}),
    ]


def test_command_line_script_and_refusal_exit_code(tmp_path, clip_folder):
    llava_hf_source(tmp_path / "source", "llava")
    script = Path(convert_checkpoint.__file__)
    arguments = [sys.executable, str(script), "--llava", str(tmp_path / "source"), "--clip", str(clip_folder)]
    done = subprocess.run([*arguments, "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    refused = subprocess.run(
        [*arguments, "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and "conversion refused:" in refused.stderr and "--overwrite" in refused.stderr


def test_the_default_dtype_is_the_sources_so_fp32_is_not_rounded(tmp_path, clip_folder):
    stock = llava_hf_source(tmp_path / "source", "llava")
    arguments = parse_arguments(
        ["--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(tmp_path / "out")]
    )
    assert arguments.dtype == "auto"
    output = convert(arguments)
    with safe_open(output / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        dtypes = {weights.get_tensor(name).dtype for name in names}
        embeddings = weights.get_tensor(next(name for name in names if name.endswith("embed_tokens.weight")))
    assert dtypes == {torch.float32}
    assert torch.equal(embeddings, stock.model.language_model.embed_tokens.weight)


def test_checksums_are_written_and_verify_names_a_damaged_file(tmp_path, clip_folder, capsys):
    llava_hf_source(tmp_path / "source", "llava")
    output = run_convert(tmp_path / "source", clip_folder, tmp_path / "out", "--max-shard-size", "300KB")
    manifest = dict(reversed(line.split("  ", 1)) for line in (output / "checksums.sha256").read_text().splitlines())
    files = sorted(path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file())
    assert sorted(manifest) == [name for name in files if name != "checksums.sha256"]
    assert "README.md" in manifest and "guidance_tokenizer/tokenizer.json" in manifest
    shards = sorted(name for name in manifest if name.endswith(".safetensors"))
    card = (output / "README.md").read_text()
    assert len(shards) > 1 and all(f"| `{name}` | `{manifest[name]}` |" in card for name in shards)

    main(["verify", str(output)])
    assert f"all {len(manifest)} files match" in capsys.readouterr().out
    damaged = output / shards[0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped mid-file: the file still loads
    damaged.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=rf"1 of {len(manifest)} files do not match .*\['{shards[0]}'\]"):
        main(["verify", str(output)])
    assert f"{shards[0]}: FAILED" in capsys.readouterr().out


def test_verify_without_a_manifest_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(tmp_path)])
    assert exit_info.value.code == 2 and "holds no checksums.sha256" in capsys.readouterr().err


def test_verify_reports_a_malformed_line_and_the_files_the_manifest_does_not_list(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    for name in ("config.json", "model.safetensors", "sub/tokenizer.json"):
        (tmp_path / name).write_text(name)
    write_manifest(tmp_path)
    with (tmp_path / "checksums.sha256").open("a") as manifest:
        manifest.write("config.json\n")  # no digest
        manifest.write("0123abcd  weights.bin\n")  # a digest too short: malformed, not a missing weights.bin
    (tmp_path / "extra.py").write_text("print('not listed')")
    with pytest.raises(SystemExit, match=r"2 of 5 files do not match .*: \['line 4', 'line 5'\]"):
        main(["verify", str(tmp_path)])
    out = capsys.readouterr().out
    assert "line 4: MALFORMED" in out and "line 5: MALFORMED" in out and "MISSING" not in out
    assert "extra.py: NOT IN MANIFEST" in out
    assert "config.json: OK" in out and "sub/tokenizer.json: OK" in out
    assert "1 files of the folder are not in" in out and "['extra.py']" in out


def qwen_source(folder: Path, max_shard_size: str = "5GB") -> None:
    """A stock Qwen2.5-VL checkpoint as on the Hub: weights (in shards past `max_shard_size`), processor files."""
    config = build_qwen_config("qwen2.5-vl", reduction_ratio=0.0)
    processor = build_qwen_processor(config)
    stock_qwen_with_same_weights(build_qwen_model(config)).save_pretrained(folder, max_shard_size=max_shard_size)
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template)


@pytest.mark.parametrize(
    ("umask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)], ids=["022", "077"]
)
def test_converted_folders_take_the_umask_permissions(tmp_path, clip_folder, umask, folder_mode, file_mode):
    llava_hf_source(tmp_path / "llava", "llava")
    qwen_source(tmp_path / "qwen")
    previous = os.umask(umask)
    try:
        outputs = [
            run_convert(tmp_path / "llava", clip_folder, tmp_path / "out" / "llava"),
            convert(parse_arguments(["--qwen", str(tmp_path / "qwen"), "--output", str(tmp_path / "out" / "qwen")])),
        ]
    finally:
        os.umask(previous)
    assert (outputs[0] / "guidance_tokenizer").is_dir()  # a subfolder too
    for output in outputs:
        paths = [output, *output.rglob("*")]
        modes = {path.relative_to(output).as_posix(): path.stat().st_mode & 0o777 for path in paths}
        assert modes == {name: folder_mode if (output / name).is_dir() else file_mode for name in modes}
        assert any(path.suffix == ".safetensors" for path in paths)  # save_pretrained writes them 0600


def assert_cli_refusal(caplog, message: str, argv: list[str]) -> None:
    """`visiontrim-convert argv` exits with status 2 and the one-line `message` (a regular expression)."""
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main(argv)
    assert exit_info.value.code == 2
    [line] = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert re.fullmatch(message, line) and "\n" not in line, line


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_a_missing_shard_is_a_one_line_refusal_that_writes_nothing(tmp_path, clip_folder, caplog, family):
    source = tmp_path / "source"
    if family == "qwen":
        qwen_source(source, max_shard_size="300KB")
        argv = ["--qwen", str(source)]
    else:
        llava_hf_source(source, "llava").save_pretrained(source, max_shard_size="300KB")
        (source / "model.safetensors").unlink()
        argv = ["--llava", str(source), "--clip", str(clip_folder)]
    index = json.loads((source / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (source / shard).unlink()
    output = tmp_path / "new" / "out"
    assert_cli_refusal(
        caplog,
        rf"conversion refused: {re.escape(str(source))}: model\.safetensors\.index\.json lists 1 shard\(s\) the "
        rf"folder lacks, \['{shard}'\]: download or copy the checkpoint again\.",
        [*argv, "--output", str(output)],
    )
    assert not (tmp_path / "new").exists()


def test_an_unfilled_qwen_weight_is_refused(tmp_path):
    qwen_source(tmp_path / "source")
    weights = tmp_path / "source" / "model.safetensors"
    with safe_open(weights, "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys() if not key.endswith("norm.weight")}  # noqa: SIM118
    save_file(tensors, weights, metadata={"format": "pt"})
    assert_refused(
        tmp_path, r"does not load cleanly into VisionTrimQwen2_5_VLForConditionalGeneration: .*unfilled keys \[.*norm",
        "--qwen", str(tmp_path / "source"), "--output", str(tmp_path / "out"),
    )  # fmt: skip


def test_a_failed_write_is_one_line_and_leaves_no_folder_behind(tmp_path, clip_folder, caplog, monkeypatch):
    llava_hf_source(tmp_path / "source", "llava")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repository, "write_manifest", disk_full)
    argv = ["--llava", str(tmp_path / "source"), "--clip", str(clip_folder), "--output", str(tmp_path / "new" / "out")]
    assert_cli_refusal(caplog, r"conversion failed: \[Errno 28\] No space left on device", argv)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]
