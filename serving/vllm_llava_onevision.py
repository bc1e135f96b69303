# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim LLaVA-OneVision in vLLM: vLLM's own LLaVA-OneVision (its SigLIP tower, projector and Qwen2 LLM, with their
fast kernels and tensor-parallel layers) with DVTS + TGVC run on every image crop and every pooled video frame by
`compress_pooled_crops`, the function the Transformers class calls. The question reaches TGVC as for the other
families: read out of the prompt by the multimodal processor (`QuestionGuidanceMixin`), tokenised by the folder's
processor in the LLM's vocabulary, embedded by the LLM's input embeddings.

vLLM's OneVision encodes every image of a prompt as anyres crops (Transformers encodes the images of a multi-image
prompt as one crop each); the served folder keeps vLLM's layout, each crop's kept tokens followed by `image_newline`.
"""

from collections.abc import Iterable, Mapping

import torch
from transformers import BatchFeature
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageEmbeddingInputs,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..compression_visiontrim import CompressedTokens, anyres_image_tokens, compress_pooled_crops
from .vllm_common import (
    GUIDANCE_FIELDS,
    GUIDANCE_INPUTS,
    ProfilingQuestionMixin,
    QuestionGuidanceMixin,
    VisionTrimProcessorMixin,
    check_head_size,
    padded_guidance,
    recorded_tower_run,
)
from .weight_names import vllm_weight_name


# OneVision's ChatML user turn, for vLLM's profiling prompt.
ONEVISION_USER_TURN = "<|im_start|>user\n{media}\n{question}<|im_end|>\n<|im_start|>assistant\n"


class VisionTrimLlavaOnevisionProcessingInfo(VisionTrimProcessorMixin, LlavaOnevisionProcessingInfo):
    """The folder's VisionTrim processor and its counts: `crops * (visual_tokens + 1)` per image, per video frames."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        processor = self.get_hf_processor()
        if processor.reduction_ratio == 0:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return processor.image_tokens((image_height, image_width), single=True)

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        processor = self.get_hf_processor()
        if processor.reduction_ratio == 0:
            return super().get_num_video_tokens(
                image_width=image_width, image_height=image_height, num_frames=num_frames
            )
        return processor.video_tokens(num_frames)


class VisionTrimLlavaOnevisionDummyInputsBuilder(ProfilingQuestionMixin, LlavaOnevisionDummyInputsBuilder):
    user_turn = ONEVISION_USER_TURN


class VisionTrimLlavaOnevisionMultiModalProcessor(QuestionGuidanceMixin, LlavaOnevisionMultiModalProcessor):
    guidance_fields = GUIDANCE_FIELDS

    def _postprocess_hf_mm_data(
        self, mm_inputs: Mapping[str, object], hf_processor_mm_kwargs: Mapping[str, object], processed: BatchFeature
    ) -> BatchFeature:
        """
        The processed media plus each item's guidance (vLLM's OneVision processing calls the folder's processor once
        per video, keeping only its pixels, so the rows are made here, one per item, from the prompt's question).
        """
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed)
        guidance = hf_processor_mm_kwargs.get("guidance_text")
        if not isinstance(guidance, str):
            return processed
        processor = self.info.get_hf_processor()
        for modality, pixels_name in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            count = len(processed.get(pixels_name, []))
            if count:
                prefix = GUIDANCE_INPUTS[modality][0].removesuffix("_input_ids")
                processed.update(processor.tokenize_guidance([guidance] * count, prefix, "pt"))
        return processed


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimLlavaOnevisionMultiModalProcessor,
    info=VisionTrimLlavaOnevisionProcessingInfo,
    dummy_inputs=VisionTrimLlavaOnevisionDummyInputsBuilder,
)
class VisionTrimLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """
    vLLM's LLaVA-OneVision keeping `config.visual_tokens` DVTS + TGVC tokens per image crop (base view, then the
    high-res crops, each followed by `image_newline` when `config.crop_newline` is set) and `config.frame_tokens` per
    pooled video frame (then one `image_newline`), as the Transformers class lays them out.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_head_size(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        layers = self.config.vision_config.num_hidden_layers
        self.scored_layer = self.config.vision_feature_layer % (layers + 1) - 1

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        guidance = {
            modality: [kwargs.pop(name, None) for name in names] for modality, names in GUIDANCE_INPUTS.items()
        }
        if not self.config.compression_enabled:
            return super().embed_multimodal(**kwargs)
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, media in self._parse_and_validate_multimodal_inputs(**kwargs).items():  # in prompt order
            if isinstance(media, LlavaOnevisionImageEmbeddingInputs):  # precomputed embeddings
                embeddings += tuple(self._process_image_input(media))
            elif modality == "image":
                embeddings += tuple(self.image_tokens(media, *guidance["image"]))
            else:
                embeddings += tuple(self.video_tokens(media, *guidance["video"]))
        return embeddings

    def image_tokens(self, media: Mapping[str, object], *guidance) -> list[torch.Tensor]:
        """Each image's tokens: its crops' kept tokens, each crop followed by `image_newline` (`crop_newline`)."""
        crops_per_image = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in media["image_sizes"].tolist()
        ]
        crops = torch.cat([image[:count] for image, count in zip(media["pixel_values"], crops_per_image, strict=True)])
        compressed = self.compress("image", crops, crops_per_image, *guidance)
        newline = self.image_newline if self.config.crop_newline else None
        return anyres_image_tokens(compressed.features, crops_per_image, newline)

    def video_tokens(self, media: Mapping[str, object], *guidance) -> list[torch.Tensor]:
        """Each video's tokens: its frames' kept tokens, then one `image_newline`, as stock OneVision."""
        videos = list(media["pixel_values_videos"])  # `(videos, frames, ...)` or one `(frames, ...)` per video
        frames = [video.shape[0] for video in videos]
        compressed = self.compress("video", torch.cat(videos), frames, *guidance)
        newline = self.image_newline[None]
        return [torch.cat([kept.flatten(0, 1), newline.to(kept)]) for kept in compressed.features.split(frames)]

    def compress(
        self,
        modality: str,
        pixels: torch.Tensor,
        items_per_media: list[int],
        guidance_input_ids: torch.Tensor | list[torch.Tensor] | None,
        guidance_attention_mask: torch.Tensor | list[torch.Tensor] | None,
    ) -> CompressedTokens:
        """
        DVTS + TGVC on `(items, 3, height, width)` crops (frames): vLLM's SigLIP runs with the scored layer's queries
        and keys recorded, and `compress_pooled_crops` keeps `config.visual_tokens` per crop (`config.frame_tokens`
        per pooled frame).
        """
        attention = self.vision_tower.vision_model.encoder.layers[self.scored_layer].self_attn
        strategy = self.config.vision_feature_select_strategy
        run = recorded_tower_run(self.vision_tower, attention, pixels, feature_select_strategy=strategy)
        if guidance_input_ids is not None:
            guidance_input_ids, guidance_attention_mask = padded_guidance(guidance_input_ids, guidance_attention_mask)
        video = modality == "video"
        return compress_pooled_crops(
            run,
            self.multi_modal_projector(run.features),
            self.apply_pooling if video else None,
            self.config,
            self.config.frame_tokens if video else self.config.visual_tokens,
            items_per_media,
            self.language_model.embed_input_ids,
            guidance_input_ids,
            guidance_attention_mask,
            modality,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's weights under vLLM's names, whichever layout the folder was saved in."""
        return AutoWeightsLoader(self).load_weights((vllm_weight_name(name), weight) for name, weight in weights)
