"""The output folder and per-sample errors: refuse to mix runs, never score a failure as an answer."""

from __future__ import annotations

import json
import shutil

import pytest
from test_bad_input import assert_usage_error

from evalkit.testing.tinymodel import DEFAULT_TASKS_DIR, build_tiny_llama, corpus_from_tasks

from conftest import REPO, TASK_FIXTURES, TINY_MODEL, model_args, run_evalkit

FAULTS = str(REPO / "tests" / "fault_entry.py")


def assert_untouched_refusal(run, output, before: bytes, *fragments: str) -> None:
    assert run.returncode == 2
    assert_usage_error(run, *fragments, fresh_output=False)
    assert (output / "results.json").read_bytes() == before, "a refused run leaves the folder as it was"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    output = tmp_path_factory.mktemp("finished") / "out"
    run = run_evalkit(model_args("--tasks", "demo_mc,demo_mc_fewshot", "--limit", "6"), output=output)
    assert run.returncode == 0, run.stderr[-2000:]
    return output


def test_non_empty_folder_needs_resume(finished):
    before = (finished / "results.json").read_bytes()
    run = run_evalkit(model_args("--tasks", "demo_mc", "--limit", "6"), output=finished)
    assert_untouched_refusal(run, finished, before, "already holds results", "--resume")


def test_refuses_another_models_results(finished, tmp_path):
    before = (finished / "results.json").read_bytes()
    other = build_tiny_llama(tmp_path / "other-model", corpus_from_tasks(DEFAULT_TASKS_DIR), seed=1)
    run = run_evalkit(
        ["--model", str(other), "--device", "cpu", "--tasks", "demo_mc", "--limit", "6", "--resume"], output=finished
    )
    assert_untouched_refusal(run, finished, before, "holds results of a different model", "start fresh")


def test_refuses_another_task_configuration(finished):
    before = (finished / "results.json").read_bytes()
    run = run_evalkit(
        model_args("--tasks", "demo_mc_fewshot", "--limit", "6", "--num-fewshot", "1", "--resume"), output=finished
    )
    assert_untouched_refusal(run, finished, before, "different configuration of task(s) demo_mc_fewshot")


def test_unwritable_output_folder():
    run = run_evalkit(model_args("--tasks", "demo_mc", "--output", "/proc/evalkit-results"))
    assert run.returncode == 2
    assert_usage_error(run, "cannot write to --output /proc/evalkit-results")


def test_empty_dataset(tmp_path):
    run = run_evalkit(
        model_args("--tasks", str(TASK_FIXTURES / "broken" / "empty_dataset.yaml")), output=tmp_path / "out"
    )
    assert run.returncode == 2
    assert_usage_error(run, "is empty")


def test_remote_code_needs_explicit_trust(tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(TINY_MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "custom_llm"
    config["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    run = run_evalkit(
        ["--model", str(model), "--device", "cpu", "--tasks", "demo_mc", "--limit", "2"], output=tmp_path / "out"
    )
    assert "remote code ran" not in run.stderr + run.stdout
    assert run.returncode == 2
    assert_usage_error(run, "needs its own Python code", "--trust-remote-code")


def test_failing_requests_fail_the_run_by_default(tmp_path):
    run = run_evalkit(
        model_args("--tasks", "demo_mc"),
        output=tmp_path / "out",
        script=FAULTS,
        env={"FAULT": "poison", "FAULT_TEXT": "Zoë"},
    )
    assert run.returncode == 1
    assert "evalkit: rank 0 failed: RuntimeError: injected failure for a poisoned doc" in run.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_recorded_errors_are_excluded_and_counted(tmp_path):
    output = tmp_path / "out"
    run = run_evalkit(
        model_args("--tasks", "demo_mc", "--on-error", "record", "--batch-size", "4"),
        output=output,
        script=FAULTS,
        env={"FAULT": "poison", "FAULT_TEXT": "Zoë"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = run.results()
    assert results["errors"] == {"demo_mc": 2}
    assert results["n-samples"]["demo_mc"] == {"original": 50, "effective": 48}
    samples = run.samples("demo_mc")
    failed = [s["doc_id"] for s in samples if "error" in s]
    assert failed == [3, 33]
    assert all("metrics" not in s for s in samples if "error" in s)
    scored = [s["acc"] for s in samples if "error" not in s]
    assert results["results"]["demo_mc"]["acc,none"] == sum(scored) / len(scored)

    # Resuming without the fault redoes exactly the failed requests (2 docs x 4 choices) and scores them.
    resumed = run_evalkit(model_args("--tasks", "demo_mc", "--resume"), output=output)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.results()["errors"] == {}
    assert resumed.results()["resume"] == {"reused": 178 - 8, "computed": 8}
    assert resumed.results()["n-samples"]["demo_mc"]["effective"] == 50


def test_damaged_saved_state_is_skipped_or_refused(finished, tmp_path):
    """A garbled shard line is skipped with a warning (shards are checked line by line); a damaged
    run.json, which says what the folder holds, is refused."""
    copy = tmp_path / "out"
    shutil.copytree(finished, copy)
    shard = next((copy / "shards").glob("*.jsonl"))
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    run = run_evalkit(model_args("--tasks", "demo_mc", "--limit", "6", "--resume"), output=copy)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"evalkit: warning: 1 saved result(s) in {shard} failed their checksum" in run.stderr
    assert run.results()["resume"]["computed"] == 0
    (copy / "run.json").write_text("{")
    run = run_evalkit(model_args("--tasks", "demo_mc", "--limit", "6", "--resume"), output=copy)
    assert run.returncode == 2
    assert_usage_error(run, "run.json is damaged", fresh_output=False)
