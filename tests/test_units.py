"""Pure pieces, no process group: layout validation, sharding, merging, seeds, registry, metrics."""

from __future__ import annotations

import math
import random

import pytest

from evalkit.config import Seeds
from evalkit.errors import UsageError
from evalkit.filters import FilterPipeline
from evalkit.metrics import bootstrap_stderr, exact_match, mean_stderr, perplexity
from evalkit.models.batching import padded_width, width_batches
from evalkit.models.hf import rolling_windows
from evalkit.parallel import ParallelDims
from evalkit.registry import Registry
from evalkit.sharding import merge_shards, shard_indices
from evalkit.tasks.config import FilterChain, FilterStep


def test_parallel_dims_names_every_factor():
    assert ParallelDims(world_size=8, tp=2).dp == 4
    with pytest.raises(UsageError, match=r"tp\(3\) does not divide world_size\(4\)"):
        ParallelDims(world_size=4, tp=3)


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_shards_cover_every_index_once_and_balance_cost(dp):
    costs = [random.Random(7).randint(1, 500) for _ in range(101)]
    shards = [shard_indices(costs, r, dp) for r in range(dp)]
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(costs)


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


def test_registry_suggests_the_closest_name():
    reg: Registry[int] = Registry("metric")
    reg.register("exact_match")(1)
    with pytest.raises(UsageError, match="did you mean 'exact_match'"):
        reg.get("exact_mach")
    with pytest.raises(ValueError, match="twice"):
        reg.register("exact_match")(2)


def _python_bootstrap(values, iters):
    """lm-eval's bootstrap written the slow, obvious way: chunk i draws with random.Random(i)."""
    stats = []
    for i in range(iters // 1000):
        rnd = random.Random(i)
        stats += [perplexity(rnd.choices(values, k=len(values))) for _ in range(1000)]
    mu = sum(stats) / len(stats)
    return math.sqrt(sum((x - mu) ** 2 for x in stats) / (len(stats) - 1))


def test_vectorised_bootstrap_equals_the_reference_algorithm():
    rnd = random.Random(3)
    values = [rnd.uniform(-9, -1) for _ in range(23)]
    expected = _python_bootstrap(values, 3000)
    assert expected > 0
    assert bootstrap_stderr(perplexity, values, 3000) == expected


def test_mean_stderr_uses_sample_deviation():
    assert mean_stderr([0.0, 1.0]) == pytest.approx(0.5)


def test_exact_match_normalisations():
    assert exact_match("The answer is 42.", "42", regexes_to_ignore=[r"(?s).*is ", r"\.$"]) == 1.0
    assert exact_match("ABC", "abc", ignore_case=True) == 1.0
    assert exact_match("a,b!", "ab", ignore_punctuation=True) == 1.0
    assert exact_match("a", "b") == 0.0


def test_filters_chain_like_lm_eval():
    pipeline = FilterPipeline(
        [
            FilterChain(
                name="strict", steps=(FilterStep(function="regex", kwargs={}), FilterStep(function="take_first"))
            ),
            FilterChain(
                name="flex",
                steps=(
                    FilterStep(
                        function="regex", kwargs={"regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)", "group_select": -1}
                    ),
                    FilterStep(function="take_first"),
                ),
            ),
            FilterChain(
                name="ws",
                steps=(
                    FilterStep(function="lowercase"),
                    FilterStep(function="remove_whitespace"),
                    FilterStep(function="take_first"),
                ),
            ),
        ]
    )
    out = pipeline.apply(["  So 3 then 12 #### 15 "])
    assert out == {"strict": "15", "flex": "15", "ws": "so 3 then 12 #### 15"}
    assert pipeline.apply(["no digits"])["strict"] == "[invalid]"
    with pytest.raises(UsageError, match="did you mean 'take_first'"):
        FilterPipeline([FilterChain(name="x", steps=(FilterStep(function="take_frist"),))])


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
