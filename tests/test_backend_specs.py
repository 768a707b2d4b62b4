"""Every backend refusal comes from its BackendSpec: for each backend, each flag, request kind and
layout it refuses, and the one line each produces; everything else it takes without a word."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from evalkit.cli import parse_config
from evalkit.config import RunConfig
from evalkit.errors import UsageError
from evalkit.models import registry
from evalkit.models.registry import BACKENDS, RunKinds
from evalkit.parallel import Layout, Placement
from evalkit.preflight import run_kinds
from evalkit.tasks.requests import Request, Visuals

BASE = RunConfig(model="m", tasks=("t",), output=Path("o"))
SERVED = {"base_url": "http://localhost:8000/v1"}
VLLM_BATCH = "; vLLM schedules its own batches: give --batch-size N (requests per engine call) or leave it out"
SERVER_BATCH = "; the server batches requests itself: use --concurrency (requests in flight per process)"
# Each flag a backend may refuse, as the config value that sets it.
FLAG_VALUES = {
    "batch_size": {"batch_size": 4},
    "batch_size=auto": {"batch_size": "auto"},
    "max_batch_tokens": {"max_batch_tokens": 4096},
    "shared_prefix": {"shared_prefix": False},
    "vllm_prefix_cache": {"vllm_prefix_cache": True},
    "dtype": {"dtype": "bfloat16"},
    "tp_backend": {"tp_backend": "transformers"},
    "deepspeed": {"deepspeed": Path("ds.json")},
    "gpu_mem": {"gpu_mem": 80.0},
    "apply_chat_template": {"apply_chat_template": True},
    "tokenizer": {"tokenizer": "tok"},
    "base_url": SERVED,
    "api_key_env": {"api_key_env": "MY_KEY"},
    "concurrency": {"concurrency": 2},
    "max_retries": {"max_retries": 1},
    "request_timeout": {"request_timeout": 5.0},
}
SERVER_FLAGS = {
    "base_url": "--base-url",
    "api_key_env": "--api-key-env",
    "concurrency": "--concurrency",
    "max_retries": "--max-retries",
    "request_timeout": "--request-timeout",
}


def server_flags_refused(name: str) -> dict[str, str]:
    """What an in-process backend says of each flag that belongs to the served backends."""
    judge = {"concurrency", "max_retries", "request_timeout"}  # they also set a judge's calls
    return {
        field: f"{flag} is for --backend openai-completions or openai-chat"
        f"{' or a judge (--judge-base-url)' if field in judge else ''}, not {name}"
        for field, flag in SERVER_FLAGS.items()
    }


REFUSED_FLAGS = {
    "hf": {
        "tokenizer": "--tokenizer is for --backend openai-completions or openai-chat, not hf",
        **server_flags_refused("hf"),
    },
    "hf-vlm": {
        "shared_prefix": "--backend hf-vlm does not take --no-shared-prefix; it runs generation only, where no "
        "prefix is shared",
        "apply_chat_template": "--backend hf-vlm does not take --apply-chat-template; it always renders prompts "
        "with the processor's chat template",
        "tokenizer": "--tokenizer is for --backend openai-completions or openai-chat, not hf-vlm",
        **server_flags_refused("hf-vlm"),
    },
    "vllm": {
        "batch_size=auto": "--backend vllm does not take --batch-size auto" + VLLM_BATCH,
        "max_batch_tokens": "--backend vllm does not take --max-batch-tokens; vLLM schedules the tokens of its "
        "batches itself",
        "tp_backend": "--backend vllm does not take --tp-backend; vLLM splits the model over the --tp ranks itself",
        "deepspeed": "--backend vllm does not take --deepspeed; vLLM splits the model over the --tp ranks itself "
        "(give --tp)",
        "tokenizer": "--tokenizer is for --backend openai-completions or openai-chat, not vllm",
        **server_flags_refused("vllm"),
    },
}
for served in ("openai-completions", "openai-chat"):
    REFUSED_FLAGS[served] = {
        "batch_size": f"--backend {served} does not take --batch-size N" + SERVER_BATCH,
        "batch_size=auto": f"--backend {served} does not take --batch-size auto" + SERVER_BATCH,
        "max_batch_tokens": f"--backend {served} does not take --max-batch-tokens; the server batches requests itself",
        "shared_prefix": f"--backend {served} does not take --no-shared-prefix; the server decides how prompts "
        "are computed",
        "dtype": f"--backend {served} does not take --dtype; the server chose the model's dtype",
        "tp_backend": f"--backend {served} does not take --tp-backend; the server splits its model",
        "deepspeed": f"--backend {served} does not take --deepspeed; the server splits its model",
        "gpu_mem": f"--backend {served} does not take --gpu-mem; the server holds the model",
    }
for name in ("hf", "hf-vlm", "openai-completions", "openai-chat"):
    REFUSED_FLAGS[name]["vllm_prefix_cache"] = f"--vllm-prefix-cache is for --backend vllm, not {name}"
REFUSED_FLAGS["openai-chat"]["apply_chat_template"] = (
    "--backend openai-chat does not take --apply-chat-template; the server applies the model's chat template"
)

REFUSED_KINDS = {
    "hf-vlm": "backend hf-vlm runs generate_until requests, not loglikelihood, loglikelihood_rolling (t); use the "
    "hf backend for loglikelihood tasks",
    "openai-chat": "backend openai-chat runs generate_until requests, not loglikelihood, loglikelihood_rolling (t); "
    "it returns no prompt logprobs: run loglikelihood tasks with openai-completions",
}
SERVER_LAYOUT = "; the server splits its model: drop --tp and --gpus-per-rank"
LAYOUTS = {
    "tp2-deepspeed": Layout(world_size=2, tp=2, placement=Placement.DEEPSPEED_TP),
    "tp2-transformers": Layout(world_size=2, tp=2, placement=Placement.TRANSFORMERS_TP),
    "tp2-transformers-dp2": Layout(world_size=4, tp=2, placement=Placement.TRANSFORMERS_TP),
    "tp2-vllm": Layout(world_size=2, tp=2, placement=Placement.VLLM_TP),
    "split": Layout(world_size=1, placement=Placement.SPLIT, gpus_per_rank=2),
    "dp4": Layout(world_size=4),
}
REFUSED_LAYOUTS = {
    "hf": {"tp2-vllm": "--backend hf does not run the vllm layout"},
    "hf-vlm": {
        "tp2-vllm": "--backend hf-vlm does not run the vllm layout",
        "tp2-transformers-dp2": "--backend hf-vlm runs the transformers layout only as one replica (dp=2 here); "
        "use --tp-backend deepspeed for tp x dp",
    },
    "vllm": {
        "tp2-deepspeed": "--backend vllm does not run the deepspeed layout",
        "tp2-transformers": "--backend vllm does not run the transformers layout",
        "tp2-transformers-dp2": "--backend vllm does not run the transformers layout",
        "split": "--backend vllm does not run the split layout; vLLM splits a model over GPUs with --tp, not "
        "--gpus-per-rank",
    },
}
for served in ("openai-completions", "openai-chat"):
    REFUSED_LAYOUTS[served] = {
        "tp2-deepspeed": f"--backend {served} does not run the deepspeed layout" + SERVER_LAYOUT,
        "tp2-transformers": f"--backend {served} does not run the transformers layout" + SERVER_LAYOUT,
        "tp2-transformers-dp2": f"--backend {served} does not run the transformers layout" + SERVER_LAYOUT,
        "tp2-vllm": f"--backend {served} does not run the vllm layout",
        "split": f"--backend {served} does not run the split layout" + SERVER_LAYOUT,
    }


def config_for(name: str, **fields) -> RunConfig:
    base = replace(BASE, backend=name, **(SERVED if BACKENDS[name].served else {}))
    return replace(base, **fields)


def test_every_backend_is_listed():
    assert set(REFUSED_FLAGS) == set(REFUSED_LAYOUTS) == set(BACKENDS)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_refused_flag_gets_its_own_line_and_every_other_flag_is_taken(name):
    spec = BACKENDS[name]
    assert spec.problems(config_for(name)) == []
    for flag, values in FLAG_VALUES.items():
        problems = spec.problems(config_for(name, **values))
        expected = REFUSED_FLAGS[name].get(flag)
        assert problems == ([expected] if expected else []), (name, flag)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_refused_request_kind(name):
    spec = BACKENDS[name]
    everything = RunKinds(tasks={kind: frozenset({"t"}) for kind in spec.kinds})
    assert spec.problems(config_for(name), kinds=everything) == []
    all_kinds = RunKinds(
        tasks={k: frozenset({"t"}) for k in ("loglikelihood", "loglikelihood_rolling", "generate_until")}
    )
    expected = REFUSED_KINDS.get(name)
    assert spec.problems(config_for(name), kinds=all_kinds) == ([expected] if expected else [])


@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_refused_layout(name):
    spec = BACKENDS[name]
    for label, layout in LAYOUTS.items():
        expected = REFUSED_LAYOUTS.get(name, {}).get(label)
        assert spec.problems(config_for(name), layout) == ([expected] if expected else []), (name, label)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_images_and_chat_messages(name, tmp_path):
    image_task = RunKinds(tasks={"generate_until": frozenset({"vlm_demo"})}, multimodal=frozenset({"vlm_demo"}))
    problems = BACKENDS[name].problems(config_for(name), kinds=image_task)
    if name == "hf-vlm":
        assert problems == []
    else:
        assert problems == [
            f"task(s) vlm_demo give the model images or chat messages, which backend {name} cannot take; use a "
            "vision-language model (--backend hf-vlm, or vllm with a vision-language checkpoint)"
        ]
    (tmp_path / "config.json").write_text('{"model_type": "llava", "vision_config": {}}')
    assert registry.select("vllm", str(tmp_path)).problems(config_for("vllm"), kinds=image_task) == []


def test_images_in_loglikelihood_requests_are_refused_for_a_backend_that_takes_images(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava", "vision_config": {}}')
    vllm = registry.select("vllm", str(tmp_path))
    scored = Request(
        0, "seed_mc", 0, 0, 0, "loglikelihood", ("USER: <image> Q", " A"), visuals=Visuals("seed_mc", 0, ("d1",))
    )
    answered = Request(
        1, "vlm_demo", 0, 0, 0, "generate_until", ("USER: <image> Q", {}), visuals=Visuals("vlm_demo", 0, ("d2",))
    )
    assert vllm.problems(config_for("vllm"), kinds=run_kinds([answered])) == []
    assert vllm.problems(config_for("vllm"), kinds=run_kinds([answered, scored])) == [
        "task(s) seed_mc score answers to images by loglikelihood; evalkit gives images to generate_until tasks only"
    ]


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--backend", "vllm", "--max-batch-tokens", "64"],
            "--backend vllm does not take --max-batch-tokens; vLLM schedules the tokens of its batches itself",
        ),
        (["--backend", "vllm", "--batch-size", "auto"], "--backend vllm does not take --batch-size auto" + VLLM_BATCH),
        (
            ["--backend", "openai-completions", "--base-url", "http://x/v1", "--batch-size", "4"],
            "--backend openai-completions does not take --batch-size N" + SERVER_BATCH,
        ),
    ],
    ids=["vllm-max-batch-tokens", "vllm-batch-size-auto", "openai-batch-size"],
)
def test_flags_a_backend_would_ignore_are_refused_at_the_command_line(flags, line):
    tiny = Path(__file__).resolve().parent / "fixtures" / "tiny-llama"
    with pytest.raises(UsageError) as error:
        parse_config(["--model", str(tiny), "--tasks", "demo", "--output", "unused", *flags])
    assert str(error.value) == f"bad arguments: {line}"


def test_a_config_file_value_of_the_wrong_type_is_one_line(tmp_path):
    from evalkit.config import read_config_file

    path = tmp_path / "run.yaml"
    path.write_text("deepspeed: 5\ninclude_path: 3\nseed: 3\nlimit: 0.5\ngen_kwargs: temperature=0\n")
    with pytest.raises(UsageError) as info:
        read_config_file(path)
    assert str(info.value) == (
        f"--config {path}: 'deepspeed' must be a path, got 5; 'include_path' must be a path or a list of them, got 3"
    )


def test_a_config_file_deepspeed_number_ends_the_run_with_one_line(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ntasks: demo\noutput: {tmp_path / 'out'}\ndeepspeed: 5\n")
    done = subprocess.run(
        [sys.executable, "-m", "evalkit", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"evalkit: error: --config {path}: 'deepspeed' must be a path, got 5"]
    assert not (tmp_path / "out").exists()
