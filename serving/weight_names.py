# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""Checkpoint weight names as vLLM's LLaVA models name them (no vLLM import: the tests use it too)."""


def vllm_weight_name(name: str) -> str:
    """
    The name in the vLLM model of a VisionTrim checkpoint's weight `name`, whichever LLaVA layout the checkpoint was
    saved in (llava-hf's `language_model.model.*` / `vision_tower.vision_model.*`, Transformers v5's `model.*`).
    """
    name = name.removeprefix("model.")
    if name.startswith("lm_head."):
        return f"language_model.{name}"
    if name.startswith("language_model."):
        rest = name.removeprefix("language_model.")
        return name if rest.startswith(("lm_head.", "model.")) else f"language_model.model.{rest}"
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        return f"vision_tower.vision_model.{name.removeprefix('vision_tower.')}"
    return name
