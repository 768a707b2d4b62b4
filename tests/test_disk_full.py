"""A disk that fills during a run, at each phase: the run ends with one line (exit 2 before anything
is written, exit 1 after), leaves no ``.tmp`` file, and ``--resume`` after freeing space completes
with the results of an uninterrupted run.

The output folder lives on a small tmpfs whose free space a filler file sets, so the disk fills for
real, where the phase under test writes. Mounting needs root (as in CI and here).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_bad_input import evalkit_frames

from conftest import Run, model_args, run_evalkit

pytestmark = pytest.mark.skipif(
    subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0",
    reason="mounting a small tmpfs needs root",
)

DISK_KIB = 1024
PAGE = 4096
TASKS = "demo_mc,demo_gen"


def pages(size: int) -> int:
    return -(-size // PAGE) * PAGE


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Run:
    run = run_evalkit(model_args("--tasks", TASKS), output=tmp_path_factory.mktemp("reference") / "out")
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture
def disk(tmp_path):
    """A DISK_KIB tmpfs at tmp_path / "disk"; ``fill(free)`` leaves ``free`` bytes."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_KIB}k", "tmpfs", str(mount)], check=True)
    filler = mount / "filler"

    def fill(free: int) -> Path:
        filler.write_bytes(b"\0" * (DISK_KIB * 1024 - pages(free)))
        return filler

    try:
        yield mount, fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def sizes(run: Run) -> dict[str, int]:
    files = {p.relative_to(run.output).as_posix(): p.stat().st_size for p in run.output.rglob("*") if p.is_file()}
    shard = sum(v for k, v in files.items() if k.startswith("shards/"))
    return {"shard": shard, "run.json": files["run.json"], "samples": files["samples_demo_gen.jsonl"]}


def assert_one_line_end(run: Run, code: int, fragment: str) -> None:
    assert run.returncode == code, run.stderr[-3000:]
    assert not evalkit_frames(run.stderr), run.stderr[-3000:]  # torchrun's own report aside, no traceback
    text = run.stderr.replace("\r", "\n")
    lines = [line[line.index("evalkit:") :] for line in text.splitlines() if "evalkit:" in line]  # after a progress bar
    assert len(lines) == 1 and fragment in lines[0], lines


def assert_resume_completes(reference: Run, output: Path, filler: Path, nproc: int = 1) -> Run:
    filler.unlink()
    launcher = "torchrun" if nproc > 1 else "python"
    resumed = run_evalkit(model_args("--tasks", TASKS, "--resume"), output=output, launcher=launcher, nproc=nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.results()["results"] == reference.results()["results"]
    for task in TASKS.split(","):
        assert resumed.docs(task) == reference.docs(task)
    return resumed


def tmp_files(output: Path) -> list[str]:
    return [p.name for p in output.rglob("*.tmp")]


def test_full_before_anything_is_written(reference, disk):
    mount, fill = disk
    filler = fill(0)
    output = mount / "run"
    run = run_evalkit(model_args("--tasks", TASKS), output=output)
    assert_one_line_end(run, 2, "No space left on device")
    assert not output.exists()  # nothing half-made: the folder this launch created is gone
    assert_resume_completes(reference, output, filler)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.multiprocess)])
def test_full_during_model_calls(reference, disk, nproc):
    mount, fill = disk
    size = sizes(reference)
    # run.json, the lease (and its renewal's temporary copy), then half the results
    filler = fill(pages(size["run.json"]) + 3 * PAGE + size["shard"] // 2)
    output = mount / "run"
    launcher = "torchrun" if nproc > 1 else "python"
    run = run_evalkit(model_args("--tasks", TASKS), output=output, launcher=launcher, nproc=nproc)
    if nproc == 1:
        assert_one_line_end(run, 1, "No space left on device")
    else:  # the rank whose shard hit the wall says so, the other ends on its word
        assert run.returncode == 1 and "No space left on device" in run.stderr, run.stderr[-3000:]
        assert not evalkit_frames(run.stderr), run.stderr[-3000:]
    assert "--resume" in run.stderr
    assert not list(output.glob("samples_*")) and not (output / "results.json").exists()
    assert tmp_files(output) == []
    resumed = assert_resume_completes(reference, output, filler, nproc)
    assert resumed.results()["resume"]["reused"] > 0


def test_full_while_writing_samples(reference, disk):
    mount, fill = disk
    size = sizes(reference)
    filler = fill(pages(size["run.json"]) + 3 * PAGE + pages(size["shard"]) + size["samples"] // 2)
    output = mount / "run"
    run = run_evalkit(model_args("--tasks", TASKS), output=output)
    assert_one_line_end(run, 1, "No space left on device")
    assert not (output / "results.json").exists()
    assert tmp_files(output) == []
    resumed = assert_resume_completes(reference, output, filler)
    assert resumed.results()["resume"]["computed"] == 0  # every result was saved before the disk filled
