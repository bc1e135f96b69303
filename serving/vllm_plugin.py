# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
vLLM general plugin: registers the VisionTrim architectures with vLLM's model registry, so that
`vllm serve PATH --trust-remote-code` and `LLM(model=PATH, trust_remote_code=True)` load a VisionTrim folder.

vLLM calls `register` in each of its processes (entry point group `vllm.general_plugins`); the model classes are
given by name and imported only when a VisionTrim folder is loaded. The architectures the table in
`architectures.py` marks as served are; every other VisionTrim architecture is registered too, so that loading one
fails with a message that names what the plugin serves, rather than vLLM falling back to its generic Transformers
backend (which would run the folder's code outside vLLM's kernels).
"""

from ..architectures import ARCHITECTURES


def served_class(architecture_name: str) -> str:
    """The class in `serving.vllm_llava` that vLLM builds for a VisionTrim architecture's folders."""
    architecture = next(a for a in ARCHITECTURES if a.class_names["model"] == architecture_name)
    return architecture_name if architecture.vllm_served else "UnservedArchitecture"


def register() -> None:
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES:
        name = architecture.class_names["model"]
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"visiontrim.serving.vllm_llava:{served_class(name)}")
