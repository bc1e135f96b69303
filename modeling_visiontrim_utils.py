# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Modeling utilities every VisionTrim family shares: the guidance inputs' names, binding a stock `forward`'s arguments,
the generation base class and the stock `forward` with the guidance inputs in its signature.
"""

import functools
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_visiontrim import CompressionSettings


# The pixels input of each modality, and its guidance inputs (the processor's names, one row per image or video).
MEDIA_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}
GUIDANCE_INPUTS = {
    "image": ("guidance_input_ids", "guidance_attention_mask"),
    "video": ("video_guidance_input_ids", "video_guidance_attention_mask"),
}
GUIDANCE_DOCSTRING = r"""
        {ids} (`torch.LongTensor` of shape `({unit}s, text)`, *optional*):
            CLIP-tokenised guidance text of each {unit}, shared by all its crops or frames (the VisionTrim processor
            returns it); needed when TGVC is on.
        {mask} (`torch.Tensor` of shape `({unit}s, text)`, *optional*):
            Mask of `{ids}`; a row of zeros marks an empty guidance text.
"""


@functools.cache
def signature_of(function: Callable) -> inspect.Signature:
    """`inspect.signature(function)`, cached: a base model reads its stock methods' signatures at every call."""
    return inspect.signature(function)


def forward_inputs(stock_forward: Callable, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """
    The arguments of a call to `stock_forward` (a bound method) by name, its `**kwargs` spread out, and the guidance
    inputs (`GUIDANCE_INPUTS`) taken out of them: `(inputs, guidance)`.
    """
    inputs = signature_of(stock_forward.__func__).bind(stock_forward.__self__, *args, **kwargs).arguments
    inputs.pop("self")
    inputs.update(inputs.pop("kwargs", {}))
    guidance = {name: inputs.pop(name) for names in GUIDANCE_INPUTS.values() for name in names if name in inputs}
    return inputs, guidance


def guidance_docstring(*modalities: str) -> str:
    return "".join(
        GUIDANCE_DOCSTRING.format(ids=ids, mask=mask, unit=m) for m in modalities for ids, mask in [GUIDANCE_INPUTS[m]]
    )


class VisionTrimGenerationMixin:
    """
    What VisionTrim adds to a generation class, whatever the family: its base model is the VisionTrim one
    (`base_model_class`), built in place of the stock one, and a weight file that cannot be read is named. Its
    `forward` is the stock one with the guidance inputs in the signature (`with_guidance_inputs`).
    """

    base_model_class: type[PreTrainedModel]

    def __init__(self, config: CompressionSettings):
        PreTrainedModel.__init__(self, config)
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a weight file that cannot be read is named in the error."""
        from safetensors import SafetensorError, safe_open

        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            damaged = []
            for path in sorted(Path(pretrained_model_name_or_path).glob("*.safetensors")):
                try:
                    with safe_open(path, "pt") as weights:
                        weights.keys()
                except SafetensorError:
                    damaged.append(str(path))
            where = ", ".join(damaged) or f"a weight file of {pretrained_model_name_or_path}"
            raise OSError(
                f"{where} cannot be read as safetensors ({error}): the file is damaged or incomplete. Download or "
                "copy it again; `python -m visiontrim verify FOLDER` checks a converted folder's files."
            ) from error


def with_guidance_inputs(forward: Callable, *modalities: str) -> Callable:
    """
    A generation class's stock `forward` with the guidance inputs of `modalities` in its signature, where `generate()`
    looks for the kwargs it accepts; they travel in `**kwargs` to the base model. `labels` are refused while the LLM
    stage is on: its logits then cover the kept positions only.
    """
    signature = inspect.signature(forward)
    *parameters, var_keyword = signature.parameters.values()
    guidance = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=torch.Tensor | None)
        for modality in modalities
        for name in GUIDANCE_INPUTS[modality]
    ]
    signature = signature.replace(parameters=[*parameters, *guidance, var_keyword])

    @functools.wraps(forward)
    def forward_with_guidance(self, *args, **kwargs):
        if self.config.llm_stage_enabled and signature.bind(self, *args, **kwargs).arguments.get("labels") is not None:
            raise ValueError(
                "The LLM stage drops visual positions inside the LLM, so its logits do not line up with `labels`: "
                "compute the loss with `config.llm_stage_layer=None`."
            )
        return forward(self, *args, **kwargs)

    forward_with_guidance.__signature__ = signature
    forward_with_guidance.__doc__ = (
        f"`{forward.__qualname__}` plus the guidance text:\n{guidance_docstring(*modalities)}"
    )
    return forward_with_guidance


__all__ = [
    "GUIDANCE_INPUTS",
    "MEDIA_PIXELS",
    "VisionTrimGenerationMixin",
    "forward_inputs",
    "guidance_docstring",
    "signature_of",
    "with_guidance_inputs",
]
