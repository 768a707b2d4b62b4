"""lmms-eval's own task folders, unchanged and named ``lmms:NAME``, on tiny VLMs: evalkit's prompts,
generations, per-sample metrics, aggregates and sample counts equal what lmms-eval 0.7.3 itself gave
with its own model classes on the same models and data.

The references (tests/reference/lmms-eval-0.7.3, written by tests/reference/make_lmms_reference.py)
hold, per doc, the prompt text lmms-eval logged, the raw generation, the filtered answer and the
per-sample metric values, and the task's aggregates. Each run here is ``python -m evalkit`` in a
folder holding the tasks' data in the hub schemas (evalkit.testing.lmms_data), as in lmms-eval's run,
with ``HF_HOME`` where the video tasks look for their clips.

Where lmms-eval's class differs from the checkpoint's own settings, the run says so:
* mmvet is graded by a stub judge (tests/openai_stub.py's ``hashed_grade``: a grade from the hash
  of the judge request), so equal grades mean evalkit sent lmms-eval's judge requests; both tools
  ran it greedily (``temperature=0`` from the command line; its YAML samples at 0.2).
* llava_hf and internvl_hf are lmms-eval's chat classes: they prompt with the task's doc_to_messages
  (mmmu_val interleaves its images with the text) and log doc_to_text; the references hold both.
* internvl_hf loads every model in bfloat16; its references were made in float32, as evalkit runs
  here (make_lmms_reference.py says why: bfloat16 rounding of evalkit's padded prompts can flip a
  near-tied token).
* llava_hf hands LLaVA-OneVision's processor images=[] with a video-only request, which fails; its
  references give None there (make_lmms_reference.py). Clips here have 32 frames: llava_hf hands
  every frame to the processor, evalkit at most 32.
* qwen2_vl loads the processor with min_pixels=3136 and max_pixels=602112. evalkit reads the
  checkpoint's bounds, which for Qwen2-VL's releases (3136 to 12845056) contain those; the tiny
  model's are narrower, so its copy here gets the class's bounds. The class strips its answers
  (models/simple/qwen2_vl.py), so its raw generations are compared stripped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubBehaviour, hashed_grade

from evalkit.testing.lmms_data import HF_HOME

from conftest import REPO, run_evalkit

pytestmark = pytest.mark.multiprocess

REFERENCES = REPO / "tests" / "reference" / "lmms-eval-0.7.3"
# family -> (lmms-eval class, evalkit flags, tasks), as make_lmms_reference.py ran lmms-eval; mmvet
# is graded by the stub judge and run greedily (its YAML samples), as lmms-eval was.
RUNS = {
    "llava": (
        "llava_hf",
        ["--batch-size", "4", "--gen-kwargs", "temperature=0"],
        ["mme", "pope", "chartqa", "ai2d", "scienceqa_img", "mmbench_en_dev_static", "mmmu_val", "docvqa_val"]
        + ["mmvet", "pope_full"],
    ),
    "qwen2_vl": ("qwen2_vl", ["--batch-size", "1"], ["mme", "videomme", "egoschema_subset", "ovo_forward"]),
    "qwen2_5_vl": ("qwen2_5_vl", ["--batch-size", "1"], ["mme", "videomme", "egoschema_subset", "ovo_forward"]),
    "internvl": ("internvl_hf", ["--batch-size", "1"], ["mme", "videomme", "egoschema_subset"]),
    "llava_onevision": ("llava_hf", ["--batch-size", "2"], ["mme", "videomme", "egoschema_subset"]),
}
GROUPS = {"pope_full": ["pope_adv", "pope_pop", "pope_random"]}  # run by name, checked by member
STRIPS_ANSWERS = {"qwen2_vl"}
NOT_METRICS = {"name", "sample_len", "alias"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from evalkit.testing.lmms_data import WRITERS

    folder = tmp_path_factory.mktemp("lmms-data")
    for write in WRITERS.values():
        write(folder)
    return folder


def tiny_model(family: str, folder: Path) -> Path:
    from evalkit.testing.tinyvlm import build_tiny_vlm, with_released_pixels

    return with_released_pixels(build_tiny_vlm(family, folder / family), family)


def rows_by_doc(path: Path) -> dict[int, dict]:
    return {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize("family", list(RUNS))
def test_lmms_eval_tasks_give_lmms_evals_own_results(family, data, tmp_path):
    model_class, flags, tasks = RUNS[family]
    model = tiny_model(family, tmp_path / "models")
    output = tmp_path / "out"
    with OpenAIStub(StubBehaviour(chat_reply=hashed_grade)) as judge:
        judged = ["--judge-base-url", judge.base_url, "--judge-model", "stub-model"] if "mmvet" in tasks else []
        run = run_evalkit(
            [
                "--model",
                str(model),
                "--device",
                "cpu",
                "--tasks",
                ",".join(f"lmms:{t}" for t in tasks),
                *flags,
                *judged,
            ],
            output=output,
            cwd=data,
            env={"HF_HOME": str(data / HF_HOME), "OPENAI_API_KEY": "sk-stub"},  # video tasks' clips; the judge's key
        )
    assert run.returncode == 0, run.stderr[-3000:]
    results = run.results()
    for task in (member for name in tasks for member in GROUPS.get(name, [name])):
        reference = json.loads((REFERENCES / f"{family}.{task}.json").read_text())
        assert reference["model_class"] == model_class
        rows = rows_by_doc(output / f"samples_{task}.jsonl")
        assert sorted(rows) == [doc["doc_id"] for doc in reference["docs"]], task
        for doc in reference["docs"]:
            row = rows[doc["doc_id"]]
            where = f"{family} {task} doc {doc['doc_id']}"
            prompt = row["arguments"]["gen_args_0"]["arg_0"]
            # a chat class prompts with doc_to_messages and logs doc_to_text as "input"
            assert prompt == (doc["messages"] if isinstance(prompt, list) else doc["input"]), where
            generation = row["resps"][0][0]  # a multi-round doc's: its rounds' answers
            if family in STRIPS_ANSWERS:
                generation = [g.strip() for g in generation] if isinstance(generation, list) else generation.strip()
            assert generation == doc["resps"], where
            assert row["filtered_resps"][0] == doc["filtered_resps"], where
            assert {metric: row[metric] for metric in doc["metrics"]} == doc["metrics"], where
        aggregates = {k: v for k, v in results["results"][task].items() if "_stderr" not in k and k not in NOT_METRICS}
        # lmms-eval lists a process_results key without a metric_list entry as an empty list
        expected = {k: v for k, v in reference["results"].items() if v != []}
        assert aggregates == expected, f"{family} {task}"
        assert results["n-samples"][task] == reference["n-samples"], f"{family} {task}"


def test_references_name_the_models_they_were_made_with(tmp_path):
    """The references are only evidence for the tiny models evalkit builds today."""
    import hashlib

    for family in RUNS:
        model = tiny_model(family, tmp_path)
        digest = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
        for path in REFERENCES.glob(f"{family}.*.json"):
            assert json.loads(path.read_text())["model_sha256"] == digest, path.name
        shutil.rmtree(model)
