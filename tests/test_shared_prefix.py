"""Shared-prefix scoring and token-budget batching give the values of scoring each request alone.

The tiny Llama fixture is loaded for real; requests are few-shot multiple-choice docs (one context,
several continuations), over-long requests cut to the model's context, and single requests.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from evalkit.models.batching import BatchLimit, largest_fitting, split_when_out_of_memory, width_batches
from evalkit.models.hf import HFCausalLM
from evalkit.models.packing import PACKED_WIDTH, block_attention, pack_requests, share_keys

from conftest import TINY_MODEL

WORDS = "the a river bridge old town market quiet green ancient stood near built was moved".split()
TOLERANCE = 1e-5  # fp32


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def multiple_choice_pairs(seed: int = 0) -> list[tuple[str, str]]:
    """Few-shot-like docs: a long context with 2-5 choices each (some a single token), a context
    with a trailing space, over-long contexts that are cut, and plain single requests."""
    rng = random.Random(seed)
    pairs = []
    for doc in range(14):
        shots = "\n\n".join(f"Question: {sentence(rng, 8)}?\nAnswer: {sentence(rng, 2)}" for _ in range(1))
        context = f"{shots}\n\nQuestion: {sentence(rng, 6 + doc % 5)}?\nAnswer:" + (" " if doc % 4 == 0 else "")
        choices = [" " + sentence(rng, rng.randint(1, 4)) for _ in range(2 + doc % 4)]
        if doc % 3 == 0:
            choices[0] = " a"  # one token
        pairs += [(context, choice) for choice in choices]
    long_context = sentence(rng, 150)  # longer than the model's 128 positions
    pairs += [(long_context, " river bridge"), (long_context, " old")]
    pairs += [(sentence(rng, 10), " " + sentence(rng, 3)) for _ in range(3)]
    rng.shuffle(pairs)
    return pairs


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)


def backend(model: torch.nn.Module, batch: BatchLimit | int, shared_prefix: bool) -> HFCausalLM:
    return HFCausalLM(
        str(TINY_MODEL), model=model, device=torch.device("cpu"), batch=batch, shared_prefix=shared_prefix
    )


def score(lm: HFCausalLM, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    reported: dict[int, tuple[float, bool]] = {}
    values = lm.loglikelihood(pairs, lambda done: reported.update(done))
    assert reported == dict(enumerate(values)), "progress reports every request once, with its value"
    return values


@pytest.fixture(scope="module")
def scored_alone(model) -> list[tuple[float, bool]]:
    alone = backend(model, 1, shared_prefix=False)
    assert not alone.shared_prefix
    return score(alone, multiple_choice_pairs())


@pytest.mark.parametrize("batch", [1, 8, BatchLimit(rows=64, tokens=300)], ids=["batch1", "batch8", "tokens300"])
def test_shared_prefix_equals_scoring_each_request_alone(model, scored_alone, batch):
    pairs = multiple_choice_pairs()
    shared = backend(model, batch, shared_prefix=True)
    assert shared.shared_prefix, shared.shared_prefix_note
    expected, got = scored_alone, score(shared, pairs)
    for (want, want_greedy), (have, have_greedy) in zip(expected, got, strict=True):
        assert abs(want - have) <= TOLERANCE
        assert want_greedy == have_greedy
    # The shared path really shares: far fewer rows than requests, and fewer tokens.
    encoded = [shared.encode_pair(c, x) for c, x in pairs]
    packs = pack_requests(encoded, share_keys([c for c, _ in pairs]), shared.max_length)
    assert len(packs) < len(pairs) / 2
    assert sum(len(p) for p in packs) < sum(len(c) + len(x) - 1 for c, x in encoded) / 2


def test_eager_attention_takes_the_block_mask_as_an_additive_mask():
    eager = transformers.AutoModelForCausalLM.from_pretrained(
        TINY_MODEL, dtype=torch.float32, attn_implementation="eager"
    )
    pairs = multiple_choice_pairs(seed=4)[:20]
    shared = backend(eager, 8, shared_prefix=True)
    assert shared.attention == "eager" and shared.shared_prefix, shared.shared_prefix_note
    expected = score(backend(eager, 1, shared_prefix=False), pairs)
    for (want, _), (have, _) in zip(expected, score(shared, pairs), strict=True):
        assert abs(want - have) <= TOLERANCE


def test_a_sliding_window_shorter_than_a_packed_row_turns_packing_off():
    """The block mask replaces the model's own, window included, so such a model scores one request per row."""
    windowed = transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    windowed.config.sliding_window = 32
    lm = backend(windowed, 8, shared_prefix=True)
    assert not lm.shared_prefix and not lm.split_prefix
    assert lm.shared_prefix_note == "off: sliding-window attention (32 tokens) is shorter than a packed row"
    windowed.config.use_sliding_window = False  # Qwen2's configs carry a window they do not use
    assert backend(windowed, 8, shared_prefix=True).shared_prefix


def assert_same_at_any_batch_and_order(model, pairs, reference, *, tokens: int, seed: int) -> None:
    """Shared-prefix values bit-identical to ``reference`` at batch 8, a token budget, and shuffled."""
    for batch in (8, BatchLimit(rows=512, tokens=tokens)):
        assert score(backend(model, batch, shared_prefix=True), pairs) == reference
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    shuffled = score(backend(model, 8, shared_prefix=True), [pairs[i] for i in order])
    assert [shuffled[order.index(i)] for i in range(len(pairs))] == reference


def test_shared_prefix_values_do_not_depend_on_batch_or_order(model):
    pairs = multiple_choice_pairs(seed=1)
    reference = score(backend(model, 1, shared_prefix=True), pairs)
    assert_same_at_any_batch_and_order(model, pairs, reference, tokens=200, seed=2)


def test_rolling_and_generation_are_unchanged_by_token_budget(model):
    rng = random.Random(3)
    texts = [sentence(rng, n) for n in (5, 40, 200, 90, 12)]
    by_count = backend(model, 2, shared_prefix=True)
    by_tokens = backend(model, BatchLimit(rows=512, tokens=256), shared_prefix=True)
    assert by_tokens.loglikelihood_rolling(texts, lambda _: None) == by_count.loglikelihood_rolling(
        texts, lambda _: None
    )
    from evalkit.models.protocol import GenerationInput

    requests = [GenerationInput(sentence(rng, n), {"until": ["\n\n"], "max_gen_toks": 8}) for n in (3, 20, 9, 30)]
    assert by_tokens.generate_until(requests, lambda _: None) == by_count.generate_until(requests, lambda _: None)
    # Decoding is counted as steps and the rows they advanced: each row at most 8 steps.
    steps, generated = by_count.token_counts["generation_steps"], by_count.token_counts["generated"]
    assert 0 < steps <= generated <= 8 * len(requests), by_count.token_counts


# -- packing, masks and batch limits without a model -------------------------------------------


def test_packs_share_the_context_and_keep_positions():
    ctx = [1, 10, 11, 12]
    encoded = [(ctx, [20, 21, 22]), (ctx, [30]), (ctx, [40, 41]), ([1, 5], [6, 7])]
    packs = pack_requests(encoded, ["q", "q", "q", None], max_length=100)
    assert len(packs) == 2
    shared, alone = packs
    assert shared.tokens == (1, 10, 11, 12, 20, 21, 40)
    assert shared.positions == (0, 1, 2, 3, 4, 5, 4)
    assert [shared.scoring_rows(s) for s in shared.segments] == [[3, 4, 5], [3], [3, 6]]
    assert alone.tokens == (1, 5, 6) and alone.scoring_rows(alone.segments[0]) == [1, 2]
    nodes, blocks = shared.visibility(8)
    allowed = block_attention(torch.tensor([nodes]), torch.tensor([blocks]))[0, 0]
    # Block 3 (row 6) sees the context and itself, not block 1 (rows 4, 5); padding sees itself.
    assert allowed[6].tolist() == [True] * 4 + [False, False, True, False]
    assert allowed[5].tolist() == [True] * 6 + [False, False]
    assert allowed[7].tolist() == [False] * 7 + [True]


def test_over_long_requests_are_cut_alone_and_big_groups_spill():
    ctx = list(range(1, 9))
    encoded = [(ctx, [50, 51, 52]), (ctx, [60] * 12), (ctx, [70, 71])]
    packs = pack_requests(encoded, ["g"] * 3, max_length=12)
    cut = next(p for p in packs if p.segments[0].request == 1)
    assert cut.tokens == tuple((ctx + [60] * 12)[-13:][:-1]) and len(cut.segments) == 1
    others = [p for p in packs if p is not cut]
    assert [s.request for p in others for s in p.segments] == [0, 2]
    small = pack_requests(encoded[:1] + encoded[2:], ["g"] * 2, max_length=100, packed_width=10)
    assert [len(p.segments) for p in small] == [1, 1] and all(len(p) <= 10 for p in small)
    assert PACKED_WIDTH & (PACKED_WIDTH - 1) == 0, "a power of two, so padding never widens a packed row past it"


def test_token_budget_fills_batches_by_padded_tokens():
    lengths = [100, 100, 100, 30, 30, 30, 30, 30, 30, 5]
    batches = list(width_batches(lengths, BatchLimit(rows=512, tokens=210), length=lambda n: n, cap=128))
    assert [(w, len(b)) for w, b in batches] == [(104, 2), (104, 1), (30, 6), (5, 1)]
    capped = list(width_batches(lengths, BatchLimit(rows=4, tokens=210), length=lambda n: n, cap=128))
    assert [len(b) for _, b in capped] == [2, 1, 4, 2, 1]
    generation = BatchLimit(rows=512, tokens=210, per_row=70)
    assert [len(b) for _, b in width_batches(lengths, generation, length=lambda n: n, cap=128)] == [1, 1, 1, 2, 2, 2, 1]


def test_auto_budget_search_and_out_of_memory_halving():
    assert largest_fitting(lambda tokens: tokens <= 5000, start=512) == 4096
    assert largest_fitting(lambda tokens: False, start=512) == 512
    calls = []

    def run(width, batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [x * 10 for x in batch]

    assert split_when_out_of_memory(run)(8, [1, 2, 3, 4, 5]) == [10, 20, 30, 40, 50]
    assert calls == [5, 2, 3, 1, 2]
    with pytest.raises(torch.OutOfMemoryError):
        split_when_out_of_memory(lambda w, b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))(8, [1])


# -- docs whose prompts begin alike (a few-shot block) share rows ---------------------------------


def few_shot_pairs(seed: int = 5, subjects: int = 3, docs: int = 7) -> list[tuple[str, str]]:
    """Per subject, one fixed shot then each doc's question (lm-eval's first_n sampler), 2-4 choices."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(subjects):
        shot = f"Question: {sentence(rng, 9)}?\nAnswer: {sentence(rng, 2)}\n\n"
        for doc in range(docs):
            context = f"{shot}Question: {sentence(rng, 3 + doc % 4)}?\nAnswer:"
            pairs += [(context, " " + sentence(rng, rng.randint(1, 3))) for _ in range(2 + doc % 3)]
    rng.shuffle(pairs)
    return pairs


@pytest.fixture
def short_prefixes(monkeypatch):
    """The tiny model has 128 positions; prompts that begin alike for 40 characters share rows."""
    monkeypatch.setattr("evalkit.models.packing.PREFIX_CHARS", 40)


@pytest.mark.parametrize("split_from", [4, 10**6], ids=["prefix-reused-from-kv-cache", "tree-rows-only"])
def test_docs_sharing_a_few_shot_block_score_as_alone_at_any_batch_and_order(
    model, short_prefixes, monkeypatch, split_from
):
    """Rows of docs that share a few-shot block, scored as one tree row each, or (when the block is
    long enough) split at the block: the block once, each doc in its own row over its keys and values."""
    monkeypatch.setattr("evalkit.models.packing.SPLIT_SHARED", split_from)
    pairs = few_shot_pairs()
    alone = score(backend(model, 1, shared_prefix=False), pairs)
    shared = backend(model, 1, shared_prefix=True)
    assert shared.split_prefix, shared.shared_prefix_note
    reference = score(shared, pairs)
    for (want, want_greedy), (have, have_greedy) in zip(alone, reference, strict=True):
        assert abs(want - have) <= TOLERANCE and want_greedy == have_greedy
    counts = shared.token_counts  # what results.json's timings report
    encoded_pairs = [shared.encode_pair(c, x) for c, x in pairs]
    assert counts["one_row_per_request"] == sum(len(c) + len(x) - 1 for c, x in encoded_pairs)
    assert counts["computed"] < 0.5 * counts["one_row_per_request"]
    assert_same_at_any_batch_and_order(model, pairs, reference, tokens=150, seed=6)
    # Really shared across docs: rows hold several docs, and the few-shot block is computed once per row.
    encoded = [shared.encode_pair(c, x) for c, x in pairs]
    packs = pack_requests(encoded, share_keys([c for c, _ in pairs]), shared.max_length)
    same_context = pack_requests(encoded, [c.rstrip() for c, _ in pairs], shared.max_length)
    assert max(max(p.nodes) for p in packs) > 1
    assert sum(map(len, packs)) < 0.7 * sum(map(len, same_context))
    split = [p for p in packs if p.split() is not None]
    assert (len(split) >= len(packs) / 2) if split_from == 4 else not split


def test_a_tree_row_keeps_each_context_apart():
    shot = [1, 2, 3]
    encoded = [(shot + [4, 5], [20, 21]), (shot + [7], [30]), (shot + [4, 5], [40, 41, 42]), (shot, [50, 51])]
    (row,) = pack_requests(encoded, ["g"] * 4, max_length=100)
    # contexts in token order: [1,2,3], [1,2,3,4,5], [1,2,3,7]; each context's blocks in token order
    assert row.tokens == (1, 2, 3, 50, 4, 5, 20, 40, 41, 7)
    assert row.positions == (0, 1, 2, 3, 3, 4, 5, 5, 6, 3)
    assert row.nodes == (0, 0, 0, 1, 2, 2, 2, 2, 2, 3)
    by_request = {s.request: row.scoring_rows(s) for s in row.segments}
    assert by_request == {3: [2, 3], 0: [5, 6], 2: [5, 7, 8], 1: [9]}
    nodes, blocks = row.visibility(11)
    allowed = block_attention(torch.tensor([nodes]), torch.tensor([blocks]))[0, 0]
    seen = {i: [k for k in range(11) if allowed[i, k]] for i in range(11)}
    assert seen[3] == [0, 1, 2, 3]  # block of the context that is the shot itself
    assert seen[6] == [0, 1, 2, 4, 5, 6]  # first block of [1,2,3,4,5]: the shot, its rest, itself
    assert seen[8] == [0, 1, 2, 4, 5, 7, 8]  # second block: not the first block
    assert seen[9] == [0, 1, 2, 9]  # [1,2,3,7]: not the other context's rest
    assert seen[10] == [10]  # padding


def test_a_split_row_scores_the_same_however_its_rows_are_chunked(model, short_prefixes, monkeypatch):
    """A split pack's rows run in calls bounded by memory (SPLIT_MEMORY); a row's values do not depend
    on which other rows share its call."""
    monkeypatch.setattr("evalkit.models.packing.SPLIT_SHARED", 4)
    pairs = few_shot_pairs(seed=8)

    def scored_in_calls(memory: int) -> tuple[list, int]:
        monkeypatch.setattr("evalkit.models.hf.SPLIT_MEMORY", memory)
        lm, calls = backend(model, 8, shared_prefix=True), []
        original = lm._score_split_rows
        monkeypatch.setattr(lm, "_score_split_rows", lambda *args: calls.append(1) or original(*args))
        return score(lm, pairs), len(calls)

    (roomy, few_calls), (tight, many_calls) = scored_in_calls(4), scored_in_calls(1)
    assert tight == roomy
    assert many_calls > few_calls > 0


def test_a_row_splits_at_its_shared_prefix_into_one_row_per_context():
    shot = [1, 2, 3]
    encoded = [(shot + [4, 5], [20, 21]), (shot + [7], [30]), (shot + [4, 5], [40, 41, 42])]
    (row,) = pack_requests(encoded, ["g"] * 3, max_length=100)
    assert row.tokens == (1, 2, 3, 4, 5, 20, 40, 41, 7)
    assert row.split(min_shared=4) is None  # the shared prefix is 3 tokens
    prefix, (first, second) = row.split(min_shared=3)
    assert prefix == (1, 2, 3)
    assert (first.tokens, first.positions) == ((4, 5, 20, 40, 41), (3, 4, 5, 5, 6))
    assert (second.tokens, second.positions) == ((7,), (3,))
    # each segment scored at the same tokens as in the whole row, indexed within its own row
    whole = {s.request: [row.tokens[i] for i in row.scoring_rows(s)] for s in row.segments}
    parts = {
        s.request: [part.tokens[i] for i in part.scoring_rows(s)] for part in (first, second) for s in part.segments
    }
    assert parts == whole == {0: [5, 20], 2: [5, 40, 41], 1: [7]}
    assert [s.request for part in (first, second) for s in part.segments] == [s.request for s in row.segments]
    # a context that is the shared prefix itself has nothing of its own to put in a row
    (with_shot,) = pack_requests([*encoded, (shot, [50])], ["g"] * 4, max_length=100)
    assert with_shot.split(min_shared=1) is None


def test_share_keys_cut_any_union_of_runs_alike(short_prefixes):
    rng = random.Random(7)
    heads = [sentence(rng, 12) for _ in range(3)]
    contexts = [f"{rng.choice(heads)} {sentence(rng, 4)}" for _ in range(300)] + ["short", "short ", ""]
    keys = share_keys(contexts)
    assert keys[-3:] == ["short", "short", None]
    runs: dict = {}
    for context, key in zip(contexts, keys, strict=True):
        runs.setdefault(key, []).append(context)
    assert 3 < len(runs) < 150, "long contexts share in runs, neither all apart nor all together"
    assert all(len({c.rstrip()[:40] for c in members}) == 1 for members in runs.values())
    for trial in range(5):
        chosen = [k for k in runs if random.Random(trial).random() < 0.5]
        subset = [c for k in chosen for c in runs[k]]
        assert share_keys(subset) == [k for k in chosen for _ in runs[k]]
