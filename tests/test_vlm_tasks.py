"""Image tasks on evalkit's task side, in-process, without a model.

lm-eval's multimodal tasks (``doc_to_image``; lm-eval's own ``mmmu_val_art``, unchanged, on a local
``MMMU/MMMU`` folder in the hub schema) and lmms-eval task files (``doc_to_visual``,
``lmms_eval_specific_kwargs``, ``doc_to_messages``; the bundled ``vlm_demo`` group and the
fixtures in tests/fixtures/tasks/vlm) build requests that carry image digests, not images; an
evaluating rank finds the images again through ``VisualSource``; scoring with made-up generations
gives the expected metrics, JSON-clean sample rows and the same task hashes on every build.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from library_data import mmmu_image, write_mmmu
from PIL import Image, ImageDraw

from evalkit.identity import task_config_hash
from evalkit.tasks.images import ImagesChanged, VisualSource, as_images, digest
from evalkit.tasks.library import TaskLibrary
from evalkit.tasks.lmms import LmmsTask, choose_prompt_kwargs
from evalkit.tasks.lmms_models import model_name, prepare_image
from evalkit.tasks.requests import PromptOptions, Visuals, build_plans, number_requests
from evalkit.tasks.scoring import score, task_hash
from evalkit.tasks.validate import validate

from conftest import PACKAGE, TASK_FIXTURES

VLM_FIXTURES = TASK_FIXTURES / "vlm"
VLM_DEMO = PACKAGE / "bundled_tasks" / "vlm_demo"
DEMO_TASKS = ["vlm_demo_color", "vlm_demo_count", "vlm_demo_position"]
LLAVA_POST = "\nAnswer the question using a single word: yes or no."
DEFAULT_POST = "\nAnswer the question with yes or no."


def build(names: list[str], include: tuple[Path, ...] = (), metadata: dict | None = None):
    loaded = TaskLibrary(include, metadata=metadata).load_checked(names)
    plans = build_plans(loaded["tasks"], PromptOptions())
    return loaded, plans, number_requests(plans)


def model_folder(root: Path, model_type: str) -> Path:
    folder = root / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


# ----------------------------------------------------------------------------- images


def test_as_images_takes_every_form_a_task_yields(tmp_path):
    red = Image.new("RGB", (8, 6), (255, 0, 0))
    palette = red.convert("P")
    buffer = io.BytesIO()
    red.save(buffer, format="PNG")
    (tmp_path / "red.png").write_bytes(buffer.getvalue())
    forms = [
        red,
        palette,
        str(tmp_path / "red.png"),
        tmp_path / "red.png",
        buffer.getvalue(),
        {"bytes": buffer.getvalue(), "path": None},
        {"bytes": None, "path": str(tmp_path / "red.png")},
    ]
    images = as_images([forms[:3], tuple(forms[3:])])
    assert len(images) == len(forms)
    assert {image.mode for image in images} == {"RGB"}
    assert {digest(image) for image in images} == {digest(red)}
    assert as_images(None) == []
    assert digest(red) != digest(Image.new("RGB", (6, 8), (255, 0, 0)))  # the size counts, not only the bytes
    with pytest.raises(ValueError, match="cannot read an image"):
        as_images(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="cannot turn a int into an image"):
        as_images(3)


# ----------------------------------------------------------------------------- the bundled lmms-eval task


def test_bundled_task_builds_requests_with_visuals_and_stable_digests():
    loaded, plans, requests = build(["vlm_demo"])
    assert sorted(loaded["tasks"]) == DEMO_TASKS
    assert all(isinstance(task, LmmsTask) for task in loaded["tasks"].values())
    assert len(requests) == 24
    for request in requests:
        assert request.visuals is not None and len(request.visuals.digests) == 1
        assert (request.visuals.task, request.visuals.doc_id) == (request.task, request.doc_id)
        context, gen_kwargs = request.args
        assert context.endswith(DEFAULT_POST)
        assert gen_kwargs["max_new_tokens"] == 8 and gen_kwargs["until"] == ["\n\n"]
        doc = loaded["tasks"][request.task].eval_docs[request.doc_id]
        assert request.visuals.digests == (digest(doc["image"].convert("RGB")),)
    # rank 0 keeps digests, not images, in lm-eval's instances
    for request, instance in zip(requests, [i for p in plans for i in p.task.instances], strict=True):
        json.dumps(instance.args)
        assert instance.args[-1] == {"visual": list(request.visuals.digests)}
    # both questions about an image name the same image; four images per subtask
    per_task = {t: {r.visuals.digests for r in requests if r.task == t} for t in DEMO_TASKS}
    assert all(len(d) == 4 for d in per_task.values())
    _, _, again = build(["vlm_demo"])
    assert [r.visuals for r in again] == [r.visuals for r in requests]
    assert [r.args for r in again] == [r.args for r in requests]


def test_prompt_kwargs_block_follows_the_model_family(tmp_path):
    def context(metadata):
        return build(["vlm_demo_color"], metadata=metadata)[2][0].args[0]

    assert context(None).endswith(DEFAULT_POST)
    assert context({"pretrained": str(model_folder(tmp_path, "llava"))}).endswith(LLAVA_POST)
    assert context({"pretrained": str(model_folder(tmp_path, "gpt2"))}).endswith(DEFAULT_POST)
    assert context({"pretrained": str(tmp_path / "not-a-model")}).endswith(DEFAULT_POST)

    blocks = {"default": {"post_prompt": "d"}, "qwen2_vl": {"post_prompt": "q"}, "llava": {"post_prompt": "l"}}
    qwen25 = model_name({"pretrained": str(model_folder(tmp_path, "qwen2_5_vl"))})
    assert qwen25 == "qwen2_5_vl"  # lmms-eval matches the class name exactly, else default
    assert choose_prompt_kwargs(blocks, qwen25)["post_prompt"] == "d"
    assert choose_prompt_kwargs(blocks, "qwen2_vl") == {"post_prompt": "q"}
    assert choose_prompt_kwargs(blocks, None)["post_prompt"] == "d"  # lmms-eval lays default over the mapping
    assert choose_prompt_kwargs(blocks, "idefics2", legacy=True) == {"post_prompt": "d"}


def test_visual_source_loads_lazily_and_checks_digests():
    _, _, requests = build(["vlm_demo"])
    calls = []

    def load_tasks():  # what an evaluating rank does: its own copy of the tasks
        calls.append(1)
        return TaskLibrary().load_checked(["vlm_demo"])["tasks"]

    source = VisualSource(load_tasks)
    inputs = [source.images(r.visuals) for r in requests]
    assert calls == []  # nothing is loaded or decoded until a backend asks
    assert [i.digests for i in inputs] == [r.visuals.digests for r in requests]
    for request, given in zip(requests, inputs, strict=True):
        images = given.load()
        assert [digest(image) for image in images] == list(request.visuals.digests)
        assert all(image.mode == "RGB" and image.size == (64, 64) for image in images)
    assert calls == [1]
    assert set(source._docs) == set(DEMO_TASKS)
    wrong = Visuals(task="vlm_demo_color", doc_id=0, digests=requests[2].visuals.digests)
    with pytest.raises(ImagesChanged, match="vlm_demo_color' doc 0: the images here"):
        source.images(wrong).load()
    with pytest.raises(ImagesChanged, match="has 8 docs here"):
        source.load(Visuals(task="vlm_demo_color", doc_id=8, digests=()))


def test_bundled_task_scores_with_its_function_aggregation():
    loaded, plans, requests = build(["vlm_demo"])

    def reply(request) -> str:
        doc = loaded["tasks"][request.task].eval_docs[request.doc_id]
        if request.task == "vlm_demo_color":
            return f" {doc['answer'].capitalize()}."  # outputs are stripped before process_results
        if request.task == "vlm_demo_count":
            return "yes"  # right on the first question of each pair, wrong on the second
        return "maybe"

    scored = score(plans, loaded["groups"], [reply(r) for r in requests], bootstrap_iters=0)
    results = scored.results["results"]
    assert (results["vlm_demo_color"]["acc,none"], results["vlm_demo_color"]["mme_score,none"]) == (1.0, 200.0)
    assert (results["vlm_demo_count"]["acc,none"], results["vlm_demo_count"]["mme_score,none"]) == (0.5, 50.0)
    assert (results["vlm_demo_position"]["acc,none"], results["vlm_demo_position"]["mme_score,none"]) == (0.0, 0.0)
    assert results["vlm_demo"]["acc,none"] == pytest.approx(0.5)
    row = scored.samples["vlm_demo_color"][0]
    assert row["doc"]["image"] == f"<image {requests[0].visuals.digests[0]}>"
    assert row["arguments"]["gen_args_0"]["arg_2"] == {"visual": list(requests[0].visuals.digests)}
    assert json.loads(json.dumps(scored.samples)) == scored.samples
    config = scored.results["configs"]["vlm_demo_color"]
    assert "def doc_to_visual" in config["doc_to_visual"] and "doc_to_image" not in config
    assert config["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == DEFAULT_POST


def test_bundled_data_generator_is_deterministic(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vlm_demo_make_data", VLM_DEMO / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    first = {p.name: p.read_bytes() for p in make_data.write(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in make_data.write(tmp_path / "b")}
    assert first == second
    assert sum(p.stat().st_size for p in VLM_DEMO.rglob("*") if p.is_file() and "__pycache__" not in p.parts) < 200_000
    import pyarrow.parquet as pq

    for name in first:
        committed = pq.read_table(VLM_DEMO / "data" / name).to_pylist()
        assert committed == pq.read_table(io.BytesIO(first[name])).to_pylist(), f"rerun make_data.py for {name}"


# ----------------------------------------------------------------------------- lmms-eval keys on fixture data


def shape(colour: tuple[int, int, int], circle: bool) -> Image.Image:
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    (draw.ellipse if circle else draw.rectangle)((6, 6, 26, 26), fill=colour)
    return image


RED, BLUE = (220, 30, 30), (40, 70, 220)


@pytest.fixture
def vlm_data(tmp_path, monkeypatch) -> list[list[Image.Image]]:
    """data/vlm.parquet in a fresh working folder: each doc's image as an Image column, a file path,
    PNG bytes and a list of two images. Returns each doc's images (first one = the single image)."""
    import datasets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "images").mkdir()
    docs = [(RED, "red"), (BLUE, "blue"), (RED, "red")]
    columns: dict[str, list] = {k: [] for k in ("question", "answer", "image", "path", "png", "images")}
    expected = []
    for i, (colour, answer) in enumerate(docs):
        first, second = shape(colour, circle=False), shape(colour, circle=True).convert("L")
        buffer = io.BytesIO()
        first.save(buffer, format="PNG")
        path = f"images/{i}.png"
        first.save(tmp_path / path)
        columns["question"].append(f"What colour is shape {i}?")
        columns["answer"].append(answer)
        columns["image"].append(first)
        columns["path"].append(path)
        columns["png"].append(buffer.getvalue())
        columns["images"].append([first, second])
        expected.append([first, second.convert("RGB")])
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
            "path": datasets.Value("string"),
            "png": datasets.Value("binary"),
            "images": datasets.List(datasets.Image()),
        }
    )
    datasets.Dataset.from_dict(columns, features=features).to_parquet("data/vlm.parquet")
    return expected


@pytest.mark.parametrize("kind", ["image", "path", "bytes", "list"])
def test_doc_to_visual_as_a_field(vlm_data, kind):
    loaded, plans, requests = build([f"vlm_field_{kind}"], (VLM_FIXTURES,))
    task = loaded["tasks"][f"vlm_field_{kind}"]
    assert isinstance(task, LmmsTask) and task.MULTIMODAL
    assert len(requests) == len(vlm_data)
    for request, images in zip(requests, vlm_data, strict=True):
        want = images if kind == "list" else images[:1]
        assert request.visuals.digests == tuple(digest(image) for image in want)
        assert request.args[0] == f"What colour is shape {request.doc_id}?"
    source = VisualSource(lambda: TaskLibrary((VLM_FIXTURES,)).load_checked([f"vlm_field_{kind}"])["tasks"])
    assert [digest(i) for i in source.images(requests[1].visuals).load()] == list(requests[1].visuals.digests)
    scored = score(plans, {}, ["red", "red", "red"], bootstrap_iters=0)
    assert scored.results["results"][f"vlm_field_{kind}"]["exact_match,none"] == pytest.approx(2 / 3)
    json.dumps(scored.samples)


def test_doc_to_messages_gives_chat_contexts(vlm_data, tmp_path):
    qwen = {"pretrained": str(model_folder(tmp_path, "qwen2_vl"))}
    for metadata, post in ((None, " Answer in one word."), (qwen, " One word:")):
        loaded, plans, requests = build(["vlm_messages"], (VLM_FIXTURES,), metadata=metadata)
        request = requests[0]
        assert request.args[0] == [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "Compare the two pictures."},
                    {"type": "image"},
                    {"type": "text", "text": f"What colour is shape 0?{post}"},
                ],
            }
        ]
        # lmms-eval's qwen2_vl class hands its processor each image after a JPEG round trip and a resize
        name = None if metadata is None else "qwen2_vl"
        assert request.visuals.digests == tuple(digest(prepare_image(name, i)) for i in vlm_data[0])
    scored = score(plans, {}, ["red", "blue", "blue"], bootstrap_iters=0)
    rows = scored.samples["vlm_messages"]
    assert scored.results["results"]["vlm_messages"]["exact_match,none"] == pytest.approx(2 / 3)
    assert json.loads(json.dumps(rows)) == rows
    assert rows[0]["doc"]["images"] == [f"<image {digest(i)}>" for i in vlm_data[0]]  # the doc's own images


def test_multiple_choice_image_task_gives_each_choice_the_images(vlm_data):
    _, plans, requests = build(["vlm_choice"], (VLM_FIXTURES,))
    assert [r.kind for r in requests] == ["loglikelihood"] * 6
    assert [r.args for r in requests[:2]] == [("What colour is shape 0?", " red"), ("What colour is shape 0?", " blue")]
    assert requests[0].visuals == requests[1].visuals != requests[2].visuals
    outputs = [(-1.0, True) if r.instance == (r.doc_id % 2) else (-5.0, False) for r in requests]
    scored = score(plans, {}, outputs, bootstrap_iters=0)
    assert scored.results["results"]["vlm_choice"]["acc,none"] == pytest.approx(1.0)


def test_lmms_task_files_validate(vlm_data):
    library = TaskLibrary((VLM_FIXTURES,))
    names = ["vlm_demo", "vlm_field_image", "vlm_messages", "vlm_choice", str(VLM_FIXTURES / "vlm_field_list.yaml")]
    assert validate(library, names) == dict.fromkeys(names)


# ----------------------------------------------------------------------------- lm-eval's own mmmu task


@pytest.fixture
def mmmu_root(tmp_path, monkeypatch) -> Path:
    write_mmmu(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_lm_eval_mmmu_task_runs_unchanged(mmmu_root):
    loaded, plans, requests = build(["mmmu_val_art"])
    task = loaded["tasks"]["mmmu_val_art"]
    assert type(task).__name__ == "ConfigurableTask" and task.MULTIMODAL
    assert [len(r.visuals.digests) for r in requests] == [1, 2, 1, 3]
    assert requests[1].visuals.digests == (digest(mmmu_image("blue", 1)), digest(mmmu_image("green", 4)))
    third = requests[3].visuals.digests
    assert third[0] == third[2] == digest(mmmu_image("red", 2)) != third[1]  # <image 1> twice
    assert requests[1].args[0].startswith("Which painting shows more circles, <image> or <image>?")
    assert requests[0].args[1]["until"] == ["<|endoftext|>"]

    source = VisualSource(lambda: TaskLibrary().load_checked(["mmmu_val_art"])["tasks"])
    assert [digest(i) for i in source.images(requests[3].visuals).load()] == list(third)

    generations = ["A", "(A)", "There are 3 circles.", "B"]
    scored = score(plans, loaded["groups"], generations, bootstrap_iters=0)
    assert scored.results["results"]["mmmu_val_art"]["acc,none"] == pytest.approx(0.75)
    rows = scored.samples["mmmu_val_art"]
    assert [r["acc"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    assert json.loads(json.dumps(rows)) == rows
    assert rows[0]["doc"]["image_1"] == f"<image {requests[0].visuals.digests[0]}>"
    assert rows[0]["doc"]["image_2"] is None

    settings = {"seed": 1234}
    loaded2, plans2, _ = build(["mmmu_val_art"])
    rows2 = score(plans2, loaded2["groups"], generations, bootstrap_iters=0).samples["mmmu_val_art"]
    assert task_hash(rows2) == task_hash(rows)
    assert [r["doc_hash"] for r in rows2] == [r["doc_hash"] for r in rows]
    assert task_config_hash(plans2[0], settings) == task_config_hash(plans[0], settings)
