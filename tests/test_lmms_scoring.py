"""lmms-eval's own task files scored as lmms-eval 0.7.3 scores them, in-process, without a model.

Each test builds an unchanged task from lmms-eval's installed task folder (``lmms:NAME``) on a small
local dataset in the hub's schema, scores made-up outputs through evalkit's scoring, and takes
its expected values from the task's own functions in lmms-eval (its ``utils.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from evalkit.tasks.library import TaskLibrary
from evalkit.tasks.lmms_scoring import THINKING_TAGS
from evalkit.tasks.requests import PromptOptions, build_plans, number_requests
from evalkit.tasks.scoring import score

from conftest import TASK_FIXTURES

lmms_eval = pytest.importorskip("lmms_eval")
from lmms_eval.api.reasoning import strip_reasoning_tags  # noqa: E402
from lmms_eval.tasks.docvqa import utils as docvqa_utils  # noqa: E402
from lmms_eval.tasks.mme import utils as mme_utils  # noqa: E402


def build(names: list[str], include: tuple[Path, ...] = (), metadata: dict | None = None):
    loaded = TaskLibrary(include, metadata=metadata).load_checked(names)
    plans = build_plans(loaded["tasks"], PromptOptions())
    return loaded, plans, number_requests(plans)


def model_folder(root: Path, model_type: str) -> Path:
    folder = root / "models" / model_type
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def write_hub(root: Path, repo: str, config: str | None, split: str, columns: dict, features: dict) -> None:
    """``repo`` as the hub lays it out: one parquet file per split, named in the dataset card."""
    folder = root / repo
    rel = f"{config or 'data'}/{split}-00000-of-00001.parquet"
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(folder / rel))
    card = {"configs": [{"config_name": config or "default", "data_files": [{"split": split, "path": rel}]}]}
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n")


def picture(i: int) -> Image.Image:
    return Image.new("RGB", (16, 16), (20 * i % 256, 80, 160))


# MME: question pairs (same image, one "Yes" and one "No" question); 5 perception pairs, 3 cognition.
MME_CATEGORIES = ["existence", "count", "position", "color", "OCR", "commonsense_reasoning", "code_reasoning"]
MME_PAIRS = [*MME_CATEGORIES[:5], "commonsense_reasoning", "code_reasoning", "code_reasoning"]


@pytest.fixture
def mme(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    columns: dict[str, list] = {k: [] for k in ("question_id", "image", "question", "answer", "category")}
    for pair, category in enumerate(MME_PAIRS):
        for answer in ("Yes", "No"):
            columns["question_id"].append(f"{category}/{pair}.png")
            columns["image"].append(picture(pair))
            columns["question"].append(f"Is this picture {pair} {answer.lower()}? Please answer yes or no.")
            columns["answer"].append(answer)
            columns["category"].append(category)
    string = datasets.Value("string")
    features = {"question_id": string, "image": datasets.Image(), "question": string, "answer": string}
    write_hub(tmp_path, "lmms-lab-encoder/MME", None, "test", columns, {**features, "category": string})


def mme_outputs(n: int) -> list[str]:
    # a mix of right, wrong and unparsable answers, with the spacing and case models produce
    return [[" Yes.", "no", "No", "maybe", "yes, it is"][i % 5] for i in range(n)]


def test_mme_scores_and_counts_as_lmms_eval(mme):
    loaded, plans, requests = build(["lmms:mme"])
    task = loaded["tasks"]["mme"]
    outputs = mme_outputs(len(requests))
    scored = score(plans, loaded["groups"], outputs, bootstrap_iters=0)

    docs = [task.eval_docs[r.doc_id] for r in requests]
    per_doc = [mme_utils.mme_process_results(doc, [out.strip()]) for doc, out in zip(docs, outputs, strict=True)]
    results = scored.results["results"]["mme"]
    for metric in ("mme_perception_score", "mme_cognition_score"):
        values = [m[metric] for m in per_doc if metric in m]
        assert results[f"{metric},none"] == pytest.approx(mme_utils.mme_aggregate_results(values))
    # lmms-eval counts docs (evaluator.py, n-samples); lm-eval counted the larger metric's 10 values
    assert len(docs) == 16 and sum("mme_perception_score" in m for m in per_doc) == 10
    assert scored.results["n-samples"]["mme"] == {"original": 16, "effective": 16}


def test_mme_request_settings_follow_the_model_class(mme, tmp_path):
    """lm-eval's default stop ("\\n\\n") reaches only a class that stops at until (qwen2_vl)."""
    task_kwargs = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    _, _, plain = build(["lmms:mme"])
    assert plain[0].args[1] == {**task_kwargs, "until": ["\n\n"]}  # no known class: the task's settings
    want = {
        "llava": {"until": [], "max_new_tokens": 16, "num_beams": 1, "do_sample": False},
        "qwen2_vl": {"until": ["\n\n"], "max_new_tokens": 16, "num_beams": 1, "do_sample": False},
        "qwen2_5_vl": {"until": [], "max_new_tokens": 16, "num_beams": 1, "do_sample": False},
        "internvl": {"until": [], "max_new_tokens": 16, "num_beams": 1, "do_sample": False},
    }
    for model_type, kwargs in want.items():
        _, _, requests = build(["lmms:mme"], metadata={"pretrained": str(model_folder(tmp_path, model_type))})
        assert requests[0].args[1] == kwargs, model_type
        assert requests[0].args[0].endswith("\nAnswer the question using a single word or phrase.")


# DocVQA test split: process_results returns "anls" and "submission"; only "submission" is listed,
# with an aggregation that takes lmms-eval's ``args`` and writes a submission file.


@pytest.fixture
def docvqa(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    n = 3
    columns = {
        "questionId": [str(100 + i) for i in range(n)],
        "question": [f"What is written in box {i}?" for i in range(n)],
        "image": [picture(i) for i in range(n)],
        "docId": list(range(n)),
    }
    features = {
        "questionId": datasets.Value("string"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
        "docId": datasets.Value("int64"),
    }
    write_hub(tmp_path, "lmms-lab-encoder/DocVQA", "DocVQA", "test", columns, features)


def test_args_aggregation_writes_into_the_run_folder_and_unlisted_keys_stay_in_rows(docvqa, tmp_path):
    loaded, plans, requests = build(["lmms:docvqa_test"])
    task = loaded["tasks"]["docvqa_test"]
    outputs = [f" answer {r.doc_id} " for r in requests]
    scored = score(plans, loaded["groups"], outputs, bootstrap_iters=0, output=tmp_path / "run")

    docs = [task.eval_docs[r.doc_id] for r in requests]
    per_doc = [docvqa_utils.docvqa_test_process_results(d, [o.strip()]) for d, o in zip(docs, outputs, strict=True)]
    written = tmp_path / "run" / "submissions" / "docvqa_test_for_submission.json"
    assert json.loads(written.read_text()) == [m["submission"] for m in per_doc]
    assert not (tmp_path / "submissions").exists()
    results = scored.results["results"]["docvqa_test"]
    assert "submission,none" in results and not any(key.startswith("anls") for key in results)
    rows = scored.samples["docvqa_test"]
    assert [row["anls"] for row in rows] == [m["anls"] for m in per_doc]  # lmms-eval logs every key
    assert scored.results["n-samples"]["docvqa_test"] == {"original": 3, "effective": 3}


# reasoning_tags / auto_strip_thinking: no lmms-eval task sets them, so fixture task files do.

REASONING_TASKS = TASK_FIXTURES / "lmms_reasoning"  # reason_default, reason_own, reason_off, reason_auto
REASONING_OUTPUTS = [
    "<think>Is it A? No.</think> B",
    "<reason>Maybe C.</reason>D",
    "<thinking>A or B</thinking>C",
    "Thought about A.</think>B",
]


@pytest.fixture
def reasoning_data(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    columns = {
        "question": [f"Question {i}?" for i in range(4)],
        "answer": ["B", "D", "C", "B"],
        "image": [picture(i) for i in range(4)],
    }
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image()).to_parquet("data/reasoning.parquet")


def test_reasoning_tags_and_auto_strip_thinking_as_lmms_eval(reasoning_data):
    default_tags = [["<think>", "</think>"], ["<analysis>", "</analysis>"]]  # lmms-eval's --reasoning_tags
    expected = {
        "reason_default": [strip_reasoning_tags(o, default_tags) for o in REASONING_OUTPUTS],
        "reason_own": [strip_reasoning_tags(o, [["<reason>", "</reason>"]]) for o in REASONING_OUTPUTS],
        "reason_off": REASONING_OUTPUTS,
        "reason_auto": [strip_reasoning_tags(o, [list(p) for p in THINKING_TAGS]) for o in REASONING_OUTPUTS],
    }
    assert len({tuple(v) for v in expected.values()}) == len(expected)
    loaded, plans, requests = build(list(expected), (REASONING_TASKS,))
    scored = score(plans, {}, [REASONING_OUTPUTS[r.doc_id] for r in requests], bootstrap_iters=0)
    for name, want in expected.items():
        rows = scored.samples[name]
        assert [row["filtered_resps"][0] for row in rows] == want, name
        assert [row["resps"][0][0] for row in rows] == REASONING_OUTPUTS  # the raw outputs stay in the rows
        answers = [loaded["tasks"][name].eval_docs[i]["answer"] for i in range(4)]
        accuracy = sum(w.strip() == a for w, a in zip(want, answers, strict=True)) / 4
        assert scored.results["results"][name]["exact_match,none"] == pytest.approx(accuracy), name


def test_a_token_limit_from_gen_kwargs_wins_over_the_tasks():
    """--gen-kwargs max_gen_toks=N (lm-eval's name) lands beside a task's max_new_tokens and wins."""
    from evalkit.tasks.lmms_models import request_gen_kwargs

    task = {"max_new_tokens": 1024, "temperature": 0.2, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    assert request_gen_kwargs("llava_hf", task)["max_new_tokens"] == 1024
    merged = request_gen_kwargs("llava_hf", {**task, "max_gen_toks": 8})
    assert merged["max_new_tokens"] == 8 and merged["do_sample"] is True  # llava_hf samples iff temperature > 0
    assert request_gen_kwargs("llava_hf", {"until": ["\n"]})["max_new_tokens"] == 1024  # the class's default
