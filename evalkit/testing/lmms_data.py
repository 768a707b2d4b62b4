r"""Local stand-ins, in the hub schema, for the datasets of lmms-eval tasks (demo and tests).

No dataset hub is reachable, so an unchanged lmms-eval task runs on a local folder named like its
hub dataset id: ``datasets.load_dataset("lmms-lab-encoder/MME")`` loads ``./lmms-lab-encoder/MME``
when it exists (a README.md whose front matter declares the config's data files). Images are
PIL-drawn shapes in the words the tiny test models were trained on.

Video tasks find their clips under ``$HF_HOME`` (lmms-eval's rule): the writers put them under
``OUT_DIR/hf_home``, so runs of video tasks set ``HF_HOME=OUT_DIR/hf_home``.

Usage::

    python -m evalkit.testing.lmms_data OUT_DIR    # then run evalkit with OUT_DIR as the working folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "blue": (40, 70, 220),
    "green": (30, 160, 60),
    "yellow": (230, 200, 20),
    "white": (250, 250, 250),
}
HF_HOME = "hf_home"  # under a writer's root: where video tasks' clips go

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


def _card(folder: Path, repo_id: str, features: object, files: list[tuple[str, str, str]]) -> None:
    """The README.md that declares each (config, split, parquet path) of a local dataset folder."""
    configs: dict[str, list[dict[str, str]]] = {}
    for config, split, rel in files:
        configs.setdefault(config, []).append({"split": split, "path": rel})
    features_yaml = features._to_yaml_list()  # type: ignore[attr-defined]
    front = yaml.safe_dump(
        {
            "configs": [{"config_name": c, "data_files": f} for c, f in configs.items()],
            "dataset_info": [{"config_name": c, "features": features_yaml} for c in configs],
        },
        sort_keys=False,
    )
    (folder / "README.md").write_text(f"---\n{front}---\n\nLocal stand-in for `{repo_id}` (evalkit).\n")


def write_mme(root: Path) -> Path:
    """``lmms-lab-encoder/MME`` (split ``test``) as lmms-eval 0.7's ``mme`` task reads it."""
    import datasets

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
    return _write(root, "lmms-lab-encoder/MME", columns, features)


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


def _write(
    root: Path, repo_id: str, columns: dict[str, list], features: object, split: str = "test", config: str = "default"
) -> Path:
    return _write_splits(root, repo_id, features, {(config, split): columns})


def _write_splits(root: Path, repo_id: str, features: object, parts: dict[tuple[str, str], dict[str, list]]) -> Path:
    """A dataset folder with one parquet file per (config, split) and the card declaring them."""
    import datasets

    folder = Path(root) / repo_id
    (folder / "data").mkdir(parents=True, exist_ok=True)
    files = []
    for (config, split), columns in parts.items():
        rel = f"data/{config}-{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / rel))
        files.append((config, split, rel))
    _card(folder, repo_id, features, files)
    return folder


def write_pope(root: Path) -> Path:
    """``lmms-lab-encoder/POPE``: split ``test`` (``pope``) and config ``Full`` with splits
    ``adversarial``, ``popular`` and ``random`` (the ``pope_full`` group), as lmms-eval 0.7 reads them."""
    import datasets

    def columns(category: str, docs: list[tuple]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("question_id", "question", "answer", "category", "image")}
        for n, (colour, shape, count, where, question, answer) in enumerate(docs):
            out["question_id"].append(str(n))
            out["question"].append(question)
            out["answer"].append(answer)
            out["category"].append(category)
            out["image"].append(draw(colour, shape, count, where))
        return out

    text = datasets.Value("string")
    features = datasets.Features(
        {"question_id": text, "question": text, "answer": text, "category": text, "image": datasets.Image()}
    )
    parts = {("default", "test"): columns("random", POPE_DOCS)}
    for turn, split in enumerate(("adversarial", "popular", "random")):  # each split its own order
        parts[("Full", split)] = columns(split, POPE_DOCS[turn + 1 :] + POPE_DOCS[: turn + 1])
    return _write_splits(root, "lmms-lab-encoder/POPE", features, parts)


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


# ScienceQA-IMG: multiple choice, answered by letter. (colour, shape, count, where, hint, question, choices, answer)
SCIENCEQA_DOCS = [
    ("red", "circle", 1, "left", "", "What shape is shown?", ["square", "circle"], 1),
    (
        "blue",
        "square",
        2,
        "right",
        "The shapes are the same.",
        "What colour are the shapes?",
        ["blue", "red", "green"],
        0,
    ),
    ("green", "circle", 1, "right", "", "Where is the circle?", ["on the left", "on the right"], 1),
    ("yellow", "square", 3, "left", "Count them.", "How many squares are there?", ["one", "two", "three", "four"], 2),
]


def write_scienceqa(root: Path) -> Path:
    """``lmms-lab-encoder/ScienceQA``, config ``ScienceQA-IMG`` (split ``test``), as ``scienceqa_img`` reads it."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("image", "question", "choices", "answer", "hint", "subject")}
    for colour, shape, count, where, hint, question, choices, answer in SCIENCEQA_DOCS:
        columns["image"].append(draw(colour, shape, count, where))
        columns["question"].append(question)
        columns["choices"].append(choices)
        columns["answer"].append(answer)
        columns["hint"].append(hint)
        columns["subject"].append("natural science")
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": text,
            "choices": datasets.Sequence(text),
            "answer": datasets.Value("int8"),
            "hint": text,
            "subject": text,
        }
    )
    return _write(root, "lmms-lab-encoder/ScienceQA", columns, features, config="ScienceQA-IMG")


# MMBench (en, dev): options A-D, unused ones "nan" as in the hub data; the hint is "nan" when absent.
# (colour, shape, count, where, hint, question, options, answer, category)
MMBENCH_DOCS = [
    ("red", "circle", 1, "left", "nan", "What shape is shown?", ("circle", "square", "nan", "nan"), "A", "object"),
    (
        "blue",
        "square",
        1,
        "right",
        "Look at the picture.",
        "Which colour is it?",
        ("red", "green", "blue", "yellow"),
        "C",
        "colour",
    ),
    ("green", "circle", 2, "left", "nan", "How many circles are there?", ("one", "two", "three", "nan"), "B", "object"),
    (
        "yellow",
        "square",
        3,
        "right",
        "nan",
        "Where are they?",
        ("on the left", "on the right", "nan", "nan"),
        "B",
        "spatial",
    ),
]
MMBENCH_L2 = {
    "object": "finegrained_perception (instance-level)",
    "colour": "attribute",
    "spatial": "relation_reasoning",
}


def write_mmbench(root: Path) -> Path:
    """``lmms-lab-encoder/MMBench``, config ``en`` (split ``dev``), as ``mmbench_en_dev*`` read it."""
    import datasets

    keys = (
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "category",
        "image",
        "source",
        "L2-category",
        "comment",
        "split",
    )
    columns: dict[str, list] = {k: [] for k in keys}
    for index, (colour, shape, count, where, hint, question, options, answer, category) in enumerate(MMBENCH_DOCS):
        columns["index"].append(index)
        columns["question"].append(question)
        columns["hint"].append(hint)
        for letter, option in zip("ABCD", options, strict=True):
            columns[letter].append(option)
        columns["answer"].append(answer)
        columns["category"].append(category)
        columns["image"].append(draw(colour, shape, count, where))
        columns["source"].append("evalkit")
        columns["L2-category"].append(MMBENCH_L2[category])
        columns["comment"].append("nan")
        columns["split"].append("dev")
    text = datasets.Value("string")
    features = datasets.Features(
        {k: datasets.Value("int64") if k == "index" else datasets.Image() if k == "image" else text for k in keys}
    )
    return _write(root, "lmms-lab-encoder/MMBench", columns, features, split="dev", config="en")


# MMMU (validation): "<image 1>" in the question names the image column; options are a Python list literal.
# (id, colour, shape, count, where, question, options, answer, question_type)
MMMU_DOCS = [
    (
        "validation_Art_1",
        "red",
        "circle",
        1,
        "left",
        "<image 1> What shape is shown?",
        "['square', 'circle', 'star']",
        "B",
        "multiple-choice",
    ),
    (
        "validation_Art_2",
        "blue",
        "square",
        1,
        "right",
        "What colour is the shape in <image 1>?",
        "['green', 'red', 'blue', 'yellow']",
        "C",
        "multiple-choice",
    ),
    ("validation_Math_1", "green", "circle", 2, "left", "<image 1> How many circles are there?", "[]", "2", "open"),
    (
        "validation_Math_2",
        "yellow",
        "square",
        3,
        "right",
        "How many squares are in <image 1>?",
        "['1', '2', '3', '4']",
        "C",
        "multiple-choice",
    ),
]


def write_mmmu(root: Path) -> Path:
    """``lmms-lab-encoder/MMMU`` (split ``validation``) as lmms-eval 0.7's ``mmmu_val`` reads it."""
    import datasets

    images = [f"image_{n}" for n in range(1, 8)]
    keys = (
        "id",
        "question",
        "options",
        "explanation",
        *images,
        "img_type",
        "answer",
        "topic_difficulty",
        "question_type",
        "subfield",
    )
    columns: dict[str, list] = {k: [] for k in keys}
    for doc_id, colour, shape, count, where, question, options, answer, kind in MMMU_DOCS:
        row = dict(
            id=doc_id, question=question, options=options, explanation="", img_type="['Diagrams']", answer=answer
        )
        row.update(topic_difficulty="Easy", question_type=kind, subfield="Shapes")
        row.update({image: None for image in images}, image_1=draw(colour, shape, count, where))
        for key in keys:
            columns[key].append(row[key])
    text = datasets.Value("string")
    features = datasets.Features({k: datasets.Image() if k in images else text for k in keys})
    return _write(root, "lmms-lab-encoder/MMMU", columns, features, split="validation")


# DocVQA: a question about a drawn "document" (a shape), scored by ANLS against several answers.
# (question_id, colour, shape, count, where, question, answers)
DOCVQA_DOCS = [
    ("101", "red", "circle", 1, "left", "What colour is the circle?", ["red", "Red"]),
    ("102", "blue", "square", 2, "right", "How many squares are there?", ["2", "two"]),
    ("103", "green", "circle", 1, "right", "What shape is shown?", ["circle"]),
    ("104", "yellow", "square", 3, "left", "Where are the squares?", ["left", "on the left"]),
]


def write_docvqa(root: Path) -> Path:
    """``lmms-lab-encoder/DocVQA``, config ``DocVQA`` (split ``validation``), as ``docvqa_val`` reads it."""
    import datasets

    keys = (
        "questionId",
        "question",
        "question_types",
        "image",
        "docId",
        "ucsf_document_id",
        "ucsf_document_page_no",
        "answers",
    )
    columns: dict[str, list] = {k: [] for k in keys}
    for n, (question_id, colour, shape, count, where, question, answers) in enumerate(DOCVQA_DOCS):
        row = dict(questionId=question_id, question=question, question_types=["figure/diagram"], docId=n)
        row.update(image=draw(colour, shape, count, where), ucsf_document_id=f"doc{n}", ucsf_document_page_no="1")
        row.update(answers=answers)
        for key in keys:
            columns[key].append(row[key])
    text = datasets.Value("string")
    features = datasets.Features(
        {
            "questionId": text,
            "question": text,
            "question_types": datasets.Sequence(text),
            "image": datasets.Image(),
            "docId": datasets.Value("int64"),
            "ucsf_document_id": text,
            "ucsf_document_page_no": text,
            "answers": datasets.Sequence(text),
        }
    )
    return _write(root, "lmms-lab-encoder/DocVQA", columns, features, split="validation", config="DocVQA")


def write_clip(
    path: Path, colours: list[str], *, frames_each: int = 4, frames: int | None = None, size: int = 32, fps: int = 4
) -> Path:
    """An MPEG-4 clip of solid colours, ``frames_each`` frames each (or ``frames`` in all, shared out in
    order), with a dark square moving across."""
    import av
    import numpy as np

    total = frames or frames_each * len(colours)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for n in range(total):
            array = np.full((size, size, 3), COLOURS[colours[n * len(colours) // total]], dtype=np.uint8)
            x = (n * 4) % (size - 8)
            array[8:16, x : x + 8] = 0
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


# Frames of each clip of the video tasks: lmms-eval's internvl_hf class samples 32 and refuses shorter
# clips; its llava_hf class hands LLaVA-OneVision every frame, where evalkit takes at most 32.
CLIP_FRAMES = 32

# Video-MME: multiple choice over a clip. (videoID, colours, question, options, answer, task_type)
VIDEOMME_DOCS = [
    (
        "vid001",
        ["red", "red"],
        "What colour is the video?",
        ["A. Red.", "B. Blue.", "C. Green.", "D. White."],
        "A",
        "Attribute Perception",
    ),
    (
        "vid002",
        ["blue", "green"],
        "Which colour comes last?",
        ["A. Red.", "B. Blue.", "C. Green.", "D. White."],
        "C",
        "Temporal Perception",
    ),
    (
        "vid003",
        ["white", "blue", "red"],
        "How many colours are shown?",
        ["A. One.", "B. Two.", "C. Three.", "D. Four."],
        "C",
        "Counting Problem",
    ),
]


def write_videomme(root: Path) -> Path:
    """``lmms-eval/Video-MME`` (split ``test``) and its clips (``$HF_HOME/videomme/data``), as
    lmms-eval 0.7's ``videomme`` reads them."""
    import datasets

    keys = ("video_id", "duration", "domain", "sub_category", "url", "videoID", "question_id", "task_type")
    keys += ("question", "options", "answer")
    columns: dict[str, list] = {k: [] for k in keys}
    for n, (video, colours, question, options, answer, task_type) in enumerate(VIDEOMME_DOCS):
        write_clip(Path(root) / HF_HOME / "videomme" / "data" / f"{video}.mp4", colours, frames=CLIP_FRAMES)
        row = dict(video_id=f"{n + 1:03d}", duration="short", domain="Life Record", sub_category="Daily Life")
        row.update(url=f"https://example.invalid/{video}", videoID=video, question_id=f"{n + 1:03d}-1")
        row.update(task_type=task_type, question=question, options=options, answer=answer)
        for key in keys:
            columns[key].append(row[key])
    text = datasets.Value("string")
    features = datasets.Features({k: datasets.Sequence(text) if k == "options" else text for k in keys})
    return _write(root, "lmms-eval/Video-MME", columns, features)


# EgoSchema (Subset): five options over a clip, the answer an option index. (video_idx, colours, question, answer)
EGOSCHEMA_OPTIONS = ["A. red", "B. blue", "C. green", "D. white", "E. yellow"]
EGOSCHEMA_DOCS = [
    ("ego001", ["green", "green"], "What colour is the scene?", "2"),
    ("ego002", ["white", "red"], "What colour does the scene end with?", "0"),
    ("ego003", ["blue", "white", "blue"], "Which colour is seen most?", "1"),
]


def write_egoschema(root: Path) -> Path:
    """``lmms-eval/egoschema``, config ``Subset`` (split ``test``), and its clips
    (``$HF_HOME/egoschema/videos``), as lmms-eval 0.7's ``egoschema_subset`` reads them."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("question_idx", "question", "video_idx", "option", "answer")}
    for n, (video, colours, question, answer) in enumerate(EGOSCHEMA_DOCS):
        write_clip(Path(root) / HF_HOME / "egoschema" / "videos" / f"{video}.mp4", colours, frames=CLIP_FRAMES)
        columns["question_idx"].append(str(n))
        columns["question"].append(question)
        columns["video_idx"].append(video)
        columns["option"].append(EGOSCHEMA_OPTIONS)
        columns["answer"].append(answer)
    text = datasets.Value("string")
    features = datasets.Features(
        {"question_idx": text, "question": text, "video_idx": text, "option": datasets.Sequence(text), "answer": text}
    )
    return _write(root, "lmms-eval/egoschema", columns, features, config="Subset")


# OVO-Bench forward (multi-round): each round shows the next chunk of a clip and asks again; REC counts
# an action, SSR asks whether a step is done, CRR whether the question can be answered yet.
# (id, task, chunk colours per round, activity or question, per-round test_info)
OVO_FORWARD_DOCS = [
    (101, "REC", [["red"], ["red", "blue"]], "wave", [{"count": 0}, {"count": 1}]),
    (
        102,
        "SSR",
        [["green"], ["green", "white"], ["white", "yellow"]],
        "",
        [{"step": "paint the wall", "type": 0}, {"step": "paint the wall", "type": 1}, {"step": "dry", "type": 1}],
    ),
    (103, "CRR", [["blue"], ["blue", "red"]], "What colour comes after blue?", [{"type": 0}, {"type": 1}]),
]
OVO_CHUNK_FRAMES = 8


def write_ovo_forward(root: Path) -> Path:
    """``kcz358/OVOBench``, config ``forward`` (split ``test``), and its chunked clips
    (``$HF_HOME/ovobench/chunked_videos/{id}_{round}.mp4``), as lmms-eval 0.7's ``ovo_forward`` reads them."""
    import datasets

    columns: dict[str, list] = {k: [] for k in ("id", "task", "activity", "question", "test_info")}
    for video, task, chunks, text, infos in OVO_FORWARD_DOCS:
        for n, colours in enumerate(chunks):
            chunk = Path(root) / HF_HOME / "ovobench" / "chunked_videos" / f"{video}_{n}.mp4"
            write_clip(chunk, colours, frames=OVO_CHUNK_FRAMES)
        columns["id"].append(video)
        columns["task"].append(task)
        columns["activity"].append(text if task == "REC" else "")
        columns["question"].append(text if task == "CRR" else "")
        rows = []
        for n, info in enumerate(infos):
            rows.append({"realtime": float(4 * (n + 1)), "count": info.get("count"), "type": info.get("type")})
            rows[-1]["step"] = info.get("step")
        columns["test_info"].append(rows)
    text = datasets.Value("string")
    number = datasets.Value("int64")
    info = {"realtime": datasets.Value("float64"), "count": number, "type": number, "step": text}
    features = datasets.Features(
        {"id": number, "task": text, "activity": text, "question": text, "test_info": datasets.List(info)}
    )
    return _write(root, "kcz358/OVOBench", columns, features, config="forward")


# PhyX: a physics question about a drawing, the image base64-encoded in the row; its judge (an LLM
# asked whether a free-form answer matches the option letter) is hard-wired to api.deepseek.com.
# (colour, shape, count, where, question, answer, category)
PHYX_DOCS = [
    ("red", "circle", 1, "left", "Which ball falls first? A. red B. blue C. green D. white", "B", "Mechanics"),
    ("blue", "square", 2, "right", "Which block is heavier? A. red B. blue C. green D. white", "A", "Mechanics"),
    ("green", "circle", 1, "left", "Which lens focuses light? A. red B. blue C. green D. white", "C", "Optics"),
]
PHYX_SPLITS = ("phyx_mc", "phyx_oe", "phyx_mini_mc", "phyx_mini_oe")


def write_phyx(root: Path) -> Path:
    """``Cloudriver/PhyX``, config ``data_for_llms_eval`` (splits phyx_mc, phyx_oe, phyx_mini_mc,
    phyx_mini_oe), as lmms-eval 0.7's ``phyx`` tasks read them."""
    import base64
    import io

    import datasets

    columns: dict[str, list] = {k: [] for k in ("index", "question", "image", "answer", "category")}
    for n, (colour, shape, count, where, question, answer, category) in enumerate(PHYX_DOCS):
        buffer = io.BytesIO()
        draw(colour, shape, count, where).save(buffer, format="PNG")
        columns["index"].append(n)
        columns["question"].append(question)
        columns["image"].append(base64.b64encode(buffer.getvalue()).decode())
        columns["answer"].append(answer)
        columns["category"].append(category)
    text = datasets.Value("string")
    features = datasets.Features(
        {"index": datasets.Value("int64"), "question": text, "image": text, "answer": text, "category": text}
    )
    parts = {("data_for_llms_eval", split): columns for split in PHYX_SPLITS}
    return _write_splits(root, "Cloudriver/PhyX", features, parts)


# MixEval-X image2text, multiple choice: the judge names the option the answer chose (its filter),
# scored against the option's index. (colour, shape, count, where, query, options, answer index)
MIX_EVALS_DOCS = [
    ("red", "circle", 1, "left", "What colour is the shape?", ["blue", "red", "green"], "1"),
    ("green", "square", 2, "right", "How many squares are there?", ["one", "two", "three"], "1"),
    ("blue", "circle", 1, "left", "Which side is the circle on?", ["left", "right"], "0"),
]


def write_mix_evals(root: Path) -> Path:
    """``MixEval/MixEval-X``, config ``image2text`` (split ``multiple_choice``), and its images
    (``$HF_HOME/mix_evals_image2text``), as lmms-eval 0.7's ``mix_evals_image2text_mc`` reads them."""
    import datasets

    keys = ("id", "problem_type", "input_file", "query", "options", "reference_answer")
    columns: dict[str, list] = {k: [] for k in keys}
    for n, (colour, shape, count, where, query, options, answer) in enumerate(MIX_EVALS_DOCS):
        image = Path(root) / HF_HOME / "mix_evals_image2text" / "images" / f"{n}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        draw(colour, shape, count, where).save(image)
        row = dict(id=str(n), problem_type="single-choice", input_file=[f"images/{n}.png"], query=query)
        row.update(options=options, reference_answer=answer)
        for key in keys:
            columns[key].append(row[key])
    text = datasets.Value("string")
    listed = ("input_file", "options")
    features = datasets.Features({k: datasets.Sequence(text) if k in listed else text for k in keys})
    return _write_splits(root, "MixEval/MixEval-X", features, {("image2text", "multiple_choice"): columns})


WRITERS = {
    "mme": write_mme,
    "pope": write_pope,
    "chartqa": write_chartqa,
    "ai2d": write_ai2d,
    "mmvet": write_mmvet,
    "scienceqa_img": write_scienceqa,
    "mmbench_en_dev": write_mmbench,
    "mmmu_val": write_mmmu,
    "docvqa_val": write_docvqa,
    "videomme": write_videomme,
    "egoschema_subset": write_egoschema,
    "ovo_forward": write_ovo_forward,
    "phyx_mc": write_phyx,
    "mix_evals_image2text_mc": write_mix_evals,
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
