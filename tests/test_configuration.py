"""
VisionTrimLlavaConfig: the budget and its split, derived counts, validation (of every VisionTrim config), and what
config.json stores.
"""

import json
import re

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPTextConfig, LlavaConfig

from visiontrim import VisionTrimLlavaConfig
from visiontrim.configuration_visiontrim import check_reduction_ratio, strict_settings
from visiontrim.configuration_visiontrim_llava import (
    CLIP_L14_TEXT_CONFIG,
    VisionTrimLlavaNextConfig,
    VisionTrimSettings,
    declare_guidance_config_before_5_20,
)
from visiontrim.configuration_visiontrim_qwen2_vl import VisionTrimQwen2_5_VLConfig
from visiontrim.processing_visiontrim import GuidanceProcessingMixin
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
        ({"reduction_ratio": True}, "reduction_ratio", r"must be int \| float, got True"),
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


# One rule on one setting each (a field validator, or the field's type): checked on every assignment.
FIELD_RULES = [
    (VisionTrimLlavaConfig, "reduction_ratio", -0.1, r"must be in \[0, 1\) \(the share of each image's vision tokens"),
    (VisionTrimLlavaConfig, "reduction_ratio", "0.5", r"must be int \| float, got '0.5'\."),
    (VisionTrimLlavaConfig, "dominant_ratio", 1.5, r"must be in \[0, 1\] \(the share of kept tokens chosen by DVTS"),
    (VisionTrimLlavaConfig, "merge_iterations", -1, r"must be an integer >= 0, got -1\."),
    (VisionTrimLlavaConfig, "merge_iterations", 2.0, r"must be int, got 2\.0\."),
    (VisionTrimLlavaConfig, "merge_update", "average", r"must be one of \('add', 'mean'\), got 'average'\."),
    (VisionTrimLlavaConfig, "empty_guidance", "ignore", r"must be one of \('error', 'cls_similarity'\)"),
    (VisionTrimLlavaConfig, "dvts_score", "attention", r"must be one of \('global_local', 'received_attention'\)"),
    (VisionTrimLlavaConfig, "guidance_cache_size", -2, r"must be an integer >= 0, got -2\."),
    (VisionTrimLlavaConfig, "llm_stage_score", "max", r"must be one of \('both', 'text_to_image', 'image_to_text'\)"),
    (VisionTrimLlavaConfig, "llm_stage_layer", True, r"must be int \| None, got True\."),
    (VisionTrimLlavaNextConfig, "crop_newline", "yes", r"must be bool, got 'yes'\."),
    (VisionTrimQwen2_5_VLConfig, "reduction_ratio", 1.0, r"must be in \[0, 1\)"),
    (VisionTrimQwen2_5_VLConfig, "dvts_layer", 7.0, r"must be int \| None, got 7\.0\."),
]


@pytest.mark.parametrize(("config_class", "field", "value", "message"), FIELD_RULES)
def test_a_field_rule_refuses_at_construction_and_assignment_and_keeps_the_old_value(
    config_class, field, value, message
):
    pattern = "^" + re.escape(f"{config_class.__name__}.{field} ") + message
    with pytest.raises(ValueError, match=pattern) as refused:
        config_class(**{field: value})
    assert type(refused.value) is ValueError  # not huggingface_hub's wrapper: the rule's message, once
    config = config_class()
    before = getattr(config, field)
    with pytest.raises(ValueError, match=pattern):
        setattr(config, field, value)
    assert getattr(config, field) == before


# Rules relating settings (class validators): checked on construction, by `validate()` and by `save_pretrained`.
CLASS_RULES = [
    (VisionTrimLlavaConfig, {"reduction_ratio": 0.9995}, r"VisionTrimLlavaConfig\.reduction_ratio=0\.9995 keeps no"),
    (VisionTrimLlavaConfig, {"projection_dim": 512}, r"VisionTrimLlavaConfig\.projection_dim \(512\) must equal"),
    (
        VisionTrimLlavaConfig,
        {"vision_feature_select_strategy": "full"},
        r"VisionTrimLlavaConfig\.vision_feature_select_strategy must be 'default'",
    ),
    (VisionTrimLlavaConfig, {"llm_stage_layer": 32}, r"VisionTrimLlavaConfig\.llm_stage_layer must be an integer in"),
    (
        VisionTrimLlavaNextConfig,
        {"llm_stage_layer": 2, "llm_stage_tokens": 192},
        r"VisionTrimLlavaNextConfig\.llm_stage_tokens must be an integer in \[1, 191\]: fewer than the 192 visual",
    ),
    (
        VisionTrimQwen2_5_VLConfig,
        {"dvts_layer": 32},
        r"VisionTrimQwen2_5_VLConfig\.dvts_layer must be None \(the last full-attention block\) or a vision block",
    ),
    (VisionTrimQwen2_5_VLConfig, {"dvts_layer": 8}, r"VisionTrimQwen2_5_VLConfig\.dvts_layer=8 is a window-attention"),
]


@pytest.mark.parametrize(("config_class", "settings", "message"), CLASS_RULES)
def test_a_rule_relating_settings_refuses_at_construction_validate_and_save(config_class, settings, message, tmp_path):
    with pytest.raises(ValueError, match="^" + message) as refused:
        config_class(**settings)
    assert type(refused.value) is ValueError
    config = config_class()
    for name, value in settings.items():
        setattr(config, name, value)  # each value fits its field: only their combination breaks a rule
    with pytest.raises(ValueError, match="^" + message):
        config.validate()
    with pytest.raises(ValueError, match="^" + message):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_processors_check_their_copies_by_the_config_rules():
    for owner in ("VisionTrimProcessor", "VisionTrimQwen2_5_VLProcessor"):
        with pytest.raises(ValueError, match=rf"^{owner}\.reduction_ratio must be in \[0, 1\)"):
            check_reduction_ratio(1.0, owner)
    with pytest.raises(ValueError, match=r"^VisionTrimProcessor\.reduction_ratio must be a number in \[0, 1\)"):
        check_reduction_ratio(True, "VisionTrimProcessor")
    with pytest.raises(ValueError, match=r"^VisionTrimProcessor\.reduction_ratio=0\.9995 keeps no token of the 576"):
        check_reduction_ratio(0.9995, "VisionTrimProcessor", num_patches=576)
    check_reduction_ratio(0.9995, "VisionTrimQwen2_5_VLProcessor")  # Qwen keeps max(1, ...) tokens

    class Processor(GuidanceProcessingMixin):
        pass

    with pytest.raises(ValueError, match=r"^Processor\.empty_guidance must be one of \('error', 'cls_similarity'\)"):
        Processor.__new__(Processor).set_empty_guidance("ignore")


def test_guidance_config_fallback_before_transformers_5_20():
    class Config(VisionTrimSettings, LlavaConfig):  # no `model_type` of its own: no sub-config declared
        pass

    assert Config().guidance_config is None
    declare_guidance_config_before_5_20(Config)
    assert Config.sub_configs == {**LlavaConfig.sub_configs, "guidance_config": CLIPTextConfig}
    default = Config().guidance_config
    assert isinstance(default, CLIPTextConfig)
    assert {key: getattr(default, key) for key in CLIP_L14_TEXT_CONFIG} == CLIP_L14_TEXT_CONFIG
    assert Config(guidance_config={"projection_dim": 16}, projection_dim=16).guidance_config.projection_dim == 16
    given = CLIPTextConfig(projection_dim=32)
    assert Config(guidance_config=given, projection_dim=32).guidance_config is given


def test_a_model_config_declared_without_sub_config_specs_uses_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setattr("visiontrim.configuration_visiontrim_llava.SubConfigSpec", None)  # as Transformers < 5.20

    @strict_settings
    class Config(VisionTrimSettings, LlavaConfig):
        model_type = "visiontrim_llava_fallback_test"

    assert "guidance_config" not in Config.sub_configs_defaults
    config = Config(visual_tokens=32, guidance_config={"projection_dim": 16}, projection_dim=16)
    assert isinstance(config.guidance_config, CLIPTextConfig) and config.visual_tokens == 32
    config.save_pretrained(tmp_path)
    reloaded = Config.from_pretrained(tmp_path)
    assert reloaded.guidance_config.to_dict() == config.guidance_config.to_dict()
    with pytest.raises(ValueError, match=r"^Config\.projection_dim \(768\) must equal"):
        Config(guidance_config={"projection_dim": 16})


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
