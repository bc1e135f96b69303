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
from dataclasses import replace

import torch
from torch import nn
from transformers import BatchFeature, CLIPTextModelWithProjection
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.logger import init_logger
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
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import ProcessorInputs, TimingContext
from vllm.platforms import current_platform

from ..architectures import ARCHITECTURES
from ..compression_visiontrim import (
    CompressedCrops,
    GuidanceEmbeddingCache,
    VisionTowerRun,
    anyres_image_tokens,
    compress_crops,
    record_outputs,
)
from ..configuration_visiontrim_llava import vision_attention_layer
from ..processing_visiontrim import guidance_from_prompt, has_user_turn, unknown_format_warning
from .weight_names import vllm_weight_name


# Under vLLM's "vllm" logger, whose handler vLLM sets up: the processor's own warnings go to a logger that `vllm serve`
# leaves at level ERROR.
logger = init_logger(f"vllm.{__name__}")

# What a dummy (memory-profiling) prompt asks, so that profiling runs TGVC's text path like a real request.
PROFILING_QUESTION = "What is shown in the image?"
GUIDANCE_FIELDS = ("guidance_input_ids", "guidance_attention_mask")
# The modules VisionTrim adds to vLLM's LLaVA (the CLIP text tower and head).
VISIONTRIM_MODULES = ("guidance_encoder.", "visual_projection.", "logit_scale")


def padded_guidance(
    input_ids: torch.Tensor | list[torch.Tensor], attention_mask: torch.Tensor | list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The guidance rows of a batch of images as `(images, text)` tensors: vLLM stacks the rows of images from one request
    (same length) and gives a list of `(text,)` rows when requests' questions differ in length.
    """
    if isinstance(input_ids, torch.Tensor):
        return input_ids, attention_mask
    return (
        nn.utils.rnn.pad_sequence(list(input_ids), batch_first=True),
        nn.utils.rnn.pad_sequence(list(attention_mask), batch_first=True),
    )


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
            "on a GPU, or give the LLM a supported head size (for the tiny builder: "
            "`build_config(Shapes(llm_heads=2, llm_kv_heads=2), ...)`, 64 / 2 = 32)."
        )


class VisionTrimProcessingInfoMixin:
    """The folder's own VisionTrim processor (`auto_map`, not the stock class vLLM asks for) and its token counts."""

    def get_hf_processor(self, **kwargs: object):
        processor = self.ctx.get_hf_processor(**kwargs)
        if not hasattr(processor, "guidance_tokenizer"):
            raise ValueError(
                f"{self.ctx.model_config.model} holds a {type(processor).__name__}, not a VisionTrim processor: serve "
                "a folder written by `visiontrim-convert` or `save_pretrained`, with --trust-remote-code."
            )
        return processor

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """The placeholders the VisionTrim processor emits for an image of this size (`visual_tokens` per crop)."""
        counts = self.get_hf_processor()._get_num_multimodal_tokens(image_sizes=[(image_height, image_width)])
        return counts.num_image_tokens[0]


class VisionTrimProcessingInfo(VisionTrimProcessingInfoMixin, LlavaProcessingInfo):
    pass


class VisionTrimLlavaNextProcessingInfo(VisionTrimProcessingInfoMixin, LlavaNextProcessingInfo):
    pass


class VisionTrimDummyInputsBuilder(LlavaDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        text = super().get_dummy_text(mm_counts)  # a user turn, as a chat prompt is: the question is found in it
        return f"USER: {text}\n{PROFILING_QUESTION} ASSISTANT:" if text else text


class QuestionGuidanceMixin:
    """
    vLLM's LLaVA processing plus the guidance of each image: the question of the prompt (or
    `mm_processor_kwargs["guidance_text"]`), tokenised by the folder's VisionTrim processor into
    `guidance_input_ids` / `guidance_attention_mask`, one row per image. The question is a processor option, so
    vLLM's cache keys include it.
    """

    # Whether a prompt in no known chat format was logged (with the text that guided TGVC) already.
    warned_unknown_format = False

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext):
        if "guidance_text" not in inputs.hf_processor_mm_kwargs and inputs.mm_data_items.get_all_counts():
            processor = self.info.get_hf_processor()
            prompt = self.info.get_tokenizer().decode(inputs.prompt)
            guidance = guidance_from_prompt(prompt, processor.image_token)
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
                f"of the prompt; got {type(guidance).__name__}."
            )
        processor = self.info.get_hf_processor(**hf_kwargs)
        guidance_length = len(processor.guidance_tokenizer(guidance)["input_ids"])
        if guidance_length > processor.guidance_max_length:
            logger.warning_once(
                "A guidance text is %d CLIP tokens, longer than the CLIP text tower's %d positions: TGVC is guided by "
                "its first ones only. Put the question first, or pass a shorter mm_processor_kwargs['guidance_text'] "
                "(with `vllm serve --trust-request-mm-kwargs`).",
                guidance_length,
                processor.guidance_max_length,
            )
        # One guidance text per prompt: vLLM's dummy text (LLaVA-NeXT) is one prompt; without text, one per image.
        rows = 1 if "text" in hf_data else len(hf_data.get("images", []))
        return self.info.ctx.call_hf_processor(processor, hf_data, {**hf_kwargs, "guidance_text": [guidance] * rows})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs)
        return {**fields, **{name: MultiModalFieldConfig.batched("image") for name in GUIDANCE_FIELDS}}


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


class UnservedArchitecture(nn.Module):
    """
    Stands for the VisionTrim architectures the plugin does not serve: refuses them at load. It declares the methods
    of vLLM's text-generation interface, which vLLM checks before building a model, so that the refusal below is what
    a user reads (vLLM would otherwise reject the architecture's runner with a message that names neither).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        architecture = vllm_config.model_config.hf_config.architectures[0]
        served = " and ".join(a.display_name for a in ARCHITECTURES if a.vllm_served)
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
