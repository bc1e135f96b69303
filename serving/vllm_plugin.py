# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
vLLM general plugin: registers the VisionTrim architectures with vLLM's model registry, so that
`vllm serve PATH --trust-remote-code` and `LLM(model=PATH, trust_remote_code=True)` load a VisionTrim folder.

vLLM calls `register` in each of its processes (entry point group `vllm.general_plugins`); the model classes are
given by name and imported only when a VisionTrim folder is loaded. The architectures the table in
`architectures.py` marks as served are, from their family's module (`serving/vllm_<family>.py`); every other
VisionTrim architecture is registered too, so that loading one fails with a message that names what the plugin
serves, rather than vLLM falling back to its generic Transformers backend (which would run the folder's code outside
vLLM's kernels). Architectures whose kept tokens' positions are written at prefill also get their engine-config hook.
"""

from ..architectures import ARCHITECTURES, Architecture


def served_class(architecture: Architecture) -> str:
    """Where vLLM finds the class it builds for an architecture's folders (`module:class`)."""
    name = architecture.class_names["model"]
    if architecture.vllm_served:
        return f"visiontrim.serving.vllm_{architecture.family}:{name}"
    return "visiontrim.serving.vllm_common:UnservedArchitecture"


def register() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .vllm_config import KeptPositionsConfig

    for architecture in ARCHITECTURES:
        name = architecture.class_names["model"]
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, served_class(architecture))
        if architecture.vllm_served and architecture.kept_positions_at_prefill:
            MODELS_CONFIG_MAP.setdefault(name, KeptPositionsConfig)
