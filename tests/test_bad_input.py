"""Bad input ends the run with one line, exit code 2, no traceback and no results - on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PACKAGE, TASK_FIXTURES, TINY_MODEL, model_args, run_evalkit

BROKEN = TASK_FIXTURES / "broken"


def evalkit_frames(stderr: str, package: Path = PACKAGE) -> list[str]:
    """Traceback lines inside evalkit's own package (not its tests, not a venv in the same clone)."""
    prefix = f'File "{package}/'
    return [line for line in stderr.splitlines() if line.strip().startswith(prefix)]


def test_frames_are_told_apart_in_a_clone_named_evalkit():
    package = Path("/home/user/evalkit/evalkit")
    stderr = "\n".join(
        [
            '  File "/home/user/evalkit/.venv/lib/python3.11/site-packages/torch/distributed/run.py", line 9',
            '  File "/home/user/evalkit/tests/fault_entry.py", line 3',
            '  File "/home/user/evalkit/evalkit/runner.py", line 7, in evaluate',
        ]
    )
    assert evalkit_frames(stderr, package) == ['  File "/home/user/evalkit/evalkit/runner.py", line 7, in evaluate']


def assert_usage_error(run, *fragments: str, ranks: int = 1, fresh_output: bool = True) -> None:
    errors = [line for line in run.stderr.splitlines() if line.startswith("evalkit: error:")]
    assert len(errors) == ranks, run.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert len(set(errors)) == 1, "every rank reports the same error"
    # torchrun prints its own traceback when a worker fails; none may come from evalkit's code.
    assert not evalkit_frames(run.stderr), evalkit_frames(run.stderr)
    if run.output is not None and fresh_output:
        assert not run.output.exists(), "nothing is written, not even an empty folder"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--tasks", "demo_mcc"], ["unknown task 'demo_mcc'", "did you mean 'demo_mc'"]),
        (["--tasks", str(BROKEN / "malformed.yaml")], ["malformed YAML", "malformed.yaml", "line"]),
        (["--tasks", str(BROKEN / "unknown_key.yaml")], ["unknown key 'doc_to_txt'", "did you mean 'doc_to_text'"]),
        (["--tasks", str(BROKEN / "missing_data.yaml")], ["data file", "does_not_exist.jsonl", "not found"]),
        (["--tasks", str(BROKEN / "missing_split.yaml")], ["split 'validation' does not exist", "test"]),
        (["--tasks", str(BROKEN / "missing_field.yaml")], ["difficulty", "doc fields are"]),
        (["--tasks", str(BROKEN / "hub_dataset.yaml")], ["some-org/some-benchmark", "Hub", "local copy"]),
        (
            ["--tasks", "broken_group", "--include-path", str(BROKEN)],
            ["group 'broken_group' > task 'broken_missing_package'", "pip install"],
        ),
        (
            ["--tasks", str(BROKEN / "missing_package.yaml")],
            ["needs the Python package 'evalkit-test-package-that-does-not-exist'", "not installed"],
        ),
        (["--tasks", str(BROKEN / "unsafe.yaml")], ["broken_unsafe", "--confirm-run-unsafe-code"]),
        (["--tasks", "demo_mc", "--tp", "2"], ["tp(2) does not divide world_size(1)"]),
        (["--tasks", "demo_mc", "--batch-size", "0"], ["--batch-size 0 must be a positive integer or auto"]),
        (["--tasks", "demo_mc", "--bogus"], ["unrecognized arguments: --bogus"]),
    ],
    ids=[
        "unknown-task",
        "malformed-yaml",
        "unknown-key",
        "missing-data",
        "missing-split",
        "missing-field",
        "hub-dataset",
        "group-with-invalid-member",
        "missing-package",
        "unsafe-code-without-flag",
        "tp-not-dividing",
        "batch-size",
        "unknown-flag",
    ],
)
def test_bad_task_input(tmp_path, args, fragments):
    run = run_evalkit(model_args(*args), output=tmp_path / "out")
    assert run.returncode == 2
    assert_usage_error(run, *fragments)


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        (str(TINY_MODEL / "missing"), ["no such folder"]),
        ("meta-llama/Llama-2-7b-hf", ["not a local folder", "Hugging Face Hub", "--model DIR"]),
        (str(TINY_MODEL / "config.json"), ["is a file"]),
    ],
)
def test_bad_model(tmp_path, model, fragments):
    run = run_evalkit(["--model", model, "--tasks", "demo_mc", "--device", "cpu"], output=tmp_path / "out")
    assert run.returncode == 2
    assert_usage_error(run, *fragments)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("nproc", "args", "fragments"),
    [
        (2, ["--tasks", "demo_mcc"], ["unknown task 'demo_mcc'"]),
        (2, ["--tasks", "broken_group", "--include-path", str(BROKEN)], ["group 'broken_group' >", "pip install"]),
        (2, ["--tasks", str(BROKEN / "unsafe.yaml")], ["--confirm-run-unsafe-code"]),
        (2, ["--tasks", str(BROKEN / "hub_dataset.yaml")], ["some-org/some-benchmark", "not available offline"]),
        (2, ["--tasks", "demo_mc", "--tp", "3"], ["tp(3) does not divide world_size(2)"]),
        (
            4,
            ["--tasks", "demo_mc", "--tp", "4"],
            ["cannot shard", "tp(4) does not divide KV heads(2)", "suggests --tp"],
        ),
        (2, ["--tasks", "demo_mc", "--tp", "2", "--gpu-mem", "0.0005"], ["tp=2 x dp=1 does not fit", "GiB"]),
    ],
    ids=[
        "unknown-task",
        "group-with-invalid-member",
        "unsafe-code",
        "hub-dataset",
        "tp-not-dividing-world",
        "tp-not-dividing-heads",
        "too-big",
    ],
)
def test_bad_input_ends_every_rank(tmp_path, nproc, args, fragments):
    run = run_evalkit(model_args(*args), launcher="torchrun", nproc=nproc, output=tmp_path / "out", timeout=180)
    assert run.returncode != 0
    assert "exitcode: 2" in run.stderr
    assert_usage_error(run, *fragments, ranks=nproc)


def broken_checkpoint(tmp_path: Path, damage: str) -> Path:
    """A copy of the tiny model with its config.json cut mid-way or its weights cut in half."""
    import shutil

    model = shutil.copytree(TINY_MODEL, tmp_path / f"model-{damage}")
    if damage == "config":
        text = (model / "config.json").read_text()
        (model / "config.json").write_text(text[: len(text) // 2])
    else:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


BAD_FLAGS_AND_FILES = {
    "gen-kwargs-garbage": (["--gen-kwargs", "garbage"], ["--gen-kwargs: unknown generation setting 'garbage'"]),
    "gen-kwargs-value": (
        ["--gen-kwargs", "temperature=abc"],
        ["--gen-kwargs temperature='abc': expected a number >= 0"],
    ),
    "gen-kwargs-limit": (
        ["--gen-kwargs", "max_gen_toks=-5"],
        ["--gen-kwargs max_gen_toks=-5: expected a positive integer"],
    ),
    "gen-kwargs-too-long": (
        ["--gen-kwargs", "max_gen_toks=500"],
        ["task demo_gen: max_gen_toks 500 leaves no room for a prompt in the model's 128 positions"],
    ),
    "corrupt-config": ("config", ["config.json is not valid JSON", "restore it"]),
    "truncated-weights": ("weights", ["model.safetensors is cut short", "copy the checkpoint again"]),
    "jinja": (["--tasks", str(BROKEN / "template_syntax.yaml")], ["broken_template_syntax", "TemplateSyntaxError"]),
}
# Every case on 1 rank; on 2 ranks one of each kind of check (the three --gen-kwargs cases share
# one check, made on every rank as the flags are parsed).
BAD_FLAG_RUNS = [(1, name) for name in BAD_FLAGS_AND_FILES] + [
    (2, name) for name in ("gen-kwargs-garbage", "corrupt-config", "truncated-weights", "jinja")
]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("nproc", "name"), BAD_FLAG_RUNS, ids=[f"{name}-{n}rank" for n, name in BAD_FLAG_RUNS])
def test_bad_flags_and_files_write_nothing(tmp_path, nproc, name):
    """Refused before the output folder exists (so it can be rerun or resumed once fixed), on every rank."""
    case, fragments = BAD_FLAGS_AND_FILES[name]
    model = broken_checkpoint(tmp_path, case) if isinstance(case, str) else TINY_MODEL
    flags = [] if isinstance(case, str) else case
    tasks = [] if "--tasks" in flags else ["--tasks", "demo_gen"]
    args = ["--model", str(model), "--device", "cpu", *tasks, *flags]
    run = run_evalkit(args, launcher="torchrun" if nproc > 1 else "python", nproc=nproc, output=tmp_path / "out")
    assert run.returncode == (2 if nproc == 1 else 1)  # torchrun ends 1 when a worker ends 2
    assert nproc == 1 or "exitcode: 2" in run.stderr
    assert_usage_error(run, *fragments, ranks=nproc)
