"""lmms-eval's installed task folder as evalkit's second task library: names, indexing, listing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lm_eval.tasks._index import Kind

from evalkit.tasks import lmms_index
from evalkit.tasks.commands import main
from evalkit.tasks.library import LM_EVAL_TASKS, TaskLibrary

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by make install")
LMMS_KIND = {"task": Kind.TASK, "python_task": Kind.PY_TASK, "group": Kind.GROUP, "tag": Kind.TAG}


@pytest.fixture(scope="module")
def library() -> TaskLibrary:
    return TaskLibrary()


def test_index_follows_lmms_evals_own_rules(library: TaskLibrary) -> None:
    from lmms_eval.tasks import TaskManager

    manager = TaskManager.__new__(TaskManager)  # its indexer alone, without loading anything
    manager.logger = logging.getLogger("lmms-eval-index")
    theirs = manager._get_task_and_group(str(lmms_index.tasks_dir()))
    ours = library.lmms_index
    assert set(ours) == set(theirs)
    assert {n: ours[n].kind for n in ours} == {n: LMMS_KIND[e["type"]] for n, e in theirs.items()}
    tags = {n: sorted(e["task"]) for n, e in theirs.items() if e["type"] == "tag"}
    assert {n: sorted(ours[n].tags) for n in tags} == tags
    # lmms-eval's older form: a task YAML with `group:` is a task, and its group a tag
    assert ours["refcoco_bbox_val"].kind is Kind.TASK and "refcoco_bbox_val" in ours["refcoco_bbox"].tags


def test_names_resolve_by_library(library: TaskLibrary) -> None:
    entry, registry = library.resolve("mme")
    assert registry is library.lmms_index and entry is library.lmms_index["mme"]
    assert library.resolve("lmms:mme") == (entry, registry)
    lm_entry, lm_registry = library.resolve("mmlu")
    assert lm_registry is library.task_index and Path(lm_entry.yaml_path).is_relative_to(LM_EVAL_TASKS)
    assert library.resolve("lmms:mmlu")[1] is library.lmms_index
    assert library.resolve("lmms:no_such_task") is None
    assert [library.library_of(n) for n in ("mmlu", "demo", "mme", "lmms:mmlu")] == [
        "lm-eval",
        "evalkit",
        "lmms-eval",
        "lmms-eval",
    ]


def test_a_shared_name_is_lm_evals_and_says_so(library: TaskLibrary) -> None:
    assert library.notices(["mmlu", "mme", "lmms:gsm8k", "mmlu"]) == [
        "'mmlu' is lm-eval's; --tasks lmms:mmlu selects lmms-eval's"
    ]


def test_unknown_lmms_name_suggests_the_closest(library: TaskLibrary) -> None:
    assert (
        library.unknown("lmms:mmee")
        == "unknown task 'lmms:mmee' (did you mean 'lmms:mme'?); see python -m evalkit tasks list"
    )
    assert library.unknown("lmms:mme") is None


def test_list_names_each_library(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capfd.readouterr()[0].splitlines()
    for line in ("mmlu  [lm-eval]", "lmms:mmlu  [lmms-eval]", "mme  [lmms-eval]", "coco2014_cap  [lmms-eval]"):
        assert line in lines


def test_validate_takes_lmms_names_and_reports_unknown_ones(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "lmms:mme", "lmms:docvqa_val", "lmms:pope_full", "lmms:mmee"]) == 1
    lines = capfd.readouterr()[0].splitlines()
    assert lines[0].startswith("lmms:mmee: unknown task 'lmms:mmee' (did you mean 'lmms:mme'?)")
    assert lines[1] == "2 of 2 tasks valid (100.0%), 1 of 1 groups valid (100.0%), 0 of 1 unknown names valid (0.0%)"


def test_an_audio_task_is_refused_in_one_line_naming_it(tmp_path, monkeypatch) -> None:
    import datasets

    from evalkit.errors import UsageError

    monkeypatch.chdir(tmp_path)
    features = datasets.Features({"audio": datasets.Audio(decode=False), "answer": datasets.Value("string")})
    rows = {"audio": [{"bytes": b"RIFF0000WAVE", "path": None}], "answer": ["yes"]}
    (tmp_path / "data").mkdir()
    # cast at the arrow level: encoding audio would need torchcodec, which this torch cannot load
    datasets.Dataset.from_dict(rows).cast(features).to_parquet("data/test.parquet")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "clip_qa.yaml").write_text(
        "task: clip_qa\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n    test: data/test.parquet\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: audio\ndoc_to_text: 'What is said?'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: exact_match\n"
    )
    with pytest.raises(UsageError) as caught:
        TaskLibrary([tmp_path / "tasks"]).load_checked(["clip_qa"])
    message = str(caught.value)
    assert "task 'clip_qa' is an audio task (its data has audio column audio)" in message
    assert "\n" not in message


def test_a_run_of_a_shared_name_says_which_library_runs(tmp_path) -> None:
    from conftest import TINY_MODEL, run_evalkit

    # no gsm8k data here: the run stops at loading it, after saying whose gsm8k it is
    run = run_evalkit(
        ["--model", str(TINY_MODEL), "--device", "cpu", "--tasks", "gsm8k,mme"],
        output=tmp_path / "out",
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "evalkit: 'gsm8k' is lm-eval's; --tasks lmms:gsm8k selects lmms-eval's" in run.stdout.splitlines()
    assert "mme" not in run.stdout
    assert len(run.stderr.strip().splitlines()) == 1 and "gsm8k" in run.stderr
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_an_output_type_only_lmms_eval_runs_is_refused_in_one_line(tmp_path) -> None:
    from evalkit.errors import UsageError

    (tmp_path / "cot.yaml").write_text(
        "task: visual_cot_demo\ndataset_path: parquet\ntest_split: test\noutput_type: generate_visual_cot\n"
        "doc_to_visual: image\ndoc_to_text: question\ndoc_to_target: answer\n"
    )
    with pytest.raises(UsageError) as caught:
        TaskLibrary([tmp_path]).load_checked(["visual_cot_demo"])
    message = str(caught.value)
    assert "visual_cot_demo" in message and "\n" not in message
    assert "output_type 'generate_visual_cot' needs a model that draws an image before it answers" in message
