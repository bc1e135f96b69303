# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
PyTorch VisionTrim LLaVA-OneVision: every image crop and every pooled video frame is compressed by DVTS + TGVC before
the LLM. Only what differs from the stock classes is stated here; the algorithm is the core's (`compress_grids`):
SigLIP has no CLS token, so DVTS's global term is the attention each token receives at the scored layer; the
checkpoints carry no CLIP text tower, so TGVC compares the projected tokens with the question embedded by the LLM's
input embeddings; the crops are fixed grids (27 x 27 patches for SigLIP-so400m at 384 px, 14 x 14 pooled tokens per
video frame).
"""

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

from .compression_visiontrim import (
    CompressedTokens,
    VisionTowerRun,
    anyres_image_tokens,
    compress_pooled_crops,
    run_vision_tower,
)
from .configuration_visiontrim_llava_onevision import VisionTrimLlavaOnevisionConfig
from .modeling_visiontrim_utils import (
    EncodeMediaFirstMixin,
    VisionTrimEncoderOutput,
    VisionTrimGenerationMixin,
    with_guidance_inputs,
)


class VisionTrimLlavaOnevisionModel(EncodeMediaFirstMixin, LlavaOnevisionModel):
    """
    `LlavaOnevisionModel` whose image features are, per crop (base view first, then the high-res crops in raster
    order; one crop per image of a multi-image prompt), `config.visual_tokens` DVTS + TGVC tokens followed by
    `image_newline` when `config.crop_newline` is set, and whose video features are `config.frame_tokens` tokens per
    pooled frame, then one `image_newline`. With `reduction_ratio=0` it is the stock model.
    """

    config: VisionTrimLlavaOnevisionConfig

    def describe_budget(self, modality: str) -> str:
        return self.config.describe_budget(modality)

    def run_tower(self, pixel_values: torch.Tensor, vision_feature_layer: int, **tower_kwargs) -> VisionTowerRun:
        """SigLIP on `(items, 3, height, width)` crops (frames), the scored layer's queries and keys recorded."""
        num_layers = self.config.vision_config.num_hidden_layers
        layer_index = vision_feature_layer % (num_layers + 1) - 1
        return run_vision_tower(self.vision_tower, pixel_values, vision_feature_layer, layer_index, **tower_kwargs)

    def compress_run(
        self,
        modality: str,
        run: VisionTowerRun,
        items_per_media: list[int],
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
    ) -> CompressedTokens:
        """
        DVTS + TGVC on a tower run of crops (video frames, `modality="video"`): `config.visual_tokens` tokens per
        crop, `config.frame_tokens` per frame on its pooled grid; `features` are the `(items, kept, text_hidden)`
        kept tokens. `items_per_media`: how many consecutive crops (frames) each image (video) has.
        """
        video = modality == "video"  # OneVision pools each frame 2 x 2: its global term and LTAM's features likewise
        return compress_pooled_crops(
            run,
            self.multi_modal_projector(run.features),
            self.apply_pooling if video else None,
            self.config,
            self.config.frame_tokens if video else self.config.visual_tokens,
            items_per_media,
            self.get_input_embeddings(),
            guidance_input_ids,
            guidance_attention_mask,
            modality,
        )

    def image_output(
        self,
        run: VisionTowerRun,
        crops_per_image: list[int],
        guidance_input_ids: torch.LongTensor | None,
        guidance_attention_mask: torch.Tensor | None,
    ) -> VisionTrimEncoderOutput:
        """The images' encoder output from a tower run of their crops: each crop's kept tokens, then its newline."""
        compressed = self.compress_run("image", run, crops_per_image, guidance_input_ids, guidance_attention_mask)
        newline = self.image_newline if self.config.crop_newline else None
        return self.encoder_output(run, compressed, anyres_image_tokens(compressed.features, crops_per_image, newline))

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        guidance_input_ids: torch.LongTensor | None = None,
        guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(images, max_crops, 3, height, width)` pixels (or their `(crops, 3, height, width)` concatenation) and
        keeps `config.visual_tokens` tokens per crop, all crops of an image guided by its `(images, text)` guidance.
        An image of a prompt with several images (`batch_num_images`) is one crop, as in stock. Each image gives
        `crops * (visual_tokens + crop_newline)` tokens. With compression off this is the stock method.
        """
        if not self.config.compression_enabled:
            return super().get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                vision_aspect_ratio=vision_aspect_ratio,
                batch_num_images=batch_num_images,
                **kwargs,
            )
        if batch_num_images is None:
            need_patching = [True] * len(image_sizes)
        else:
            need_patching = [count == 1 for count in batch_num_images for _ in range(count)]
        crops_per_image = [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            if patched
            else 1
            for size, patched in zip(image_sizes, need_patching, strict=True)
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat(
                [pixels[:count] for pixels, count in zip(pixel_values, crops_per_image, strict=True)]
            )
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(crops_per_image):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, crops, channels, height, "
                f"width) or the {sum(crops_per_image)} crops (crops, channels, height, width) that image_sizes and "
                "batch_num_images give; pass the processor's pixel_values, image_sizes and batch_num_images together."
            )
        run = self.run_tower(pixel_values, vision_feature_layer, **kwargs)
        return self.image_output(run, crops_per_image, guidance_input_ids, guidance_attention_mask)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        video_guidance_input_ids: torch.LongTensor | None = None,
        video_guidance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        Encodes `(videos, frames, 3, height, width)` pixels and keeps `config.frame_tokens` of each frame's pooled
        tokens, all frames of a video guided by its `(videos, text)` guidance: `(videos, frames * frame_tokens + 1,
        text_hidden)`, the last row `image_newline` as in stock. With compression off this is the stock method.
        """
        if not self.config.compression_enabled:
            return super().get_video_features(
                pixel_values_videos,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        videos, frames = pixel_values_videos.shape[:2]
        run = self.run_tower(pixel_values_videos.flatten(0, 1), vision_feature_layer, **kwargs)
        compressed = self.compress_run(
            "video", run, [frames] * videos, video_guidance_input_ids, video_guidance_attention_mask
        )
        tokens = compressed.features.unflatten(0, (videos, frames)).flatten(1, 2)
        newline = self.image_newline.to(tokens)[None, None].expand(videos, 1, -1)
        features = torch.cat([tokens, newline], dim=1)
        return self.encoder_output(run, compressed, features)


class VisionTrimLlavaOnevisionForConditionalGeneration(
    VisionTrimGenerationMixin, LlavaOnevisionForConditionalGeneration
):
    """
    LLaVA-OneVision with VisionTrim: image crops and pooled video frames are each compressed by DVTS + TGVC, guided by
    their prompt's question in the LLM's embedding space. Inputs come from `VisionTrimLlavaOnevisionProcessor`.
    """

    config: VisionTrimLlavaOnevisionConfig
    base_model_class = VisionTrimLlavaOnevisionModel
    forward = with_guidance_inputs(LlavaOnevisionForConditionalGeneration.forward, "image", "video")


# Custom classes skip Transformers' llava-hf key renaming unless it is registered for them.
register_checkpoint_conversion_mapping(
    VisionTrimLlavaOnevisionForConditionalGeneration.__name__,
    get_checkpoint_conversion_mapping("llava_onevision"),
    overwrite=True,
)
VisionTrimLlavaOnevisionForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["VisionTrimLlavaOnevisionForConditionalGeneration", "VisionTrimLlavaOnevisionModel"]
