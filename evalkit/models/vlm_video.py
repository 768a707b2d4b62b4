"""Decoded video frames as a vision-language model's inputs, without torchvision.

transformers 5's video processors import torchvision, which does not load next to some torch
builds (2.13.0+cpu). Where the processor has its video processor, ``processor(videos=...)`` does
the work. Otherwise the inputs are built here as those video processors build them, with the
image processor's settings:

- Qwen2-VL / Qwen2.5-VL: each frame is resized to the patch grid (``smart_resize``, within the
  frame rule's pixel limits), rescaled and normalized, and consecutive frames are cut into the
  model's temporal x spatial patches; the prompt's video placeholder is expanded to the clip's
  token count.
- InternVL: each frame is resized to the image processor's size, rescaled and normalized as one
  tile; the placeholder becomes one ``FrameN: <img>...</img>`` line per frame, and the frames join
  ``pixel_values`` as InternVLProcessor places them.
- LLaVA-OneVision: the frames, at the image processor's size, are ``pixel_values_videos``; the
  placeholder becomes one video token per 2x2-pooled patch of every frame, and one newline.

Resizing is bicubic and antialiased, rounded back to 8 bits, as torchvision resizes a uint8 clip.
Other families take video only through their video processor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from evalkit.models.protocol import VideoFrames

# Families whose video inputs are built here when the processor has no video processor.
QWEN_FAMILIES = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
INTERNVL_FAMILIES = ("InternVLProcessor",)
LLAVA_ONEVISION_FAMILIES = ("LlavaOnevisionProcessor",)


def video_inputs(processor: Any, prompt: str, videos: list[VideoFrames]) -> tuple[str, dict[str, torch.Tensor]]:
    """The prompt with each video placeholder expanded, and the model's video tensors."""
    token = getattr(processor, "video_token", None)
    found = prompt.count(token) if token else 0
    if found != len(videos):
        raise ValueError(
            f"the chat template rendered {found} video placeholders for {len(videos)} videos "
            f"(a template that renders no video part drops the video)"
        )
    name = type(processor).__name__
    if name in INTERNVL_FAMILIES:
        return _internvl_inputs(processor, prompt, videos)
    if name in LLAVA_ONEVISION_FAMILIES:
        return _llava_onevision_inputs(processor, prompt, videos)
    if name not in QWEN_FAMILIES:
        raise ValueError(
            f"{name} has no video processor here (transformers' video processors need torchvision); "
            f"evalkit builds video inputs itself for Qwen2-VL, Qwen2.5-VL, InternVL and LLaVA-OneVision only"
        )
    image_processor = processor.image_processor
    merge = image_processor.merge_size
    pieces, grids, seconds = [], [], []
    for video in videos:
        patches, grid = _qwen_patches(image_processor, video)
        pieces.append(patches)
        grids.append(grid)
        seconds.append(image_processor.temporal_patch_size / video.fps)
    for grid in grids:
        prompt = prompt.replace(token, "\0" * (int(np.prod(grid)) // merge**2), 1)
    out = {
        "pixel_values_videos": torch.from_numpy(np.concatenate(pieces)),
        "video_grid_thw": torch.tensor(grids, dtype=torch.long),
    }
    if type(processor).__name__ == "Qwen2_5_VLProcessor":
        out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return prompt.replace("\0", token), out


def _qwen_patches(image_processor: Any, video: VideoFrames) -> tuple[np.ndarray, list[int]]:
    """(grid_t * grid_h * grid_w, channels * temporal * patch * patch) patches and [t, h, w]: the
    layout Qwen2-VL's video processor gives, each token covering ``temporal_patch_size`` frames."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge, temporal = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    width, height = video.frames[0].size
    new_h, new_w = smart_resize(
        height, width, factor=patch * merge, min_pixels=video.min_pixels, max_pixels=video.max_pixels
    )
    frames = []
    for array in _resized(video, new_h, new_w).numpy():
        array = image_processor.rescale(array, image_processor.rescale_factor)
        frames.append(image_processor.normalize(array, image_processor.image_mean, image_processor.image_std))
    if len(frames) % temporal:  # as the video processor: repeat the last frame
        frames += [frames[-1]] * (temporal - len(frames) % temporal)
    stack = np.stack(frames)
    t, h, w = len(frames) // temporal, new_h // patch, new_w // patch
    channels = stack.shape[1]
    patches = stack.reshape(t, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t * h * w, channels * temporal * patch * patch).astype(np.float32), [t, h, w]


def _resized(video: VideoFrames, height: int, width: int) -> torch.Tensor:
    """The clip's frames (frames, channels, height, width) resized as torchvision resizes a uint8
    clip: bicubic, antialiased, rounded and clipped back to 0..255 (kept as float32)."""
    clip = torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in video.frames])).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(
        clip.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.round_().clamp_(0, 255)


def _normalized(video: VideoFrames, image_processor: Any) -> torch.Tensor:
    """The clip's frames at the image processor's size, rescaled and normalized as a video processor
    does it (the rescale fused into the mean and std)."""
    size = image_processor.size
    scale = 1.0 / image_processor.rescale_factor
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1) * scale
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1) * scale
    return (_resized(video, size["height"], size["width"]) - mean) / std


def _internvl_inputs(processor: Any, prompt: str, videos: list[VideoFrames]) -> tuple[str, dict[str, torch.Tensor]]:
    """InternVL's video inputs: every frame one tile at the image size, and one line of image
    tokens per frame."""
    tiles = [_normalized(video, processor.image_processor) for video in videos]
    context = processor.image_token * processor.image_seq_length
    for video in videos:
        lines = "\n".join(
            f"Frame{i + 1}: {processor.start_image_token}{context}{processor.end_image_token}"
            for i in range(len(video.frames))
        )
        prompt = prompt.replace(processor.video_token, lines, 1)  # the lines hold no video token
    return prompt, {"pixel_values": torch.cat(tiles)}


def _llava_onevision_inputs(
    processor: Any, prompt: str, videos: list[VideoFrames]
) -> tuple[str, dict[str, torch.Tensor]]:
    """LLaVA-OneVision's video inputs: the frames at the image size as one (videos, frames, ...)
    tensor; each placeholder becomes the frames' 2x2-pooled patches and one newline token."""
    clips = [_normalized(video, processor.image_processor) for video in videos]
    if len({clip.shape for clip in clips}) > 1:
        raise ValueError("LLaVA-OneVision takes the videos of one request only when they have as many frames")
    pooled = math.ceil(int(math.sqrt(processor.num_image_tokens)) / 2)
    token = processor.video_token
    for video in videos:
        prompt = prompt.replace(token, "\0" * (len(video.frames) * pooled * pooled + 1), 1)
    return prompt.replace("\0", token), {"pixel_values_videos": torch.stack(clips)}
