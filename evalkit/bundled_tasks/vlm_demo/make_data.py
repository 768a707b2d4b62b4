"""Writes the vlm_demo data: data/{color,count,position}.parquet, byte for byte the same each time.

    python evalkit/bundled_tasks/vlm_demo/make_data.py [FOLDER]

Each subtask draws four 64x64 images with PIL and asks two yes/no questions about each (one true,
one false, MME-style). Images are stored PNG-encoded in a ``datasets`` Image column, so the
loaded docs hold PIL images as a hub image dataset's do.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

DATA = Path(__file__).resolve().parent / "data"
SIZE = 64
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}
NUMBERS = ["zero", "one", "two", "three", "four", "five"]

# (image, [(question, answer)]) per image
Item = tuple[Image.Image, list[tuple[str, str]]]


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _color_items() -> list[Item]:
    shapes = [
        ("square", "red", "blue"),
        ("circle", "green", "yellow"),
        ("square", "blue", "green"),
        ("circle", "yellow", "red"),
    ]
    items = []
    for shape, colour, other in shapes:
        image, draw = _canvas()
        box = (12, 12, SIZE - 12, SIZE - 12)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        items.append((image, [(f"Is the {shape} {colour}?", "yes"), (f"Is the {shape} {other}?", "no")]))
    return items


def _count_items() -> list[Item]:
    counts = [(1, 2), (2, 3), (3, 1), (4, 2)]
    spots = [(6, 6), (36, 36), (36, 6), (6, 36)]
    items = []
    for count, wrong in counts:
        image, draw = _canvas()
        for x, y in spots[:count]:
            draw.ellipse((x, y, x + 20, y + 20), fill=COLOURS["blue"])
        noun = lambda n: "circle" if n == 1 else "circles"  # noqa: E731
        verb = lambda n: "Is there" if n == 1 else "Are there"  # noqa: E731
        items.append(
            (
                image,
                [
                    (f"{verb(count)} {NUMBERS[count]} {noun(count)} in the image?", "yes"),
                    (f"{verb(wrong)} {NUMBERS[wrong]} {noun(wrong)} in the image?", "no"),
                ],
            )
        )
    return items


def _position_items() -> list[Item]:
    places = [
        ("left", "right", "red"),
        ("right", "left", "green"),
        ("top", "bottom", "blue"),
        ("bottom", "top", "yellow"),
    ]
    boxes = {"left": (4, 22, 24, 42), "right": (40, 22, 60, 42), "top": (22, 4, 42, 24), "bottom": (22, 40, 42, 60)}
    items = []
    for side, opposite, colour in places:
        image, draw = _canvas()
        draw.rectangle(boxes[side], fill=COLOURS[colour])
        where = lambda s: f"on the {s} side" if s in ("left", "right") else f"at the {s}"  # noqa: E731
        items.append(
            (
                image,
                [
                    (f"Is the {colour} square {where(side)} of the image?", "yes"),
                    (f"Is the {colour} square {where(opposite)} of the image?", "no"),
                ],
            )
        )
    return items


SUBTASKS: dict[str, Callable[[], list[Item]]] = {
    "color": _color_items,
    "count": _count_items,
    "position": _position_items,
}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def rows(subtask: str) -> dict[str, list]:
    columns: dict[str, list] = {"question_id": [], "image_id": [], "image": [], "question": [], "answer": []}
    for i, (image, questions) in enumerate(SUBTASKS[subtask]()):
        png = _png(image)
        for j, (question, answer) in enumerate(questions):
            columns["question_id"].append(f"{subtask}_{i}_{j}")
            columns["image_id"].append(f"{subtask}_{i}")
            columns["image"].append({"bytes": png, "path": None})
            columns["question"].append(question)
            columns["answer"].append(answer)
    return columns


def write(folder: Path = DATA) -> list[Path]:
    import datasets

    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    datasets.disable_progress_bars()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for subtask in SUBTASKS:
        path = folder / f"{subtask}.parquet"
        datasets.Dataset.from_dict(rows(subtask), features=features).to_parquet(str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA):
        print(written_path)
