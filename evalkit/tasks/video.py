"""Video clips of video tasks: which task values are clips, the frame rule, digests and decoding.

lmms-eval's video tasks give a clip as a path string from ``doc_to_visual``; the model class
decodes frames by its family's rule. Here a path with a video suffix becomes a ``Clip`` (path and
``FrameRule``). Rank 0 names each clip by the sha256 of the file's bytes and the rule (the frames
follow from both), after checking that the file opens and its first frame decodes; the rank that
evaluates the request decodes the frames (PyAV) when the request's batch comes up.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from evalkit.models.protocol import VIDEO_DIGEST_PREFIX, VideoFrames

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg")
# A video's digest string: this prefix, then the image digests' "sha256:" form.
VIDEO_PREFIX = VIDEO_DIGEST_PREFIX


@dataclass(frozen=True)
class FrameRule:
    """Which frames of a clip a model sees, and their pixel limits.

    ``sampling="fps"``: lmms-eval's qwen2_vl class via qwen-vl-utils: ``fps`` frames per second, at
    least ``min_frames``, an even count, then at most ``max_frames`` spread evenly; each frame resized
    to the model's patch grid within the pixel limits.
    ``sampling="uniform"``: lmms-eval's internvl_hf class via InternVL's video processor: ``max_frames``
    frames, one from the middle of each of as many equal stretches of the clip (every frame of a
    shorter clip, where that processor refuses); each frame resized to the processor's size.
    ``sampling="spread"``: lmms-eval's llava_hf class hands every frame to LLaVA-OneVision's video
    processor; so does this rule up to ``max_frames`` frames, and beyond that it takes ``max_frames``
    spread evenly from the first to the last (``linspace``, as lmms-eval's llava_onevision class).
    ``sampling="nframes"``: lmms-eval's qwen2_5_vl class asks qwen-vl-utils for every frame up to
    ``max_frames`` (an even count, at least 2), spread evenly from the first to the last (rounded
    ``linspace``); each frame resized to the model's patch grid within the pixel limits.
    ``sampling="fps_floor"``: qwen-vl-utils 0.0.14's own default (``fps`` frames per second, at least
    ``min_frames``, floored to an even count, at ``linspace(...).round()``), then at most
    ``max_frames`` of those at ``linspace(..., dtype=int)`` positions, as lmms-eval's qwen2_5_vl
    class takes a round's clip. ``positions_fps``: the rate the model's temporal positions assume,
    where the class hands its processor frames without their rate (None: the rate they were taken at).
    ``repeat_to_max``: after the ``fps`` rule, exactly ``max_frames`` of its frames at
    ``linspace(..., dtype=int)`` positions, repeats kept, as lmms-eval's qwen2_vl class takes a
    round's clip.
    """

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 32
    min_pixels: int = 3136
    max_pixels: int = 602112
    sampling: Literal["fps", "uniform", "spread", "nframes", "fps_floor"] = "fps"
    positions_fps: float | None = None
    repeat_to_max: bool = False

    def describe(self) -> str:
        if self.sampling in ("uniform", "spread"):
            return f"{self.sampling} frames={self.max_frames}"
        if self.repeat_to_max:
            return f"fps={self.fps} min_frames={self.min_frames} then {self.max_frames} with repeats"
        if self.sampling == "nframes":
            return f"nframes up to {self.max_frames} pixels={self.min_pixels}..{self.max_pixels}"
        if self.sampling == "fps_floor":
            return (
                f"fps_floor fps={self.fps} min_frames={self.min_frames} max_frames={self.max_frames} "
                f"pixels={self.min_pixels}..{self.max_pixels} positions_fps={self.positions_fps}"
            )
        return (
            f"fps={self.fps} min_frames={self.min_frames} max_frames={self.max_frames} "
            f"pixels={self.min_pixels}..{self.max_pixels}"
        )

    def indices(self, total: int, video_fps: float) -> list[int]:
        """Frame indices picked from a clip of ``total`` frames at ``video_fps``."""
        if total < 2:
            raise ValueError(f"a clip needs at least 2 frames, this one has {total}")
        if self.sampling == "uniform":  # as InternVL's processor computes it, in float32
            import torch

            step = total / min(self.max_frames, total)
            return torch.arange(step / 2, total, step).int().tolist()
        if self.sampling == "nframes":
            import torch

            count = max(2, min(self.max_frames, total) // 2 * 2)
            return torch.linspace(0, total - 1, count).round().long().tolist()
        if self.sampling == "fps_floor":
            return self._fps_floor(total, video_fps)
        if self.sampling == "spread":
            if total <= self.max_frames:
                return list(range(total))
            return [int(i * (total - 1) / (self.max_frames - 1)) for i in range(self.max_frames)]
        least = math.ceil(self.min_frames / 2) * 2
        most = max(2, math.floor(min(768, total) / 2) * 2)
        wanted = total / video_fps * self.fps if video_fps > 0 else least
        count = min(max(round(min(max(wanted, least), most) / 2) * 2, 2), most)
        picked = [round(i * (total - 1) / (count - 1)) for i in range(count)]
        if self.repeat_to_max:
            return [picked[k] for k in _int_linspace(count - 1, self.max_frames)]
        if count > self.max_frames:  # lmms-eval's cap: evenly spaced positions among those picked
            keep = sorted({int(i * (count - 1) / (self.max_frames - 1)) for i in range(self.max_frames)})
            picked = [picked[k] for k in keep]
        return picked

    def _fps_floor(self, total: int, video_fps: float) -> list[int]:
        import torch

        least = math.ceil(self.min_frames / 2) * 2
        most = math.floor(min(768, total) / 2) * 2
        wanted = total / video_fps * self.fps if video_fps > 0 else least
        count = math.floor(min(min(max(wanted, least), most), total) / 2) * 2
        if count < 2:
            raise ValueError(f"a clip of {total} frames gives {count} frames at {self.fps} fps")
        picked = torch.linspace(0, total - 1, count).round().long().tolist()
        keep = sorted({int(k) for k in _int_linspace(count - 1, self.max_frames)})
        return [picked[k] for k in keep]


def _int_linspace(stop: int, num: int) -> list[int]:
    """``numpy.linspace(0, stop, num, dtype=int)``: positions truncated toward zero."""
    import numpy as np

    return np.linspace(0, stop, num, dtype=int).tolist()


# The rule of each lmms-eval model class this backend stands in for, by transformers model_type.
RULES: dict[str, FrameRule] = {
    "qwen2_vl": FrameRule(),
    # models/chat/qwen2_5_vl.py:66-87: nframes = min(max_num_frames, frames), floored to even; frames
    # within its min_pixels (256*28*28) and qwen-vl-utils' cap on a video frame (768*28*28).
    "qwen2_5_vl": FrameRule(sampling="nframes", max_frames=32, min_pixels=256 * 28 * 28, max_pixels=768 * 28 * 28),
    "internvl": FrameRule(sampling="uniform", max_frames=32),
    "llava_onevision": FrameRule(sampling="spread", max_frames=32),
}


# A round of a generate_until_multi_round task, where the class takes clips its own way: lmms-eval's
# qwen2_5_vl class (models/simple/qwen2_5_vl.py:450-511) gives qwen-vl-utils the clip with its own
# pixel bounds and no frame count, keeps at most max_num_frames of those frames, and hands the
# processor the frames without their rate (transformers' video processor then takes them to be 24
# frames a second: second_per_grid_ts 2/24, measured with transformers 5.25).
# Its qwen2_vl class (models/simple/qwen2_vl.py:632-655) skips the np.unique its generate_until
# applies, so a round's clip is always max_num_frames frames, repeats included.
ROUND_RULES: dict[str, FrameRule] = {
    "qwen2_vl": FrameRule(repeat_to_max=True),
    "qwen2_5_vl": FrameRule(
        sampling="fps_floor", max_frames=32, min_pixels=256 * 28 * 28, max_pixels=768 * 28 * 28, positions_fps=24.0
    ),
}


def rule_for(model_type: str | None, *, rounds: bool = False) -> FrameRule:
    """The frame rule of the class that runs ``model_type``; ``rounds``: in a multi-round task."""
    if rounds and model_type in ROUND_RULES:
        return ROUND_RULES[model_type]
    return RULES.get(model_type or "", FrameRule())


@dataclass(frozen=True)
class Clip:
    """A clip a task gave (a file path) and the rule its frames are taken by."""

    path: str
    rule: FrameRule


def is_video_path(value: Any) -> bool:
    return isinstance(value, (str, Path)) and "://" not in str(value) and str(value).lower().endswith(VIDEO_SUFFIXES)


def as_clips(value: Any, rule: FrameRule) -> Any:
    """A task's visual value with every video path made a ``Clip`` (lists kept as lists)."""
    if isinstance(value, (list, tuple)):
        return [as_clips(item, rule) for item in value]
    return Clip(str(value), rule) if is_video_path(value) else value


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clip_digest(clip: Clip) -> str:
    """The clip's name: its file's content and the frame rule. Refuses a missing file or one whose
    first frame does not decode, so such input ends the run before any model call."""
    if not Path(clip.path).is_file():
        raise ValueError(f"video file {clip.path} does not exist")
    _probe(clip.path)
    h = hashlib.sha256(f"{file_sha256(clip.path)} {clip.rule.describe()}".encode())
    return f"{VIDEO_PREFIX}sha256:{h.hexdigest()}"


def _probe(path: str) -> None:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            next(container.decode(video=0))
    except (StopIteration, av.error.FFmpegError, OSError, ValueError) as exc:
        raise ValueError(f"cannot decode video {path}: {exc or 'no frames'}") from None


def decode(clip: Clip) -> VideoFrames:
    """The clip's frames by its rule, as RGB PIL images at the clip's own size."""
    import av

    try:
        with av.open(clip.path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 0)
            total = stream.frames or sum(1 for _ in container.decode(video=0))
        picked = clip.rule.indices(total, rate)
        wanted = set(picked)
        found = {}
        with av.open(clip.path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    found[i] = frame.to_image().convert("RGB")
                if i >= picked[-1]:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ValueError(f"cannot decode video {clip.path}: {exc}") from None
    if len(found) != len(wanted):
        raise ValueError(f"cannot decode video {clip.path}: {len(found)} of its {total} frames decoded")
    seconds = (picked[-1] - picked[0]) / rate if rate else 0.0
    sample_fps = (len(picked) - 1) / seconds if seconds else clip.rule.fps
    if clip.rule.sampling == "nframes" and rate:  # what transformers' video metadata calls sampled_fps
        sample_fps = len(picked) / total * rate
    rule = clip.rule
    if rule.positions_fps is not None:
        sample_fps = rule.positions_fps
    return VideoFrames([found[i] for i in picked], sample_fps, min_pixels=rule.min_pixels, max_pixels=rule.max_pixels)
