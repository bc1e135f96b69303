"""VisionTrimLlavaConfig: the budget and its split, derived counts, validation, and what config.json stores."""

import json
import re

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from visiontrim import VisionTrimLlavaConfig
from visiontrim.tools.build import build_config

from helpers import NON_DEFAULT_SETTINGS, load_remote, save_checkpoint, working_directory


def test_defaults_are_the_papers_headline_setting():
    config = VisionTrimLlavaConfig()
    assert config.num_patches == 576
    assert (config.visual_tokens, config.dominant_tokens, config.complement_tokens) == (64, 48, 16)
    assert config.reduction_ratio == pytest.approx(0.889, abs=5e-4)
    assert config.dvts_score == "global_local"
    assert (config.merge_iterations, config.merge_update, config.empty_guidance) == (3, "add", "cls_similarity")
    assert config.guidance_config.model_type == "clip_text_model"
    assert (config.guidance_config.hidden_size, config.projection_dim) == (768, 768)
    assert config.tgvc_enabled


@pytest.mark.parametrize(
    ("tokens", "dominant", "complement"), [(192, 144, 48), (128, 96, 32), (64, 48, 16), (1, 1, 0)]
)
def test_published_budgets_and_their_default_split(tokens, dominant, complement):
    config = VisionTrimLlavaConfig(visual_tokens=tokens)
    assert (config.visual_tokens, config.dominant_tokens, config.complement_tokens) == (tokens, dominant, complement)
    assert config.reduction_ratio == pytest.approx(1 - tokens / 576)


def test_every_integer_budget_round_trips_through_the_stored_ratio():
    for tokens in range(1, 577):
        config = VisionTrimLlavaConfig(visual_tokens=tokens)
        assert VisionTrimLlavaConfig(reduction_ratio=config.reduction_ratio).visual_tokens == tokens


def test_ratio_zero_switches_compression_off_and_keeps_every_token():
    config = VisionTrimLlavaConfig(reduction_ratio=0)
    assert not config.compression_enabled and not config.tgvc_enabled
    assert config.visual_tokens == 576


def test_ablation_splits():
    dvts_only = VisionTrimLlavaConfig(dominant_ratio=1.0)
    assert (dvts_only.dominant_tokens, dvts_only.complement_tokens, dvts_only.tgvc_enabled) == (64, 0, False)
    tgvc_only = VisionTrimLlavaConfig(dominant_ratio=0)
    assert (tgvc_only.dominant_tokens, tgvc_only.complement_tokens, tgvc_only.tgvc_enabled) == (0, 64, True)


def test_visual_tokens_is_read_only():
    config = VisionTrimLlavaConfig()
    with pytest.raises(AttributeError):
        config.visual_tokens = 128


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"reduction_ratio": 1.0}, "reduction_ratio", r"must be in \[0, 1\)"),
        ({"reduction_ratio": -0.1}, "reduction_ratio", r"must be in \[0, 1\)"),
        ({"reduction_ratio": 0.9995}, "reduction_ratio", r"=0.9995 keeps no token of the 576 patches"),
        ({"reduction_ratio": True}, "reduction_ratio", r"must be a number in \[0, 1\)"),
        ({"visual_tokens": 577}, "visual_tokens", r"must be an integer in \[1, 576\]"),
        ({"visual_tokens": 0}, "visual_tokens", r"must be an integer in \[1, 576\]"),
        ({"visual_tokens": 64.0}, "visual_tokens", r"must be an integer in \[1, 576\]"),
        ({"dominant_ratio": -0.25}, "dominant_ratio", r"must be in \[0, 1\]"),
        ({"dominant_ratio": 1.5}, "dominant_ratio", r"must be in \[0, 1\]"),
        ({"dvts_score": "attention"}, "dvts_score", r"must be one of \('global_local', 'received_attention'\)"),
        ({"merge_update": "average"}, "merge_update", r"must be one of \('add', 'mean'\)"),
        ({"empty_guidance": "ignore"}, "empty_guidance", r"must be one of \('error', 'cls_similarity'\)"),
        ({"merge_iterations": -1}, "merge_iterations", r"must be an integer >= 0"),
        ({"projection_dim": 512}, "projection_dim", r"\(512\) must equal guidance_config.projection_dim \(768\)"),
        ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy", r"must be 'default'"),
        ({"vision_feature_layer": 0}, "vision_feature_layer", r"must be one transformer layer's hidden-state index"),
        (
            {"vision_feature_layer": -25},
            "vision_feature_layer",
            r"must be one transformer layer's hidden-state index, in \[-24, -1\] or \[1, 24\]",
        ),
        ({"vision_feature_layer": [-2, -5]}, "vision_feature_layer", r"must be one transformer layer"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_field(kwargs, field, message):
    with pytest.raises(ValueError, match=re.escape(f"VisionTrimLlavaConfig.{field}") + r"\s?" + message):
        VisionTrimLlavaConfig(**kwargs)


def test_layer_and_strategy_are_free_when_compression_is_off():
    config = VisionTrimLlavaConfig(
        reduction_ratio=0, vision_feature_select_strategy="full", vision_feature_layer=[-2, -5]
    )
    assert config.visual_tokens == 576


def test_assignment_after_construction_is_checked_and_rolled_back():
    config = VisionTrimLlavaConfig(visual_tokens=128)
    with pytest.raises(ValueError, match=r"reduction_ratio must be in \[0, 1\)"):
        config.reduction_ratio = 1.5
    assert config.visual_tokens == 128
    config.reduction_ratio = 1 - 192 / 576
    assert config.visual_tokens == 192


def test_config_json_stores_every_compression_setting(tmp_path):
    config = build_config(visual_tokens=128, **NON_DEFAULT_SETTINGS)
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == "visiontrim_llava"
    assert stored["reduction_ratio"] == pytest.approx(1 - 128 / 576)
    assert "visual_tokens" not in stored  # derived, never a second source of truth
    assert {key: stored[key] for key in NON_DEFAULT_SETTINGS} == NON_DEFAULT_SETTINGS
    assert stored["projection_dim"] == 16 and stored["guidance_config"]["projection_dim"] == 16
    assert stored["auto_map"]["AutoConfig"] == "configuration_visiontrim_llava.VisionTrimLlavaConfig"

    reloaded = VisionTrimLlavaConfig.from_pretrained(tmp_path)
    for field in ("reduction_ratio", *NON_DEFAULT_SETTINGS):
        assert getattr(reloaded, field) == getattr(config, field)
    assert reloaded.visual_tokens == 128


def test_budget_override_at_load(tmp_path):
    build_config(visual_tokens=128).save_pretrained(tmp_path)
    assert VisionTrimLlavaConfig.from_pretrained(tmp_path, visual_tokens=64).visual_tokens == 64
    assert VisionTrimLlavaConfig.from_pretrained(tmp_path, reduction_ratio=1 - 192 / 576).visual_tokens == 192
    with pytest.raises(ValueError, match=r"reduction_ratio must be in \[0, 1\)"):
        VisionTrimLlavaConfig.from_pretrained(tmp_path, reduction_ratio=1.2)
    with pytest.raises(ValueError, match=r"visual_tokens must be an integer in \[1, 576\]"):
        VisionTrimLlavaConfig.from_pretrained(tmp_path, visual_tokens=1000)


@pytest.mark.parametrize(
    "overrides",
    [
        {"llm_stage_layer": 1, "llm_stage_tokens": 32},
        {"llm_stage_tokens": 32, "llm_stage_layer": 1},
        {"llm_stage_layer": 1, "llm_stage_tokens": 100, "visual_tokens": 128},  # 100 fits only the new budget
        {"dominant_ratio": 1.0, "empty_guidance": "error", "reduction_ratio": 1 - 16 / 576},
    ],
)
def test_overrides_at_load_are_checked_together_whatever_their_order(checkpoint, overrides):
    model, processor = load_remote(checkpoint, **overrides)
    for name, value in overrides.items():
        assert getattr(model.config, name) == value, name
    assert processor.visual_tokens == model.config.visual_tokens


def test_two_budgets_that_disagree_are_refused_on_both_sides(checkpoint, tmp_path):
    message = (
        r"visual_tokens=64 and reduction_ratio=0.5 \(which keeps 288 of 576 tokens per crop\) ask for different "
        r"budgets: give only one of them"
    )
    with pytest.raises(ValueError, match=message):
        VisionTrimLlavaConfig(visual_tokens=64, reduction_ratio=0.5)
    with working_directory(tmp_path):
        with pytest.raises(ValueError, match=message):
            AutoModelForImageTextToText.from_pretrained(
                checkpoint, trust_remote_code=True, visual_tokens=64, reduction_ratio=0.5
            )
        with pytest.raises(ValueError, match=message):
            AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True, visual_tokens=64, reduction_ratio=0.5)
    model, processor = load_remote(checkpoint, visual_tokens=288, reduction_ratio=0.5)  # the same budget twice
    assert model.config.visual_tokens == processor.visual_tokens == 288


def test_visual_tokens_at_load_replace_a_stored_budget_on_both_sides(tmp_path):
    model, processor = load_remote(save_checkpoint(tmp_path, visual_tokens=128), visual_tokens=192)
    assert model.config.visual_tokens == processor.visual_tokens == 192
