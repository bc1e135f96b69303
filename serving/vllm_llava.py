# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim LLaVA-1.5, LLaVA-NeXT and LLaVA-NeXT-Video in vLLM: vLLM's own LLaVA models (their CLIP tower, projector
and LLM, with their fast kernels and tensor-parallel layers) with DVTS + TGVC run on each crop (or video frame) by the
functions of `compression_visiontrim`, the ones the Transformers classes call.

The question reaches TGVC from an ordinary request: the multimodal processor reads the question out of the prompt (its
last user turn, as `VisionTrimProcessor` does) and hands it to the folder's VisionTrim processor, which tokenises it
for the CLIP text tower. vLLM keys its processor and encoder caches by a hash of each image and of the processor
options; the question is one of those options, so the same image asked a different question is encoded again, and
asked the same question is not. `mm_processor_kwargs={"guidance_text": ...}` chooses another guidance text.
"""

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers import CLIPTextModelWithProjection
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_next_video import (
    LlavaNextVideoDummyInputsBuilder,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoMultiModalProcessor,
    LlavaNextVideoProcessingInfo,
)
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..compression_visiontrim import CompressedCrops, GuidanceEmbeddingCache, anyres_image_tokens, compress_crops
from ..configuration_visiontrim_llava import vision_attention_layer
from .vllm_common import (
    GUIDANCE_INPUTS,
    ProfilingQuestionMixin,
    QuestionGuidanceMixin,
    VisionTrimProcessorMixin,
    check_head_size,
    padded_guidance,
    recorded_tower_run,
)
from .weight_names import vllm_weight_name


# The modules VisionTrim adds to vLLM's LLaVA (the CLIP text tower and head).
VISIONTRIM_MODULES = ("guidance_encoder.", "visual_projection.", "logit_scale")


class VisionTrimProcessingInfoMixin(VisionTrimProcessorMixin):
    """The folder's own VisionTrim processor (`auto_map`, not the stock class vLLM asks for) and its token counts."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """The placeholders the VisionTrim processor emits for an image of this size (`visual_tokens` per crop)."""
        counts = self.get_hf_processor()._get_num_multimodal_tokens(image_sizes=[(image_height, image_width)])
        return counts.num_image_tokens[0]


class VisionTrimProcessingInfo(VisionTrimProcessingInfoMixin, LlavaProcessingInfo):
    pass


class VisionTrimLlavaNextProcessingInfo(VisionTrimProcessingInfoMixin, LlavaNextProcessingInfo):
    pass


class VisionTrimLlavaNextVideoProcessingInfo(VisionTrimProcessorMixin, LlavaNextVideoProcessingInfo):
    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        """
        The placeholders the VisionTrim processor emits for a video: `visual_tokens` per frame (a frame is resized to
        the tower's input size, so its own size does not matter); stock pooled frames without compression.
        """
        processor = self.get_hf_processor()
        if processor.reduction_ratio == 0:
            return super().get_num_video_tokens(
                image_width=image_width, image_height=image_height, num_frames=num_frames
            )
        return num_frames * processor.visual_tokens


LLAVA_USER_TURN = "USER: {media}\n{question} ASSISTANT:"


class VisionTrimDummyInputsBuilder(ProfilingQuestionMixin, LlavaDummyInputsBuilder):
    user_turn = LLAVA_USER_TURN


class VisionTrimLlavaNextVideoDummyInputsBuilder(ProfilingQuestionMixin, LlavaNextVideoDummyInputsBuilder):
    user_turn = LLAVA_USER_TURN


class VisionTrimMultiModalProcessor(QuestionGuidanceMixin, LlavaMultiModalProcessor):
    pass


class VisionTrimLlavaNextMultiModalProcessor(QuestionGuidanceMixin, LlavaNextMultiModalProcessor):
    pass


class VisionTrimLlavaNextVideoMultiModalProcessor(QuestionGuidanceMixin, LlavaNextVideoMultiModalProcessor):
    guidance_fields = {name: "video" for name in GUIDANCE_INPUTS["video"]}


class VisionTrimVllmMixin:
    """
    What VisionTrim adds to a vLLM LLaVA model: the CLIP text tower, CLIP's `visual_projection` and `logit_scale`
    (loaded from the folder's `model.guidance_encoder.*`, `model.visual_projection.*`, `model.logit_scale`), and an
    `embed_multimodal` that compresses every crop of every image (video: every frame) with `compress` before the LLM
    sees it. A model class says which `modality` it compresses, how its input becomes crops (`media_crops`) and its
    compressed crops become LLM tokens (`media_tokens`).
    """

    modality = "image"
    # Checkpoint weights the vLLM model has no place for (those of a modality vLLM's class does not take).
    unserved_weights: tuple[str, ...] = ()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if config.llm_stage_enabled:
            raise ValueError(
                f"{vllm_config.model_config.model} has the LLM stage on (llm_stage_layer={config.llm_stage_layer}), "
                "which the vLLM plugin does not run: vLLM's paged KV cache has no way to drop tokens in the middle of "
                'prefill. Serve a copy whose config.json has `"llm_stage_layer": null` (vision stage only), or run '
                "this folder with Transformers."
            )
        check_head_size(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        with self._mark_tower_model(vllm_config, self.modality):
            self.guidance_encoder = CLIPTextModelWithProjection(config.guidance_config)
            self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.zeros(()))
        self.guidance_cache = GuidanceEmbeddingCache(config)
        self.scored_layer = vision_attention_layer(
            config.vision_feature_layer,
            config.vision_feature_select_strategy,
            config.vision_config.num_hidden_layers,
            type(config).__name__,
        )

    def media_input(self, **kwargs: object) -> Mapping[str, object] | None:
        """vLLM's parsed input of the model's modality (None without one)."""
        return self._parse_and_validate_image_input(**kwargs)

    def stock_embeddings(self, media_input: Mapping[str, object]) -> MultiModalEmbeddings:
        """The stock class's embeddings of the input (compression off, or precomputed embeddings)."""
        return self._process_image_input(media_input)

    def media_crops(self, media_input: Mapping[str, object]) -> tuple[torch.Tensor, list[int]]:
        """The `(crops, 3, height, width)` pixels of the items and how many consecutive crops (frames) each has."""
        raise NotImplementedError

    def media_tokens(self, crop_features: torch.Tensor, crops_per_item: list[int]) -> MultiModalEmbeddings:
        """The LLM tokens of each item from its `(crops, visual_tokens, text_hidden)` projected compressed crops."""
        raise NotImplementedError

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        guidance = [kwargs.pop(name, None) for name in GUIDANCE_INPUTS[self.modality]]
        media_input = self.media_input(**kwargs)
        if media_input is None:
            return []
        if not self.config.compression_enabled or not media_input["type"].startswith("pixel_values"):
            return self.stock_embeddings(media_input)
        crops, crops_per_item = self.media_crops(media_input)
        compressed = self.compress(crops, *guidance, crops_per_item)
        return self.media_tokens(self.multi_modal_projector(compressed.features), crops_per_item)

    def compress(
        self,
        crops: torch.Tensor,
        guidance_input_ids: torch.Tensor | list[torch.Tensor] | None,
        guidance_attention_mask: torch.Tensor | list[torch.Tensor] | None,
        crops_per_item: list[int],
    ) -> CompressedCrops:
        """
        DVTS + TGVC on `(crops, 3, height, width)` pixels: vLLM's vision tower runs with the scored layer's queries
        and keys recorded off its fused `qkv_proj`, and `compress_crops` keeps `config.visual_tokens` per crop.
        """
        attention = self.vision_tower.vision_model.encoder.layers[self.scored_layer].self_attn
        run = recorded_tower_run(self.vision_tower, attention, crops, feature_select_strategy=None)
        if guidance_input_ids is not None:
            guidance_input_ids, guidance_attention_mask = padded_guidance(guidance_input_ids, guidance_attention_mask)
        return compress_crops(
            run,
            self.config,
            self.visual_projection,
            self.logit_scale,
            self.guidance_encoder,
            guidance_input_ids,
            guidance_attention_mask,
            crops_per_item,
            GUIDANCE_INPUTS[self.modality][0].removesuffix("_input_ids"),
            guidance_cache=self.guidance_cache if self.config.guidance_cache_size > 0 else None,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """
        The checkpoint's weights under vLLM's names (`vllm_weight_name`). VisionTrim's own modules have no vLLM weight
        loaders, so their weights are cast to the serving dtype here (as vLLM's loaders do for its modules).
        """
        own_dtypes = {
            name: parameter.dtype for name, parameter in self.named_parameters() if name.startswith(VISIONTRIM_MODULES)
        }

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, weight in weights:
                name = vllm_weight_name(name)
                yield name, weight.to(own_dtypes[name]) if name in own_dtypes else weight

        return AutoWeightsLoader(self, ignore_unexpected_prefixes=list(self.unserved_weights)).load_weights(renamed())


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimMultiModalProcessor, info=VisionTrimProcessingInfo, dummy_inputs=VisionTrimDummyInputsBuilder
)
class VisionTrimLlavaForConditionalGeneration(VisionTrimVllmMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 keeping `config.visual_tokens` DVTS + TGVC tokens per image."""

    def media_crops(self, media_input: Mapping[str, object]) -> tuple[torch.Tensor, list[int]]:
        pixel_values = media_input["pixel_values"]
        return pixel_values, [1] * pixel_values.shape[0]

    def media_tokens(self, crop_features: torch.Tensor, crops_per_item: list[int]) -> torch.Tensor:
        return crop_features


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimLlavaNextMultiModalProcessor,
    info=VisionTrimLlavaNextProcessingInfo,
    dummy_inputs=VisionTrimDummyInputsBuilder,
)
class VisionTrimLlavaNextForConditionalGeneration(VisionTrimVllmMixin, LlavaNextForConditionalGeneration):
    """
    vLLM's LLaVA-NeXT keeping `config.visual_tokens` DVTS + TGVC tokens per crop (base view, then the high-res crops),
    each crop followed by `image_newline` when `config.crop_newline` is set, as the Transformers class lays them out.
    """

    def media_crops(self, media_input: Mapping[str, object]) -> tuple[torch.Tensor, list[int]]:
        crops_per_image = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in media_input["image_sizes"].tolist()
        ]
        pixels = [image[:count] for image, count in zip(media_input["pixel_values"], crops_per_image, strict=True)]
        return torch.cat(pixels), crops_per_image

    def media_tokens(self, crop_features: torch.Tensor, crops_per_item: list[int]) -> list[torch.Tensor]:
        return anyres_image_tokens(
            crop_features, crops_per_item, self.image_newline if self.config.crop_newline else None
        )


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimLlavaNextVideoMultiModalProcessor,
    info=VisionTrimLlavaNextVideoProcessingInfo,
    dummy_inputs=VisionTrimLlavaNextVideoDummyInputsBuilder,
)
class VisionTrimLlavaNextVideoForConditionalGeneration(VisionTrimVllmMixin, LlavaNextVideoForConditionalGeneration):
    """
    vLLM's LLaVA-NeXT-Video (videos only, as vLLM serves it) keeping `config.visual_tokens` DVTS + TGVC tokens per
    frame, each frame compressed on its full patch grid with the spatial pooling skipped, all frames of a video guided
    by its question: the Transformers class's video path.
    """

    modality = "video"
    unserved_weights = ("image_newline",)

    def media_input(self, **kwargs: object) -> Mapping[str, object] | None:
        return self._parse_and_validate_video_input(**kwargs)

    def stock_embeddings(self, media_input: Mapping[str, object]) -> MultiModalEmbeddings:
        return self._process_video_pixels(media_input)

    def media_crops(self, media_input: Mapping[str, object]) -> tuple[torch.Tensor, list[int]]:
        videos = list(media_input["pixel_values_videos"])  # `(videos, frames, ...)` or one `(frames, ...)` per video
        return torch.cat(videos), [video.shape[0] for video in videos]

    def media_tokens(self, crop_features: torch.Tensor, crops_per_item: list[int]) -> list[torch.Tensor]:
        return [frames.flatten(0, 1) for frames in crop_features.split(crops_per_item)]
