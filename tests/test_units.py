"""Pure pieces, no process group: layout validation, sharding, merging, seeds, batching, config."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from evalkit.config import Seeds
from evalkit.errors import UsageError
from evalkit.models.batching import padded_width, width_batches
from evalkit.models.lm_rules import rolling_windows
from evalkit.parallel import Layout, Placement
from evalkit.sharding import merge_shards, shard_indices


def test_layout_names_every_factor():
    assert Layout.from_flags(8, 2, "deepspeed", 1).dp == 4
    with pytest.raises(UsageError, match=r"tp\(3\) does not divide world_size\(4\)"):
        Layout.from_flags(4, 3, "deepspeed", 1)


def test_layout_answers_every_layout_question():
    hybrid = Layout.from_flags(8, 2, "transformers", 1)
    assert hybrid.placement is Placement.TRANSFORMERS_TP and hybrid.tensor_parallel
    assert [hybrid.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r for r in range(8) if hybrid.carries_results(r)] == [0, 2, 4, 6]
    assert hybrid.tp_ranks(2) == [4, 5]
    split = Layout.from_flags(4, 1, "deepspeed", 2)
    assert split.placement is Placement.SPLIT and not split.tensor_parallel
    assert all(split.carries_results(r) for r in range(4)) and split.dp == 4
    assert Layout.from_flags(2, 1, "deepspeed", 1).placement is Placement.REPLICA
    assert hybrid.describe()["placement"] == "transformers"
    with pytest.raises(UsageError, match="cannot be combined with --tp"):
        Layout(world_size=4, tp=2, placement=Placement.DEEPSPEED_TP, gpus_per_rank=2)
    with pytest.raises(UsageError, match="needs a tensor-parallel placement"):
        Layout(world_size=4, tp=2, placement=Placement.REPLICA)


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_shards_cover_every_index_once_and_balance_cost(dp):
    # 101 distinct costs in random order: dealing by index alone (round robin, or contiguous blocks)
    # leaves ranks more than one item apart for every dp > 1 here; only dealing by cost balances them.
    costs = random.Random(7).sample(range(1, 501), 101)
    assert len(set(costs)) == len(costs)
    if dp > 1:
        round_robin = [sum(costs[r::dp]) for r in range(dp)]
        assert max(round_robin) - min(round_robin) > max(costs), "the costs must tell cost-blind dealing apart"
    shards = [shard_indices(costs, r, dp) for r in range(dp)]
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(costs), loads


def test_merge_detects_lost_and_duplicated_results():
    assert merge_shards([[(1, "b")], [(0, "a"), (2, "c")]], 3) == ["a", "b", "c"]
    with pytest.raises(AssertionError, match="twice"):
        merge_shards([[(0, "a")], [(0, "a")]], 1)
    with pytest.raises(AssertionError, match="lost 1 of 2"):
        merge_shards([[(0, "a")]], 2)


def test_seed_forms_match_lm_eval():
    assert Seeds.parse("7") == Seeds(python=7, numpy=7, torch=7, fewshot=7)
    assert Seeds.parse("0,1,2") == Seeds(python=0, numpy=1, torch=2, fewshot=1234)
    with pytest.raises(UsageError):
        Seeds.parse("a,b")


def test_rolling_windows_score_every_token_once():
    tokens = list(range(10, 20))
    windows = rolling_windows(tokens, prefix=1, max_len=4)
    assert [w for _, w in windows] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert windows[0][0] == [1]
    for context, scored in windows:
        assert len(context) + len(scored) - 1 <= 4


def test_width_depends_only_on_own_length():
    assert padded_width(100, cap=4096) == 104
    assert padded_width(5, cap=4096) == 5
    assert padded_width(127, cap=128) == 128
    assert padded_width(2000, cap=2040) == 2040
    lengths = [3, 100, 99, 7, 120, 101]
    for size in (1, 2, 8):
        for width, batch in width_batches(lengths, size, length=lambda n: n, cap=4096):
            assert all(padded_width(n, 4096) == width for _, n in batch)
            assert len(batch) <= size


def test_config_file_values_are_type_checked(tmp_path):
    from evalkit.config import read_config_file

    path = tmp_path / "run.yaml"
    path.write_text("tp: '2'\nbatch_sizes: 4\ninclude_path: mytasks\n")
    with pytest.raises(UsageError) as info:
        read_config_file(path)
    message = str(info.value)
    assert "'tp' must be an integer, got '2'" in message
    assert "unknown key 'batch_sizes' (did you mean 'batch_size'?)" in message
    path.write_text("include_path: mytasks\nresume: true\n")
    assert read_config_file(path) == {"include_path": ["mytasks"], "resume": True}


def test_task_hash_names_nested_functions_by_source():
    """lm-eval's config dump leaves functions inside fewshot_config as objects; their repr has an address."""
    from evalkit.identity import _stable

    stable = _stable({"fewshot_config": {"process_docs": test_seed_forms_match_lm_eval}, "n": [1, 2]})
    assert "def test_seed_forms_match_lm_eval" in stable["fewshot_config"]["process_docs"]
    assert "0x" not in str(stable) and stable["n"] == [1, 2]


def test_lm_eval_templates_compile_once_and_render_the_same():
    import lm_eval.utils

    from evalkit.tasks.library import compile_templates_once

    template = "Question: {{question}}\\nAnswer:"
    before = lm_eval.utils.apply_template(template, {"question": "2+2?"})
    compile_templates_once()
    compile_templates_once()
    assert lm_eval.utils.env.from_string(template) is lm_eval.utils.env.from_string(template)
    assert lm_eval.utils.apply_template(template, {"question": "2+2?"}) == before == "Question: 2+2?\\nAnswer:"


def test_backend_registry_selects_by_config(tmp_path):
    from evalkit.models import registry

    assert registry.check_name("hf") is None and registry.check_name("auto") is None
    assert "(did you mean 'hf-vlm'?)" in registry.check_name("hf_vlm")
    with pytest.raises(UsageError, match="--backend 'sglang' is not one of auto, hf, hf-vlm, vllm, openai-completions"):
        registry.select("sglang", str(tmp_path))
    assert registry.SERVED == ("openai-completions", "openai-chat")
    (tmp_path / "config.json").write_text('{"model_type": "llava", "vision_config": {}}')
    assert registry.select("auto", str(tmp_path)).name == "hf-vlm"
    assert registry.select("hf", str(tmp_path)).name == "hf"
    assert registry.select("vllm", str(tmp_path)).images
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert registry.select("auto", str(tmp_path)).name == "hf"
    assert not registry.select("vllm", str(tmp_path)).images


@pytest.mark.parametrize("script, name", [("gpu_check.py", "gpu-check"), ("gpu_vlm_check.py", "gpu-vlm-check")])
def test_gpu_checks_skip_with_one_line_without_cuda(script, name):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: make gpu-check runs for real here")
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        f"{name}: skipped: no CUDA device is visible (torch.cuda.is_available() is False)"
    ]


def test_batch_options_make_one_limit():
    from evalkit.cli import parse_config
    from evalkit.models.batching import MAX_ROWS, BatchLimit

    base = ["--model", "m", "--tasks", "t", "--output", "o"]
    expected = {
        (): BatchLimit(rows=1),
        ("--batch-size", "8"): BatchLimit(rows=8),
        ("--batch-size", "auto"): BatchLimit(rows=MAX_ROWS, auto=True),
        ("--max-batch-tokens", "4096"): BatchLimit(rows=MAX_ROWS, tokens=4096),
        ("--batch-size", "4", "--max-batch-tokens", "4096"): BatchLimit(rows=4, tokens=4096),
    }
    for flags, limit in expected.items():
        assert parse_config([*base, *flags]).batch_limit() == limit
    assert parse_config(base).shared_prefix
    assert not parse_config([*base, "--no-shared-prefix"]).shared_prefix
    problems = {
        ("--batch-size", "many"): "expected a positive integer or auto, got 'many'",
        ("--batch-size", "auto", "--max-batch-tokens", "64"): "--batch-size auto picks the token budget itself",
        ("--max-batch-tokens", "0"): "--max-batch-tokens 0 must be a positive number of tokens",
        ("--think-end-token", "151668"): "--think-end-token '151668' must be the token's text, e.g. '</think>'",
        ("--backend", "vllm", "--vllm-prefix-cache", "--no-shared-prefix"): "--vllm-prefix-cache reads vLLM's "
        "prefix cache, which --no-shared-prefix turns off; drop one",
    }
    assert parse_config([*base, "--think-end-token", "</think>"]).think_end_token == "</think>"
    for flags, message in problems.items():
        with pytest.raises(UsageError, match=message):
            parse_config([*base, *flags])


def test_deal_keeps_a_context_on_one_rank_and_balances_cost():
    from types import SimpleNamespace

    from evalkit.plan import deal
    from evalkit.tasks.requests import Request

    rng = random.Random(0)
    requests = []
    for doc in range(30):
        context = f"Question {doc}: " + "word " * rng.randint(5, 60) + "\nAnswer:"
        for choice in range(rng.randint(2, 5)):
            requests.append(("loglikelihood", (context, f" choice {choice}"), doc))
    requests += [("loglikelihood_rolling", ("text " * rng.randint(10, 90),), 100 + i) for i in range(8)]
    requests += [("loglikelihood", ("", f" alone {i}"), 200 + i) for i in range(6)]  # empty contexts share nothing
    plan = SimpleNamespace(
        requests=[
            Request(index=i, task="t", doc_id=doc, instance=i, repeat=0, kind=kind, args=args)
            for i, (kind, args, doc) in enumerate(requests)
        ],
        done={0, 1},
        multi_round=False,
    )
    for dp in (2, 3):
        shares = [work.requests for work in deal(plan, dp, "launch")]
        indices = [r.index for share in shares for r in share]
        assert sorted(indices) == list(range(2, len(requests)))
        assert all([r.index for r in share] == sorted(r.index for r in share) for share in shares)
        owner = {}
        for rank, share in enumerate(shares):
            for r in share:
                if r.kind == "loglikelihood" and r.args[0]:
                    assert owner.setdefault(r.args[0], rank) == rank, "a context's requests on one rank"
        costs = [sum(r.cost for r in share) for share in shares]
        assert max(costs) < 1.3 * min(costs)


def test_vllm_cpu_shm_segments_of_only_this_tp_group_are_removed(tmp_path):
    from types import SimpleNamespace

    from evalkit.models.vllm_engine import CpuShmSegments
    from evalkit.parallel import Layout, Placement

    layout = Layout(world_size=4, tp=2, placement=Placement.VLLM_TP)
    names = ["-tp:0-[0-1]-cpushm_0", "-tp:0-[0-1]-cpushm_1", "-tp:0-[2-3]-cpushm_0", "psm_1234"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    topo = SimpleNamespace(layout=layout, dp_rank=0, tp_group=None)
    CpuShmSegments(topo, folder=tmp_path).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["-tp:0-[2-3]-cpushm_0", "psm_1234"]
