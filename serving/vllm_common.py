# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
What the vLLM models of every VisionTrim family share: the question of each request as a multimodal processor option
(so vLLM's processor, encoder and prefix caches are keyed by image and question), the folder's own VisionTrim
processor, and the checks made at load.
"""

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.logger import init_logger
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import ProcessorInputs, TimingContext
from vllm.platforms import current_platform

from ..architectures import ARCHITECTURES
from ..compression_visiontrim import VisionTowerRun, record_outputs
from ..processing_visiontrim import guidance_from_prompt, has_user_turn, unknown_format_warning


# Under vLLM's "vllm" logger, whose handler vLLM sets up: the processor's own warnings go to a logger that `vllm serve`
# leaves at level ERROR.
logger = init_logger(f"vllm.{__name__}")

# What a dummy (memory-profiling) prompt asks.
PROFILING_QUESTION = "What is shown in the image?"
# The guidance inputs of each modality, as the VisionTrim processors name them.
GUIDANCE_INPUTS = {
    "image": ("guidance_input_ids", "guidance_attention_mask"),
    "video": ("video_guidance_input_ids", "video_guidance_attention_mask"),
}
# Each guidance input's modality, as vLLM's processors declare their fields.
GUIDANCE_FIELDS = {name: modality for modality, names in GUIDANCE_INPUTS.items() for name in names}


def padded_guidance(
    input_ids: torch.Tensor | list[torch.Tensor], attention_mask: torch.Tensor | list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The guidance rows of a batch of items as `(items, text)` tensors: vLLM stacks the rows of items from one request
    (same length) and gives a list of `(text,)` rows when requests' questions differ in length.
    """
    if isinstance(input_ids, torch.Tensor):
        return input_ids, attention_mask
    return (
        nn.utils.rnn.pad_sequence(list(input_ids), batch_first=True),
        nn.utils.rnn.pad_sequence(list(attention_mask), batch_first=True),
    )


def recorded_tower_run(tower: nn.Module, attention: nn.Module, pixels: torch.Tensor, **tower_kwargs) -> VisionTowerRun:
    """
    vLLM's CLIP or SigLIP tower on `(crops, 3, height, width)` pixels (`tower_kwargs` select its features), with the
    queries and keys of the scored layer's `attention` recorded off its fused `qkv_proj` (all heads, whatever the
    tensor-parallel split).
    """
    with record_outputs(attention.qkv_proj) as recorded:
        features = tower(pixels, **tower_kwargs)
    query, key, _ = recorded[attention.qkv_proj][0].chunk(3, dim=-1)
    if attention.tp_size > 1:  # each rank holds its share of the heads; DVTS averages over all of them
        # The chunks are views into the fused output; the CPU all-gather needs contiguous tensors.
        query = tensor_model_parallel_all_gather(query.contiguous())
        key = tensor_model_parallel_all_gather(key.contiguous())
    return VisionTowerRun(None, features, query, key, attention.num_heads, attention.scale)


def check_head_size(vllm_config: VllmConfig) -> None:
    """
    Refuses, at load, an LLM whose attention head size vLLM's CPU attention does not support: vLLM itself starts such
    an engine, reports it healthy, and dies at the first request.
    """
    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    text_config = vllm_config.model_config.hf_config.text_config
    head_size = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(
            f"{vllm_config.model_config.model} has an LLM attention head size of {head_size} "
            f"(hidden_size {text_config.hidden_size} / {text_config.num_attention_heads} heads), which vLLM's CPU "
            f"attention does not support (head sizes {supported}): the first request would stop the engine. Serve it "
            "on a GPU, or give the LLM a supported head size (for the tiny builders: `Shapes(llm_heads=2, "
            "llm_kv_heads=2)` or `QwenShapes(llm_heads=2, llm_kv_heads=2)`, 64 / 2 = 32)."
        )


class ProfilingQuestionMixin:
    """
    vLLM's dummy (memory-profiling) text as a user turn of the family's chat format (`user_turn`, with `{media}` and
    `{question}`) asking `PROFILING_QUESTION`: the question is found in it as in a chat prompt, and profiling runs
    TGVC's text path like a real request.
    """

    user_turn: str

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        media = super().get_dummy_text(mm_counts)
        return self.user_turn.format(media=media, question=PROFILING_QUESTION) if media else media


class VisionTrimProcessorMixin:
    """Processing info that reads the folder's own VisionTrim processor (`auto_map`), not the stock class."""

    def get_hf_processor(self, **kwargs: object):
        processor = self.ctx.get_hf_processor(**kwargs)
        if not hasattr(processor, "guidance_tokenizer"):
            raise ValueError(
                f"{self.ctx.model_config.model} holds a {type(processor).__name__}, not a VisionTrim processor: serve "
                "a folder written by `visiontrim-convert` or `save_pretrained`, with --trust-remote-code."
            )
        return processor


class QuestionGuidanceMixin:
    """
    vLLM's multimodal processing plus the guidance of each item: the question of the prompt (or
    `mm_processor_kwargs["guidance_text"]`), tokenised by the folder's VisionTrim processor into the fields of
    `guidance_fields` (name -> modality), one row per item. The question is a processor option, so vLLM's cache keys
    include it.
    """

    guidance_fields: Mapping[str, str] = {"guidance_input_ids": "image", "guidance_attention_mask": "image"}
    # Whether a prompt in no known chat format was logged (with the text that guided TGVC) already.
    warned_unknown_format = False

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext):
        if "guidance_text" not in inputs.hf_processor_mm_kwargs and inputs.mm_data_items.get_all_counts():
            processor = self.info.get_hf_processor()
            prompt = self.info.get_tokenizer().decode(inputs.prompt)
            guidance = guidance_from_prompt(prompt, *processor.media_tokens)
            if not has_user_turn(prompt) and not QuestionGuidanceMixin.warned_unknown_format:
                QuestionGuidanceMixin.warned_unknown_format = True  # once per server process
                logger.warning(unknown_format_warning(guidance))
            inputs = replace(
                inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, "guidance_text": guidance}
            )
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        hf_kwargs = dict(hf_kwargs)
        guidance = hf_kwargs.pop("guidance_text", None)
        if not isinstance(guidance, str):
            raise ValueError(
                "mm_processor_kwargs['guidance_text'] must be one string, the text that guides TGVC for every image "
                f"and video of the prompt; got {type(guidance).__name__}."
            )
        processor = self.info.get_hf_processor(**hf_kwargs)
        guidance_length = len(processor.guidance_tokenizer(guidance)["input_ids"])
        if guidance_length > processor.guidance_max_length:
            logger.warning_once(
                "A guidance text is %d tokens, longer than the %d the guidance takes (the processor's "
                "guidance_max_length): TGVC is guided by its first ones only. Put the question first, or pass a "
                "shorter mm_processor_kwargs['guidance_text'] (with `vllm serve --trust-request-mm-kwargs`).",
                guidance_length,
                processor.guidance_max_length,
            )
        # One guidance text per prompt (vLLM's dummy text, LLaVA-NeXT, is one prompt); without text, for every item.
        return self.info.ctx.call_hf_processor(processor, hf_data, {**hf_kwargs, "guidance_text": [guidance]})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        guidance = {name: MultiModalFieldConfig.batched(modality) for name, modality in self.guidance_fields.items()}
        return {**fields, **guidance}


class UnservedArchitecture(nn.Module):
    """
    Stands for the VisionTrim architectures the plugin does not serve: refuses them at load. It declares the methods
    of vLLM's text-generation interface, which vLLM checks before building a model, so that the refusal below is what
    a user reads (vLLM would otherwise reject the architecture's runner with a message that names neither).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        architecture = vllm_config.model_config.hf_config.architectures[0]
        served = ", ".join(a.display_name for a in ARCHITECTURES if a.vllm_served)
        raise ValueError(
            f"{architecture} is not served by the VisionTrim vLLM plugin, which serves VisionTrim {served} folders; "
            "run this folder with Transformers (`AutoModelForImageTextToText.from_pretrained(path, "
            "trust_remote_code=True)`)."
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
