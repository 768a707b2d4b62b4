"""Images of image tasks: what a task yields, as RGB PIL images; their digests; and where the rank
that evaluates a request finds them.

Images never travel between processes. Rank 0 builds every request with lm-eval, which calls
``task.doc_to_image(doc)``; evalkit keeps only the images' digests (``Visuals``). The rank that runs
a request loads the same task itself and asks it for the same doc's images (``VisualSource``); the
digests prove both ranks saw the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evalkit.models.protocol import ImageInput, VideoFrames
from evalkit.tasks.video import VIDEO_PREFIX, Clip, clip_digest, decode

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

DIGEST_PREFIX = "sha256:"


@dataclass(frozen=True)
class RoundRef:
    """A later round of a multi-round doc: its number, the answers of the rounds before it and what
    the task passed on from the last one; the task gives that round's visuals from these."""

    index: int
    previous: tuple[str, ...]
    info: Any = None


@dataclass(frozen=True)
class Visuals:
    """The images of one request, by reference: the rank that evaluates the request loads them
    from its own copy of the task (``task.doc_to_image`` of doc ``doc_id``, or for a later round of
    a multi-round doc the task's visuals of that ``round``), so images are never shipped between
    ranks; ``digests`` name their content (resume keys hash them)."""

    task: str
    doc_id: int
    digests: tuple[str, ...]
    round: RoundRef | None = None


def is_image(value: Any) -> bool:
    """A PIL image? (Pillow is imported only by tasks that have images.)"""
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(value, module.Image)


def as_images(value: Any) -> list[PILImage]:
    """What a task's ``doc_to_image`` (or lmms-eval's ``doc_to_visual``) yields, as RGB images in order.

    Takes a PIL image, a file path, encoded bytes, a ``datasets`` Image dict (``{"bytes", "path"}``),
    None (no image) or a list/tuple of those, nested lists flattened.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [image for item in value for image in as_images(item)]
    return [_rgb(_open(value))]


def _open(value: Any) -> PILImage:
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _read(io.BytesIO(bytes(value)), "bytes")
    if isinstance(value, (str, Path)):
        if "://" in str(value):
            raise ValueError(f"image {value}: evalkit reads images from local files only, not from URLs")
        return _read(value, str(value))
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return _open(value["bytes"])
        if value.get("path") is not None:
            return _open(value["path"])
        raise ValueError("image dict has neither bytes nor a path")
    if hasattr(value, "__array_interface__"):
        return Image.fromarray(value)
    raise TypeError(
        f"cannot turn a {type(value).__name__} into an image "
        f"(expected a PIL image, a file path, bytes, a {{'bytes', 'path'}} dict or a list of those)"
    )


def _read(source: Any, label: str) -> PILImage:
    from PIL import Image

    try:
        with Image.open(source) as image:
            image.load()
            return image.copy() if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read an image from {label}: {exc}") from exc


def _rgb(image: PILImage) -> PILImage:
    return image if image.mode == "RGB" else image.convert("RGB")


def digest(image: PILImage) -> str:
    """The content of one image: sha256 of its mode, size and pixels (not of any file encoding)."""
    h = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\0".encode())
    h.update(image.tobytes())
    return DIGEST_PREFIX + h.hexdigest()


def digests(images: list[PILImage | Clip]) -> tuple[str, ...]:
    return tuple(clip_digest(v) if isinstance(v, Clip) else digest(v) for v in images)


def as_visuals(value: Any) -> list[PILImage | Clip]:
    """As ``as_images``, except that video clips (``Clip``, see ``evalkit.tasks.video``) stay clips."""
    if isinstance(value, (list, tuple)):
        return [visual for item in value for visual in as_visuals(item)]
    return [value] if isinstance(value, Clip) else as_images(value)


def image_label(image: PILImage) -> str:
    """How an image appears in a doc written to samples: its content digest."""
    return f"<image {digest(as_images(image)[0])}>"


class ImagesChanged(RuntimeError):
    """A rank found other images for a doc than those its requests were built from."""


class VisualSource:
    """Finds a request's images on the rank that evaluates it.

    ``tasks`` returns lm-eval task objects by name (rank 0: the tasks it built; other ranks: their
    own copy, loaded the same way); it is called once, when the first image is needed. Per task the
    evaluation docs are kept (a ``datasets`` split decodes a row only when it is read); decoded
    images are not kept.
    """

    def __init__(self, tasks: Callable[[], Mapping[str, Any]]) -> None:
        self._load_tasks = tasks
        self._tasks: Mapping[str, Any] | None = None
        self._docs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def prepare(self, names: set[str]) -> None:
        """Load the named tasks and their docs now (before any model call), so a problem with them
        is found while every rank can still agree on it."""
        for name in sorted(names):
            self._task_and_docs(name)

    def images(self, visuals: Visuals) -> ImageInput:
        return ImageInput(digests=visuals.digests, load=lambda: self.load(visuals))

    def load(self, visuals: Visuals) -> list[PILImage | VideoFrames]:
        task, docs = self._task_and_docs(visuals.task)
        if not 0 <= visuals.doc_id < len(docs):
            raise ImagesChanged(
                f"task '{visuals.task}' has {len(docs)} docs here, but a request names doc {visuals.doc_id}; "
                f"every rank must load the same data"
            )
        doc, later = docs[visuals.doc_id], visuals.round
        if later is None:
            images = as_visuals(task.doc_to_image(doc))
        else:
            images = as_visuals(task.round_visuals(doc, later.index, list(later.previous), later.info))
        found = digests(images)
        if found != visuals.digests:
            raise ImagesChanged(
                f"task '{visuals.task}' doc {visuals.doc_id}: the images here ({_short(found)}) differ from those "
                f"its request was built from ({_short(visuals.digests)}); every rank must load the same data "
                f"and task code"
            )
        return [decode(v) if isinstance(v, Clip) else v for v in images]

    def _task_and_docs(self, name: str) -> tuple[Any, Any]:
        with self._lock:
            if self._tasks is None:
                self._tasks = self._load_tasks()
            if name not in self._tasks:
                raise KeyError(f"task '{name}' is not among the tasks loaded on this rank")
            task = self._tasks[name]
            if name not in self._docs:
                # lm-eval numbers docs by their position in eval_docs (after process_docs)
                self._docs[name] = task.eval_docs
            return task, self._docs[name]


def _short(values: tuple[str, ...]) -> str:
    if not values:
        return "no images"
    return ", ".join(v.removeprefix(VIDEO_PREFIX).removeprefix(DIGEST_PREFIX)[:12] for v in values)
