# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
VisionTrim LLaVA-1.5 and LLaVA-NeXT in vLLM: vLLM's own LLaVA models (their CLIP tower, projector and LLM, with their
fast kernels and tensor-parallel layers) with DVTS + TGVC run on each crop by the functions of
`compression_visiontrim`, the ones the Transformers classes call.

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
from vllm.distributed import tensor_model_parallel_all_gather
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
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..compression_visiontrim import (
    CompressedCrops,
    GuidanceEmbeddingCache,
    VisionTowerRun,
    anyres_image_tokens,
    compress_crops,
    record_outputs,
)
from ..configuration_visiontrim_llava import vision_attention_layer
from .vllm_common import (
    ProfilingQuestionMixin,
    QuestionGuidanceMixin,
    VisionTrimProcessorMixin,
    check_head_size,
    padded_guidance,
)
from .weight_names import vllm_weight_name


GUIDANCE_FIELDS = ("guidance_input_ids", "guidance_attention_mask")
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


class VisionTrimDummyInputsBuilder(ProfilingQuestionMixin, LlavaDummyInputsBuilder):
    user_turn = "USER: {media}\n{question} ASSISTANT:"


class VisionTrimMultiModalProcessor(QuestionGuidanceMixin, LlavaMultiModalProcessor):
    pass


class VisionTrimLlavaNextMultiModalProcessor(QuestionGuidanceMixin, LlavaNextMultiModalProcessor):
    pass


class VisionTrimVllmMixin:
    """
    What VisionTrim adds to a vLLM LLaVA model: the CLIP text tower, CLIP's `visual_projection` and `logit_scale`
    (loaded from the folder's `model.guidance_encoder.*`, `model.visual_projection.*`, `model.logit_scale`), and an
    `embed_multimodal` that compresses every crop of every image (`compress`) before the LLM sees it. A model class
    says how an image becomes crops (`image_crops`) and its compressed crops become LLM tokens (`image_tokens`).
    """

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
        with self._mark_tower_model(vllm_config, "image"):
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

    def image_crops(self, image_input: Mapping[str, object]) -> tuple[torch.Tensor, list[int]]:
        """The `(crops, 3, height, width)` pixels of the images and how many consecutive crops each has."""
        raise NotImplementedError

    def image_tokens(self, crop_features: torch.Tensor, crops_per_image: list[int]) -> MultiModalEmbeddings:
        """The LLM tokens of each image from its `(crops, visual_tokens, text_hidden)` projected compressed crops."""
        raise NotImplementedError

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        guidance = [kwargs.pop(name, None) for name in GUIDANCE_FIELDS]
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if not self.config.compression_enabled or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        crops, crops_per_image = self.image_crops(image_input)
        compressed = self.compress(crops, *guidance, crops_per_image)
        return self.image_tokens(self.multi_modal_projector(compressed.features), crops_per_image)

    def compress(
        self,
        crops: torch.Tensor,
        guidance_input_ids: torch.Tensor | list[torch.Tensor] | None,
        guidance_attention_mask: torch.Tensor | list[torch.Tensor] | None,
        crops_per_image: list[int],
    ) -> CompressedCrops:
        """
        DVTS + TGVC on `(crops, 3, height, width)` pixels: vLLM's vision tower runs with the scored layer's queries
        and keys recorded off its fused `qkv_proj`, and `compress_crops` keeps `config.visual_tokens` per crop.
        """
        attention = self.vision_tower.vision_model.encoder.layers[self.scored_layer].self_attn
        with record_outputs(attention.qkv_proj) as recorded:
            features = self.vision_tower(crops, feature_select_strategy=None)
        query, key, _ = recorded[attention.qkv_proj][0].chunk(3, dim=-1)
        if attention.tp_size > 1:  # each rank holds its share of the heads; DVTS averages over all of them
            # The chunks are views into the fused output; the CPU all-gather needs contiguous tensors.
            query = tensor_model_parallel_all_gather(query.contiguous())
            key = tensor_model_parallel_all_gather(key.contiguous())
        run = VisionTowerRun(None, features, query, key, attention.num_heads, attention.scale)
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
            crops_per_image,
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

        return AutoWeightsLoader(self).load_weights(renamed())


@MULTIMODAL_REGISTRY.register_processor(
    VisionTrimMultiModalProcessor, info=VisionTrimProcessingInfo, dummy_inputs=VisionTrimDummyInputsBuilder
)
class VisionTrimLlavaForConditionalGeneration(VisionTrimVllmMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 keeping `config.visual_tokens` DVTS + TGVC tokens per image."""

    def image_crops(self, image_input: Mapping[str, object]) -> tuple[torch.Tensor, list[int]]:
        pixel_values = image_input["pixel_values"]
        return pixel_values, [1] * pixel_values.shape[0]

    def image_tokens(self, crop_features: torch.Tensor, crops_per_image: list[int]) -> torch.Tensor:
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

    def image_crops(self, image_input: Mapping[str, object]) -> tuple[torch.Tensor, list[int]]:
        crops_per_image = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_input["image_sizes"].tolist()
        ]
        pixels = [image[:count] for image, count in zip(image_input["pixel_values"], crops_per_image, strict=True)]
        return torch.cat(pixels), crops_per_image

    def image_tokens(self, crop_features: torch.Tensor, crops_per_image: list[int]) -> list[torch.Tensor]:
        return anyres_image_tokens(
            crop_features, crops_per_image, self.image_newline if self.config.crop_newline else None
        )
