# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Modeling utilities every VisionTrim family shares: the guidance inputs' names, binding a stock `forward`'s arguments,
the generation base class and the stock `forward` with the guidance inputs in its signature.
"""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

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


@dataclass
class VisionTrimEncoderOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`list[torch.FloatTensor]` or `torch.FloatTensor`):
        The projected tokens given to the LLM, in the stock class's layout: per image a `(tokens, text_hidden)` tensor
        (LLaVA, LLaVA-NeXT, LLaVA-OneVision), or one tensor (Video-LLaVA images `(images, tokens, text_hidden)`,
        Video-LLaVA videos `(videos * frames, tokens, text_hidden)`, LLaVA-NeXT-Video and LLaVA-OneVision videos
        `(videos, frames * tokens (+ 1 newline for OneVision), text_hidden)`).
    dominant_indices (`torch.LongTensor` of shape `(crops, dominant_tokens)`):
        Raster indices, in each crop's (or frame's) grid, of the tokens DVTS kept (ascending).
    complement_seed_indices (`torch.LongTensor` of shape `(crops, complement_tokens)`):
        Raster indices of the TGVC seed tokens the other tokens were merged into (ascending).
    """

    dominant_indices: torch.LongTensor | None = None
    complement_seed_indices: torch.LongTensor | None = None


class EncodeMediaFirstMixin:
    """
    What the base models of the crop families (LLaVA, LLaVA-OneVision) share: `forward` encodes the images and videos
    with their guidance before the stock `forward` runs, and the placeholder counts are checked against the budget
    with an error that says what to change.
    """

    def language_model_inputs(self, inputs: dict) -> dict:
        """Extra inputs of the stock `forward` once the media are encoded (the LLaVA family's LLM stage); none here."""
        return {}

    def describe_budget(self, modality: str) -> str:
        """The visual tokens a `modality` item keeps, for error messages."""
        return self.config.describe_budget()

    def encoder_output(self, run, compressed, features: list[torch.Tensor] | torch.Tensor) -> VisionTrimEncoderOutput:
        """
        `get_*_features`' output: the tower's outputs (of a `VisionTowerRun`), the kept tokens' indices (of the
        compression) and the projected `features`.
        """
        return VisionTrimEncoderOutput(
            last_hidden_state=run.outputs.last_hidden_state,
            pooler_output=features,
            hidden_states=run.outputs.hidden_states,
            attentions=run.outputs.attentions,
            dominant_indices=compressed.dominant_indices,
            complement_seed_indices=compressed.complement_seed_indices,
        )

    def forward(self, *args, **kwargs):
        """
        The stock `forward`, with the images and videos encoded first, as `generate()` encodes them: each
        `get_*_features` is given the inputs its signature names (pixels, sizes, feature layer and guidance), so the
        guidance reaches the vision stage and never the LLM. Pixels of no image (an empty batch) are handed over as
        they are.
        """
        stock_forward = super().forward
        inputs, guidance = forward_inputs(stock_forward, args, kwargs)
        encoded = dict(inputs.get("mm_encoder_outputs") or {})
        for modality, pixels_name in MEDIA_PIXELS.items():
            pixels = inputs.get(pixels_name)
            if pixels is None or pixels.size(0) == 0 or encoded.get(modality) is not None:
                continue
            encoder = getattr(self, f"get_{modality}_features")
            available = {**inputs, **guidance}
            names = [name for name in signature_of(encoder.__func__).parameters if name in available]
            encoded[modality] = encoder(**{name: available[name] for name in names}, return_dict=True)
            inputs[pixels_name] = None
        if encoded:
            inputs["mm_encoder_outputs"] = encoded
        return stock_forward(**inputs, **self.language_model_inputs(inputs))

    def check_placeholder_count(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor | None,
        modality: str,
    ) -> None:
        """
        Raises a `ValueError` naming the budget unless the prompts hold one `modality` placeholder per feature (found
        in `input_ids`, or without them as the placeholder's embedding in `inputs_embeds`).
        """
        if features is None:
            return
        token_id = getattr(self.config, f"{modality}_token_id")
        if input_ids is not None:
            is_placeholder = input_ids == token_id
        else:
            placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            is_placeholder = (inputs_embeds == placeholder.to(inputs_embeds.dtype)).all(dim=-1)
        num_placeholders, num_features = int(is_placeholder.sum()), features.numel() // inputs_embeds.shape[-1]
        if num_placeholders != num_features:
            raise ValueError(
                f"The prompts hold {num_placeholders} {modality} placeholder tokens but the {modality}s give "
                f"{num_features} visual tokens: this model keeps {self.describe_budget(modality)}. Build the inputs "
                "with the VisionTrim processor saved with the model, or give the processor the same settings as the "
                "model config (a stock processor emits every patch token)."
            )

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The stock placeholder mask(s), after checking the counts (`video_features` only for the video models)."""
        self.check_placeholder_count(input_ids, inputs_embeds, image_features, "image")
        self.check_placeholder_count(input_ids, inputs_embeds, video_features, "video")
        if video_features is None:
            return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
        return super().get_placeholder_mask(
            input_ids, inputs_embeds=inputs_embeds, image_features=image_features, video_features=video_features
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
    "EncodeMediaFirstMixin",
    "VisionTrimEncoderOutput",
    "VisionTrimGenerationMixin",
    "forward_inputs",
    "guidance_docstring",
    "signature_of",
    "with_guidance_inputs",
]
