"""What the evaluation loop needs from a model backend, and the typed inputs it hands one.

Every backend (``evalkit.models.registry``) implements ``Backend``; the executor and the runner
know backends only through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from PIL.Image import Image

# The kinds of request a backend is asked to run (lm-eval's request types), in the order the
# executor runs them.
Kind = Literal["loglikelihood", "loglikelihood_rolling", "generate_until"]
KINDS: tuple[Kind, ...] = ("loglikelihood", "loglikelihood_rolling", "generate_until")
# lm-eval's default for a generate_until request that does not say how many tokens to generate.
DEFAULT_MAX_GEN_TOKS = 256

# Called after every batch with the (position in the input list, result) pairs it finished, so
# results can be saved as they come and a run can stop between batches.
Progress = Callable[[list[tuple[int, Any]]], None]

# Chat-style content as lmms-eval's doc_to_messages gives it: [{"role": ..., "content": [parts]}],
# a part being {"type": "text", "text": ...} or {"type": "image"} (the request's next image).
Messages = list[dict[str, Any]]


# A video's digest starts with this (``evalkit.tasks.video.clip_digest``); an image's does not.
VIDEO_DIGEST_PREFIX = "video:"


def is_video_digest(digest: str) -> bool:
    """Whether a visual's digest names a video clip (else an image)."""
    return digest.startswith(VIDEO_DIGEST_PREFIX)


@dataclass(frozen=True)
class VideoFrames:
    """One clip's frames as its model family's rule picked them, the rate they were taken at, and
    the rule's pixel limits for each frame."""

    frames: list[Image]
    fps: float
    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class ImageInput:
    """The images and videos of one request, decoded only when ``load`` is called, on the rank that
    runs it.

    ``digests`` name the content (see ``evalkit.tasks.images.digest`` and
    ``evalkit.tasks.video.clip_digest``); ``load`` returns RGB PIL images and ``VideoFrames`` in
    prompt order and checks them against the digests.
    """

    digests: tuple[str, ...]
    load: Callable[[], list[Image | VideoFrames]] = field(compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.digests)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Per visual, in prompt order: "image" or "video"."""
        return tuple("video" if is_video_digest(d) else "image" for d in self.digests)


@dataclass(frozen=True)
class GenerationInput:
    """One generate_until request. ``context`` is prompt text (``<image>`` marks where an image goes;
    without a marker the images come first) or chat messages; ``gen_kwargs`` are lm-eval's."""

    context: str | Messages
    gen_kwargs: dict[str, Any]
    images: ImageInput | None = None


class Backend(Protocol):
    name: str  # the registry name it was selected by
    batch_size: int  # requests per model call; the executor retries failures in chunks of this size
    num_parameters_local: int | None  # parameters held by this rank (a TP shard counts only its slice)
    timings: dict[str, float]  # seconds of the model calls spent on the backend's own steps (tokenize)
    # Tokens of scored requests the model computed ("computed") and would have computed scoring each
    # request in its own row ("one_row_per_request"); {} for a backend that does not count them.
    token_counts: dict[str, int]

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy decode) per pair."""

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        """Total log-likelihood of each text, scored in windows of the model's context."""

    def generate_until(self, requests: list[GenerationInput], progress: Progress) -> list[str]:
        """Greedy or sampled continuation of each context, cut at its first stop sequence."""

    def describe(self) -> dict[str, Any]:
        """Model facts recorded in results.json."""
