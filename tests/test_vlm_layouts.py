"""Vision-language models end to end: the bundled lmms-eval-format image task and lmms-eval's own
`mme` task (by name, unchanged, on local data in its hub schema) on tiny VLMs of three families, and
lmms-eval's video tasks `videomme`, `egoschema_subset` and the multi-round `ovo_forward` on Qwen2-VL,
at every layout, killed and resumed, crashing; and image tasks in both task-file forms.

Every run is real: ``python -m evalkit`` or torchrun on CPU with gloo, models built from a config.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, run_evalkit

pytestmark = pytest.mark.multiprocess

FAULTS = str(REPO / "tests" / "fault_entry.py")
TASK = "vlm_demo"
LAYOUT_TASKS = "vlm_demo,mme"  # mme: lmms-eval's own task folder
# lmms-eval's, clips under $HF_HOME; ovo_forward asks again round by round, each round a request
VIDEO_TASKS = "videomme,egoschema_subset,ovo_forward"
FAMILIES = ("llava", "qwen2_vl", "internvl")
# lmms-eval's image and video tasks at every layout on Qwen2-VL; the bundled image task on the other
# families (their lmms-eval prompts and video inputs are held to lmms-eval's own in
# tests/test_lmms_parity.py, and were identical at every layout when measured).
TASKS_OF = {"llava": TASK, "qwen2_vl": f"{LAYOUT_TASKS},{VIDEO_TASKS}", "internvl": TASK}
REFERENCE = "1 process, batch 4"
LAYOUTS = {
    REFERENCE: ("python", 1, ["--batch-size", "4"]),
    "dp=2, batch 1": ("torchrun", 2, ["--batch-size", "1"]),
    "tp=2": ("torchrun", 2, ["--tp", "2", "--batch-size", "4"]),
    "tp=2 x dp=2": ("torchrun", 4, ["--tp", "2", "--batch-size", "2"]),
}
BOUND_SECONDS = 60


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """Builds each family's tiny model once per test session."""
    from evalkit.testing.tinyvlm import build_tiny_vlm

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_vlm(family, tmp_path_factory.mktemp(family) / "model")
        return built[family]

    return get


def vlm_args(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--device", "cpu", *extra]


@functools.cache
def lmms_data() -> Path:
    """A working folder holding MME, Video-MME, EgoSchema and OVO-Bench (forward) in the hub schemas
    (clips under its hf_home), written once per process."""
    from evalkit.testing.lmms_data import write_egoschema, write_mme, write_ovo_forward, write_videomme

    folder = Path(tempfile.mkdtemp(prefix="lmms-data-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    for write in (write_mme, write_videomme, write_egoschema, write_ovo_forward):
        write(folder)
    return folder


def data_env() -> dict[str, str]:
    from evalkit.testing.lmms_data import HF_HOME

    return {"HF_HOME": str(lmms_data() / HF_HOME)}


def evaluate(model: Path, output: Path, layout: str = REFERENCE, *extra: str, tasks: str = LAYOUT_TASKS, **kwargs):
    launcher, nproc, flags = LAYOUTS[layout]
    kwargs.setdefault("cwd", lmms_data())
    kwargs["env"] = {**data_env(), **kwargs.get("env", {})}
    return run_evalkit(
        vlm_args(model, "--tasks", tasks, *flags, *extra), launcher=launcher, nproc=nproc, output=output, **kwargs
    )


def generations(run) -> dict[tuple[str, int], list]:
    """Per task and doc: the raw generations, the filtered answers and the per-doc metrics."""
    out = {}
    for path in sorted(run.output.glob("samples_*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            metrics = {k: row[k] for k in row.get("metrics", [])}
            out[(row["doc_id"], path.stem, row.get("filter"))] = [row["resps"], row["filtered_resps"], metrics]
    return out


@pytest.fixture(scope="session")
def reference_run(tiny_vlm, tmp_path_factory):
    """Each family's run at the reference layout, once per test session."""
    done: dict[str, object] = {}

    def get(family: str):
        if family not in done:
            output = tmp_path_factory.mktemp(f"{family}_ref") / "out"
            run = evaluate(tiny_vlm(family), output, tasks=TASKS_OF[family])
            assert run.returncode == 0, run.stderr[-3000:]
            done[family] = run
        return done[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_same_generations_at_every_layout(family, tiny_vlm, tmp_path, reference_run):
    model = tiny_vlm(family)
    runs = {REFERENCE: reference_run(family)}
    for layout in LAYOUTS:
        if layout != REFERENCE:
            output = tmp_path / layout.replace(" ", "_").replace(",", "")
            runs[layout] = evaluate(model, output, layout, tasks=TASKS_OF[family])
            assert runs[layout].returncode == 0, (layout, runs[layout].stderr[-3000:])
    want = generations(runs[REFERENCE])
    texts = {json.dumps(v[0]) for v in want.values()}
    assert len(want) >= 16 and len(texts) > 2, "the tiny model should answer differently for different images"
    if VIDEO_TASKS in TASKS_OF[family]:  # different clips give different answers
        clips = {json.dumps(v[0]) for k, v in want.items() if k[1].removeprefix("samples_") in VIDEO_TASKS.split(",")}
        assert len(clips) > 2, clips
    full = runs[REFERENCE].results()["parameters_per_rank"]["0"]
    for layout, run in runs.items():
        assert generations(run) == want, layout
        results = run.results()
        assert results["results"] == runs[REFERENCE].results()["results"], layout
        assert results["task_hashes"] == runs[REFERENCE].results()["task_hashes"], layout
        assert results["model"]["backend"] == "hf-vlm"
        _, nproc, flags = LAYOUTS[layout]
        assert results["parallel"]["world_size"] == nproc
        if "--tp" in flags:
            # The language model (and LLaVA's CLIP tower) is sharded: each rank holds well under all.
            for held in results["parameters_per_rank"].values():
                assert held < 0.8 * full, (layout, held, full)


@pytest.mark.parametrize("family", ["qwen2_vl"])  # its tasks: the image tasks and the video tasks
def test_killed_vlm_run_resumes_on_another_world_size(family, tiny_vlm, reference_run, tmp_path):
    model = tiny_vlm(family)
    reference = reference_run(family)
    output = tmp_path / "out"
    killed = run_evalkit(
        vlm_args(model, "--tasks", TASKS_OF[family], "--batch-size", "1", "--flush-interval", "0.001"),
        cwd=lmms_data(),
        launcher="torchrun",
        nproc=2,
        output=output,
        script=FAULTS,
        env={"FAULT": "kill", "FAULT_AFTER": "3", **data_env()},
    )
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert killed.seconds < BOUND_SECONDS
    saved = sum(len(p.read_text().splitlines()) for p in (output / "shards").glob("*.jsonl"))
    # Every request the reference computed, a multi-round doc's later rounds included.
    total = sum(rank["requests"] for rank in reference.results()["throughput"]["per_rank"])
    rows = sum(len(p.read_text().splitlines()) for p in reference.output.glob("samples_*.jsonl"))
    assert total > rows  # ovo_forward's docs asked more than once
    assert 0 < saved < total
    assert not (output / "results.json").exists()
    resumed = evaluate(model, output, REFERENCE, "--resume", tasks=TASKS_OF[family])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = resumed.results()
    assert results["resume"]["reused"] == saved and results["resume"]["computed"] == total - saved
    assert generations(resumed) == generations(reference)
    assert results["results"] == reference.results()["results"]


def test_crashing_vlm_rank_ends_every_rank(tiny_vlm, tmp_path):
    run = run_evalkit(
        vlm_args(tiny_vlm("llava"), "--tasks", TASK, "--batch-size", "1"),
        launcher="torchrun",
        nproc=2,
        output=tmp_path / "out",
        script=FAULTS,
        env={"FAULT": "raise", "FAULT_AFTER": "2"},
    )
    assert run.returncode != 0
    assert run.seconds < BOUND_SECONDS
    assert "evalkit: rank 1 failed: RuntimeError: injected failure in the forward of rank 1" in run.stderr
    assert not (tmp_path / "out" / "results.json").exists()
    assert any((tmp_path / "out" / "shards").glob("*.jsonl"))


def test_text_only_backend_refuses_an_image_task(tmp_path):
    from conftest import TINY_MODEL

    run = run_evalkit(["--model", str(TINY_MODEL), "--device", "cpu", "--tasks", TASK], output=tmp_path / "out")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("evalkit: error: task(s) ")
    assert "--backend hf-vlm" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_lm_eval_doc_to_image_task_runs_unchanged(tiny_vlm, tmp_path):
    """lm-eval's own mmmu_val_art YAML on a local MMMU/MMMU folder, 2 ranks: rank 1 loads its images itself."""
    from library_data import write_mmmu

    write_mmmu(tmp_path)
    run = run_evalkit(
        vlm_args(tiny_vlm("llava"), "--tasks", "mmmu_val_art", "--gen-kwargs", "max_gen_toks=24", "--batch-size", "2"),
        launcher="torchrun",
        nproc=2,
        output=tmp_path / "out",
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = run.results()
    assert results["n-samples"]["mmmu_val_art"]["effective"] == 4
    assert "acc,none" in results["results"]["mmmu_val_art"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples_mmmu_val_art.jsonl").read_text().splitlines()]
    # Images appear in samples by their content digest, never as pixels or object addresses.
    assert all(row["arguments"]["gen_args_0"]["arg_2"]["visual"][0].startswith("sha256:") for row in rows)
    assert all(row["doc"]["image_1"].startswith("<image sha256:") for row in rows)
    assert sum(r["requests"] for r in results["throughput"]["per_rank"]) == 4
