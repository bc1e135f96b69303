# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
The engine-configuration hook of the VisionTrim architectures whose kept tokens' M-RoPE positions are written at
prefill (Qwen2.5-VL, Qwen2-VL): vLLM runs it in `VllmConfig.__post_init__` for the architecture, before any engine
process starts. Imports only vLLM's configuration helpers: the plugin registers it in every vLLM process.
"""

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig


logger = init_logger(f"vllm.{__name__}")


class KeptPositionsConfig(VerifyAndUpdateConfig):
    """
    Turns on vLLM's multimodal pruning path for a compressing folder: the runner then hands each prefill chunk's
    media embeddings to the model's `recompute_mrope_positions`, which writes the kept tokens' positions. vLLM turns
    that path on when `video_pruning_rate > 0`; the folder's `reduction_ratio` is that share for VisionTrim (images
    and videos), so it is set there. vLLM's own EVS is not run: the model's `embed_multimodal` compresses.
    """

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        config = vllm_config.model_config.hf_config
        if not config.compression_enabled:
            return
        multimodal = vllm_config.model_config.multimodal_config
        if multimodal.video_pruning_rate not in (None, 0, config.reduction_ratio):
            raise ValueError(
                f"--video-pruning-rate {multimodal.video_pruning_rate} runs vLLM's EVS video pruning, but "
                f"{vllm_config.model_config.model} compresses images and videos with VisionTrim "
                f"(reduction_ratio={config.reduction_ratio}). Leave --video-pruning-rate out, or serve a stock Qwen "
                "folder (or a VisionTrim one with reduction_ratio=0) to run EVS."
            )
        multimodal.video_pruning_rate = config.reduction_ratio
        if vllm_config.compilation_config.compile_mm_encoder:
            logger.warning(
                "VisionTrim reads the vision tower's attention while it runs, which a compiled tower hides: the "
                "vision tower of %s runs eagerly (compile_mm_encoder off); the LLM is compiled as configured.",
                vllm_config.model_config.model,
            )
            vllm_config.compilation_config.compile_mm_encoder = False
