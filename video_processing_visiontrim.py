# Copyright 2026 The visiontrim authors. Licensed under the Apache License, Version 2.0.
"""
Pillow video processors for VisionTrim folders, which must not need torchvision: CLIP preprocessing of every frame
(Video-LLaVA, LLaVA-NeXT-Video), and the packed patches of Qwen2-VL / Qwen2.5-VL and of Qwen3-VL. They take sampled
frames; neither decodes a file.
"""

import os

import torch
from transformers import CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_transforms import to_pil_image
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as qwen3_smart_resize
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata, make_batched_videos


def sampled_videos(videos, owner: str) -> list:
    """
    `videos` as a batch of sampled frames (`make_batched_videos`), refusing a file path or URL: these processors
    neither decode nor sample.
    """
    paths = [videos] if isinstance(videos, (str, os.PathLike)) else videos
    if isinstance(paths, (list, tuple)) and any(isinstance(video, (str, os.PathLike)) for video in paths):
        raise ValueError(
            f"{owner} takes each video as its sampled frames (a list of images or a (frames, height, width, 3) "
            "array), not a file path or URL: decode it first, e.g. with `visiontrim.tools.evaluation.video."
            "sample_frames(path, 8)` (PyAV: pip install av), the reader `python -m visiontrim eval video-run` uses."
        )
    return make_batched_videos(videos)


def flat_metadata(video_metadata) -> list:
    """Each video's metadata, from one entry per video or from per-batch lists of them (vLLM's `[[metadata]]`)."""
    entries = []
    for entry in video_metadata or []:
        entries.extend(entry if isinstance(entry, (list, tuple)) else [entry])
    return entries


def metadata_field(metadata: VideoMetadata | dict | None, name: str):
    """A field of a video's metadata (a `VideoMetadata` or a dict), None when it is not given."""
    return metadata.get(name) if isinstance(metadata, dict) else getattr(metadata, name, None)


class VisionTrimVideoProcessor(VideoProcessorMixin):
    r"""
    Turns sampled video frames into `pixel_values_videos` `(videos, frames, 3, height, width)` with CLIP's
    preprocessing on every frame (resize the shortest edge, centre crop, rescale, normalise), done with Pillow: the
    steps of Transformers' `VideoLlavaVideoProcessor` / `LlavaNextVideoVideoProcessor`, which need torchvision. It
    neither decodes nor samples: give each video as its frames (an array `(frames, height, width, 3)` or a list of
    images), e.g. from `tools.evaluation.video.sample_frames`.

    Args:
        size (`dict`, defaults to `{"shortest_edge": 224}`), crop_size (`dict`, defaults to 224 x 224), resample,
        do_resize, do_center_crop, do_rescale, rescale_factor, do_normalize, image_mean, image_std, do_convert_rgb:
            as in [`CLIPImageProcessor`].
    """

    model_input_names = ["pixel_values_videos"]
    # The settings it shares with Transformers' video processors, and passes on to the frames' CLIP image processor.
    frame_settings = (
        "size",
        "crop_size",
        "resample",
        "do_resize",
        "do_center_crop",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )

    def __init__(
        self,
        size: dict[str, int] | None = None,
        crop_size: dict[str, int] | None = None,
        resample: PILImageResampling = PILImageResampling.BICUBIC,
        do_resize: bool = True,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size or {"shortest_edge": 224}
        self.crop_size = crop_size or {"height": 224, "width": 224}
        self.resample = resample
        self.do_resize = do_resize
        self.do_center_crop = do_center_crop
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = list(image_std or OPENAI_CLIP_STD)
        self.do_convert_rgb = do_convert_rgb

    def frame_processor(self) -> CLIPImageProcessorPil:
        """The Pillow CLIP image processor applied to each frame."""
        return CLIPImageProcessorPil(**{name: getattr(self, name) for name in self.frame_settings})

    def preprocess(self, videos, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """`pixel_values_videos`: one `(frames, 3, height, width)` entry per video, stacked with `return_tensors`."""
        videos = sampled_videos(videos, type(self).__name__)
        frame_processor = self.frame_processor()
        processed = [frame_processor(list(video), return_tensors="pt")["pixel_values"] for video in videos]
        frame_counts = [frames.shape[0] for frames in processed]
        if return_tensors is None:
            return BatchFeature({"pixel_values_videos": [frames.numpy() for frames in processed]})
        if len(set(frame_counts)) > 1:
            raise ValueError(
                f"The videos have {frame_counts} frames: the videos of one batch need the same number of frames "
                "(Video-LLaVA and LLaVA-NeXT-Video stack them into one tensor). Sample the same number of frames "
                "from each video, or process them in separate batches."
            )
        return BatchFeature({"pixel_values_videos": torch.stack(processed)}, tensor_type=return_tensors)


class VisionTrimQwenVideoProcessor(VideoProcessorMixin):
    r"""
    Turns sampled video frames into Qwen2-VL / Qwen2.5-VL's packed `pixel_values_videos` `(patches, 3 * 2 * 14 * 14)`
    and `video_grid_thw` `(videos, 3)`, with Pillow: every frame resized to a multiple of 28 px within `size`
    (`smart_resize`), normalised, and consecutive frame pairs patched together (the last frame repeated for an odd
    count), as Transformers' `Qwen2VLVideoProcessor` does with torchvision. It neither decodes nor samples: give each
    video as its frames, sampled at `fps` frames per second (the M-RoPE time step of Qwen2.5-VL).

    Args:
        size (`dict`, defaults to `{"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}`):
            The fewest and most pixels of a frame.
        patch_size, temporal_patch_size, merge_size, image_mean, image_std: as in [`Qwen2VLVideoProcessor`].
        fps (`float`, defaults to 2.0): the rate the frames were sampled at.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int = 14,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        fps: float = 2.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = size or {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean or OPENAI_CLIP_MEAN)
        self.image_std = list(image_std or OPENAI_CLIP_STD)
        self.fps = fps

    def frame_processor(self) -> Qwen2VLImageProcessorPil:
        """The Pillow Qwen image processor applied to each frame (one frame per temporal patch)."""
        return Qwen2VLImageProcessorPil(
            size=self.size,
            patch_size=self.patch_size,
            temporal_patch_size=1,
            merge_size=self.merge_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
        )

    def resized(self, frames: list) -> list:
        """The frames before the frame processor: as given (Qwen2-VL's image processor resizes each frame itself)."""
        return frames

    def preprocess(
        self,
        videos,
        return_tensors: str | None = None,
        do_rescale: bool = True,
        do_normalize: bool = True,
        video_metadata: list[VideoMetadata | dict] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """
        `pixel_values_videos` (all videos' patches, packed), `video_grid_thw` and each video's `video_metadata`.
        `do_rescale=False` / `do_normalize=False` leave the pixels unscaled / unnormalised (vLLM normalises on its
        device); `video_metadata` gives each video's sampling rate (`fps`), else the processor's `fps`.
        """
        frame_processor = self.frame_processor()
        videos = sampled_videos(videos, type(self).__name__)
        rates, indices = [self.fps] * len(videos), [None] * len(videos)
        for index, given in enumerate(flat_metadata(video_metadata)):
            rates[index] = metadata_field(given, "fps") or self.fps
            indices[index] = metadata_field(given, "frames_indices")
        pixels, grids, metadata = [], [], []
        for video, fps, frames_indices in zip(videos, rates, indices, strict=True):
            frames = self.resized(list(video))
            frames += frames[-1:] * (-len(frames) % self.temporal_patch_size)
            processed = frame_processor(frames, return_tensors="pt", do_rescale=do_rescale, do_normalize=do_normalize)
            _, height, width = processed["image_grid_thw"][0].tolist()
            slices = len(frames) // self.temporal_patch_size
            patches = processed["pixel_values"].view(slices, self.temporal_patch_size, height * width, 3, -1)
            pixels.append(patches.permute(0, 2, 3, 1, 4).reshape(slices * height * width, -1))
            grids.append([slices, height, width])
            frames_indices = list(range(len(video))) if frames_indices is None else list(frames_indices)
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=fps, frames_indices=frames_indices))
        encoding = BatchFeature(
            {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor(grids)},
            tensor_type=return_tensors,
        )
        encoding["video_metadata"] = metadata
        return encoding


class VisionTrimQwen3VLVideoProcessor(VisionTrimQwenVideoProcessor):
    r"""
    [`VisionTrimQwenVideoProcessor`] with Qwen3-VL's preprocessing, as Transformers' `Qwen3VLVideoProcessor` does it
    with torchvision: 16 px patches, and each video resized as a whole (`smart_resize` over its frames: sides a
    multiple of 32 px, the frames' pixels together within `size`), normalised by 0.5 / 0.5. Each video's
    `video_metadata` carries the frame indices and rate its timestamps come from (given ones are kept; by default the
    frames are 0, 1, ... at `fps`).

    With `do_sample_frames=True` (what vLLM asks when it hands over a decoded file whole) it samples each video as
    `Qwen3VLVideoProcessor` does: `num_frames`, or the video's duration times `fps` frames, between `min_frames` and
    `max_frames`, evenly spaced.

    Args:
        size (`dict`, defaults to `{"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32}`):
            The fewest and most pixels of a video's frames together.
        patch_size, temporal_patch_size, merge_size, image_mean, image_std, fps, min_frames, max_frames:
            as in [`Qwen3VLVideoProcessor`].
    """

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int = 16,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        min_frames: int = 4,
        max_frames: int = 768,
        **kwargs,
    ):
        super().__init__(
            size=size or {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
            patch_size=patch_size,
            image_mean=image_mean or list(IMAGENET_STANDARD_MEAN),
            image_std=image_std or list(IMAGENET_STANDARD_STD),
            **kwargs,
        )
        self.min_frames = min_frames
        self.max_frames = max_frames

    def preprocess(
        self,
        videos,
        video_metadata: list[VideoMetadata | dict] | None = None,
        do_sample_frames: bool = False,
        fps: float | None = None,
        num_frames: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        """As [`VisionTrimQwenVideoProcessor`], after sampling each video when `do_sample_frames` is set."""
        if not do_sample_frames:
            return super().preprocess(videos, video_metadata=video_metadata, **kwargs)
        videos = sampled_videos(videos, type(self).__name__)
        given = flat_metadata(video_metadata) or [None] * len(videos)
        sampled, sampled_metadata = [], []
        for video, metadata in zip(videos, given, strict=True):
            total = len(video)
            source_fps = metadata_field(metadata, "fps") or 24.0
            count = num_frames if num_frames is not None else int(total / source_fps * (fps or self.fps))
            count = min(max(count, self.min_frames), self.max_frames, total)
            picked = torch.linspace(0, total - 1, count).round().long().tolist()
            source_indices = metadata_field(metadata, "frames_indices") or list(range(total))
            sampled.append([video[index] for index in picked])
            sampled_metadata.append({"fps": source_fps, "frames_indices": [source_indices[i] for i in picked]})
        return super().preprocess(sampled, video_metadata=sampled_metadata, **kwargs)

    def frame_processor(self) -> Qwen2VLImageProcessorPil:
        """The Pillow Qwen image processor of the resized frames: patches and normalises, does not resize."""
        processor = super().frame_processor()
        processor.do_resize = False
        return processor

    def resized(self, frames: list) -> list:
        """The frames resized together to Qwen3-VL's `smart_resize` of the video (Pillow, bicubic)."""
        images = [to_pil_image(frame) for frame in frames]  # a Pillow image each
        height, width = qwen3_smart_resize(
            len(images),
            images[0].height,
            images[0].width,
            temporal_factor=self.temporal_patch_size,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.size["shortest_edge"],
            max_pixels=self.size["longest_edge"],
        )
        return [image.resize((width, height), PILImageResampling.BICUBIC) for image in images]


VisionTrimVideoProcessor.register_for_auto_class("AutoVideoProcessor")
VisionTrimQwenVideoProcessor.register_for_auto_class("AutoVideoProcessor")
VisionTrimQwen3VLVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = ["VisionTrimQwen3VLVideoProcessor", "VisionTrimQwenVideoProcessor", "VisionTrimVideoProcessor"]
