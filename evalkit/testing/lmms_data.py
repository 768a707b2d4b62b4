r"""Local stand-ins, in the hub schema, for the datasets of lmms-eval tasks (demo and tests).

No dataset hub is reachable, so an unchanged lmms-eval task runs on a local folder named like its
hub dataset id: ``datasets.load_dataset("lmms-lab-encoder/MME")`` loads ``./lmms-lab-encoder/MME``
when it exists (a README.md whose front matter declares the config's data files). Images are
PIL-drawn shapes in the words the tiny test models were trained on.

Usage::

    python -m evalkit.testing.lmms_data OUT_DIR    # then run evalkit with OUT_DIR as the working folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (40, 70, 220), "green": (30, 160, 60), "yellow": (230, 200, 20)}

# MME: two questions per image (one answered Yes, one No), scored in pairs per category.
# (category, colour, shape, count, where, [(question, answer), (question, answer)])
MME_DOCS = [
    ("color", "red", "circle", 1, "left", [("Is the circle red?", "Yes"), ("Is the circle blue?", "No")]),
    ("color", "blue", "square", 1, "right", [("Is the square blue?", "Yes"), ("Is the square green?", "No")]),
    ("count", "green", "circle", 2, "left", [("Are there two circles?", "Yes"), ("Are there three circles?", "No")]),
    ("count", "yellow", "square", 3, "right", [("Are there three squares?", "Yes"), ("Is there one square?", "No")]),
    ("existence", "red", "square", 1, "left", [("Is there a square?", "Yes"), ("Is there a circle?", "No")]),
    (
        "position",
        "blue",
        "circle",
        1,
        "left",
        [("Is the circle on the left?", "Yes"), ("Is the circle on the right?", "No")],
    ),
    (
        "numerical_calculation",
        "green",
        "square",
        2,
        "right",
        [("Is two plus two four?", "Yes"), ("Is two plus two five?", "No")],
    ),
]


def draw(colour: str, shape: str, count: int, where: str, size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    step = size // 4
    for n in range(count):
        x = (2 if where == "left" else size // 2 + 2) + (n % 2) * (step - 2)
        y = 4 + n * step
        box = (x, y, x + step - 4, y + step - 4)
        (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLOURS[colour])
    return image


def _card(folder: Path, repo_id: str, features: object, split: str, rel: str) -> None:
    front = yaml.safe_dump(
        {
            "configs": [{"config_name": "default", "data_files": [{"split": split, "path": rel}]}],
            "dataset_info": [{"config_name": "default", "features": features._to_yaml_list()}],  # type: ignore[attr-defined]
        },
        sort_keys=False,
    )
    (folder / "README.md").write_text(f"---\n{front}---\n\nLocal stand-in for `{repo_id}` (evalkit).\n")


def write_mme(root: Path) -> Path:
    """``lmms-lab-encoder/MME`` (split ``test``) as lmms-eval 0.7's ``mme`` task reads it."""
    import datasets

    repo_id = "lmms-lab-encoder/MME"
    folder = Path(root) / repo_id
    (folder / "data").mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {k: [] for k in ("question_id", "question", "answer", "category", "image")}
    for n, (category, colour, shape, count, where, pairs) in enumerate(MME_DOCS):
        image = draw(colour, shape, count, where)
        for question, answer in pairs:
            columns["question_id"].append(f"{category}/{n:03d}.png")
            columns["question"].append(f"{question} Please answer yes or no.")
            columns["answer"].append(answer)
            columns["category"].append(category)
            columns["image"].append(image)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "category": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    rel = "data/test-00000-of-00001.parquet"
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / rel))
    _card(folder, repo_id, features, "test", rel)
    return folder


# POPE: object-presence questions, answered yes or no. (colour, shape, count, where, question, answer)
POPE_DOCS = [
    ("red", "circle", 1, "left", "Is there a circle in the image?", "yes"),
    ("red", "circle", 1, "left", "Is there a square in the image?", "no"),
    ("blue", "square", 2, "right", "Is there a square in the image?", "yes"),
    ("green", "circle", 1, "right", "Is there a square in the image?", "no"),
]

# ChartQA: a bar per colour; questions read a bar. (heights, question, answer, type)
CHARTQA_DOCS = [
    ((3, 1, 2), "How tall is the red bar?", "3", "human_test"),
    ((1, 4, 2), "Which bar is tallest?", "blue", "human_test"),
    ((2, 2, 5), "How tall is the green bar?", "5", "augmented_test"),
    ((4, 1, 1), "What is the sum of the bars?", "6", "augmented_test"),
]

# AI2D: multiple choice over a drawn shape; answer is the index of the right option (as a string).
AI2D_DOCS = [
    ("red", "circle", 1, "left", "What shape is shown?", ["square", "circle", "triangle", "star"], "1"),
    ("blue", "square", 1, "right", "What colour is the shape?", ["blue", "red", "green", "yellow"], "0"),
    ("green", "circle", 2, "left", "How many shapes are there?", ["one", "three", "two", "four"], "2"),
]


def draw_bars(heights: tuple[int, ...], size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    width = size // (len(heights) + 1)
    for n, (height, colour) in enumerate(zip(heights, ("red", "blue", "green"), strict=False)):
        x = 4 + n * (width + 2)
        pen.rectangle((x, size - 4 - height * 7, x + width, size - 4), fill=COLOURS[colour])
    return image


def _write(root: Path, repo_id: str, columns: dict[str, list], features: object, split: str = "test") -> Path:
    import datasets

    folder = Path(root) / repo_id
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rel = f"data/{split}-00000-of-00001.parquet"
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / rel))
    _card(folder, repo_id, features, split, rel)
    return folder


def write_pope(root: Path) -> Path:
    """``lmms-lab-encoder/POPE`` (split ``test``) as lmms-eval 0.7's ``pope`` task reads it."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("question_id", "question", "answer", "category", "image")}
    for n, (colour, shape, count, where, question, answer) in enumerate(POPE_DOCS):
        columns["question_id"].append(str(n))
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["category"].append("random")
        columns["image"].append(draw(colour, shape, count, where))
    text = datasets.Value("string")
    features = datasets.Features(
        {"question_id": text, "question": text, "answer": text, "category": text, "image": datasets.Image()}
    )
    return _write(root, "lmms-lab-encoder/POPE", columns, features)


def write_chartqa(root: Path) -> Path:
    """``lmms-lab-encoder/ChartQA`` (split ``test``) as lmms-eval 0.7's ``chartqa`` task reads it."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("type", "question", "answer", "image")}
    for heights, question, answer, kind in CHARTQA_DOCS:
        columns["type"].append(kind)
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["image"].append(draw_bars(heights))
    text = datasets.Value("string")
    features = datasets.Features({"type": text, "question": text, "answer": text, "image": datasets.Image()})
    return _write(root, "lmms-lab-encoder/ChartQA", columns, features)


def write_ai2d(root: Path) -> Path:
    """``lmms-lab-encoder/ai2d`` (split ``test``) as lmms-eval 0.7's ``ai2d`` task reads it."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("question", "options", "answer", "image")}
    for colour, shape, count, where, question, options, answer in AI2D_DOCS:
        columns["question"].append(question)
        columns["options"].append(options)
        columns["answer"].append(answer)
        columns["image"].append(draw(colour, shape, count, where))
    text = datasets.Value("string")
    features = datasets.Features(
        {"question": text, "options": datasets.Sequence(text), "answer": text, "image": datasets.Image()}
    )
    return _write(root, "lmms-lab-encoder/ai2d", columns, features)


# MM-Vet: open questions graded by an LLM judge. (colour, shape, count, where, question, answer, capabilities)
MMVET_DOCS = [
    ("red", "circle", 1, "left", "What colour is the circle?", "red", "rec"),
    ("yellow", "square", 3, "right", "How many squares are there?", "3 <OR> three", "rec,math"),
    ("blue", "circle", 1, "left", "Where is the circle?", "left", "rec,spat"),
    ("green", "square", 2, "right", "What colour and shape are they?", "green <AND> square", "rec,know"),
]


def write_mmvet(root: Path) -> Path:
    """``lmms-lab-encoder/MMVet`` (split ``test``) as lmms-eval 0.7's ``mmvet`` task reads it."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("question_id", "image", "question", "answer", "capability")}
    for n, (colour, shape, count, where, question, answer, capability) in enumerate(MMVET_DOCS):
        columns["question_id"].append(f"v1_{n}")
        columns["image"].append(draw(colour, shape, count, where))
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["capability"].append(capability)
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "capability": datasets.Value("string"),
        }
    )
    return _write(root, "lmms-lab-encoder/MMVet", columns, features)


WRITERS = {
    "mme": write_mme,
    "pope": write_pope,
    "chartqa": write_chartqa,
    "ai2d": write_ai2d,
    "mmvet": write_mmvet,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the working folder evalkit then runs in")
    parser.add_argument("--tasks", default=",".join(WRITERS), help=f"which (default: {','.join(WRITERS)})")
    args = parser.parse_args(argv)
    for name in args.tasks.split(","):
        print(WRITERS[name](args.out))


if __name__ == "__main__":
    main()
