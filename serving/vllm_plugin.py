# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
vLLM general plugin: registers the VisionTrim architectures with vLLM's model registry, so that
`vllm serve PATH --trust-remote-code` and `LLM(model=PATH, trust_remote_code=True)` load a VisionTrim folder.

vLLM calls `register` in each of its processes (entry point group `vllm.general_plugins`); the model classes are
given by name and imported only when a VisionTrim folder is loaded. VisionTrim LLaVA-1.5 and LLaVA-NeXT are served;
the video architectures are registered so that loading one fails with a message that says so, rather than vLLM
falling back to its generic Transformers backend (which would run the folder's code outside vLLM's kernels).
"""

SERVED_ARCHITECTURES = {
    "VisionTrimLlavaForConditionalGeneration": "VisionTrimLlavaForConditionalGeneration",
    "VisionTrimLlavaNextForConditionalGeneration": "VisionTrimLlavaNextForConditionalGeneration",
    "VisionTrimVideoLlavaForConditionalGeneration": "UnservedArchitecture",
    "VisionTrimLlavaNextVideoForConditionalGeneration": "UnservedArchitecture",
}


def register() -> None:
    from vllm import ModelRegistry

    for architecture, class_name in SERVED_ARCHITECTURES.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, f"visiontrim.serving.vllm_llava:{class_name}")
