"""The transformers causal-LM backend, numerically matching lm-eval's ``hf`` model.

Requests become tokens by lm-eval's rules (``lm_rules``); over-long inputs are cut from the left
as lm-eval's hf model cuts them.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from evalkit.errors import UsageError, one_line, say
from evalkit.models.batching import (
    BatchLimit,
    largest_fitting,
    padded_width,
    run_batched,
    split_when_out_of_memory,
)
from evalkit.models.lm_rules import (
    LMTokenizer,
    generation_groups,
    model_max_length,
    rolling_loglikelihoods,
)
from evalkit.models.packing import (
    PACKED_WIDTH,
    SPLIT_SHARED,
    Encoded,
    Pack,
    block_attention,
    pack_requests,
    share_keys,
)
from evalkit.models.protocol import GenerationInput, Progress
from evalkit.models.stopping import StopOnSequences, cut_at_stop
from evalkit.parallel import Topology

AUTO_CPU_TOKENS = 4096  # --batch-size auto without CUDA: CPU tokens/s is flat from ~1k to 8k per call (BENCHMARKS.md)
AUTO_MEMORY_SHARE = 0.5  # of the free GPU memory, when the budget is estimated rather than probed
ROWS_PER_CHUNK = 16  # requests per retry chunk (and rolling texts per call) under a token budget
# A split pack's rows run in calls whose keys and values total at most this many times the packed
# row's tokens (every row holds its own copy of the prefix's).
SPLIT_MEMORY = 4
# How far packed and separate rows may differ on the probe (summed log-probs of 4-6 tokens) before
# packing is judged broken for a model: float rounding is far below, a block that sees another
# block or a shifted position far above.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}


@dataclass(frozen=True, kw_only=True)
class TransformersOptions:
    """What a transformers backend is built from: the checkpoint, where this rank sits, and how
    its model calls are batched."""

    path: str
    topo: Topology
    dtype: str
    trust_remote_code: bool
    batch: BatchLimit
    shared_prefix: bool
    max_length: int | None


def load_transformers(cls: type, options: TransformersOptions, auto_class: type | None = None) -> Any:
    """A ``cls`` backend on the model loaded where the layout's placement puts it; a checkpoint that
    does not load is a one-line usage error."""
    from evalkit.models.placement import input_device, load_model, local_parameter_count

    topo = options.topo
    try:
        model = load_model(
            options.path, options.dtype, topo, trust_remote_code=options.trust_remote_code, auto_class=auto_class
        )
        return cls(
            options.path,
            model=model,
            device=input_device(model, topo),
            batch=options.batch,
            shared_prefix=options.shared_prefix,
            tp_group=topo.tp_group,
            num_parameters_local=local_parameter_count(model),
            trust_remote_code=options.trust_remote_code,
            max_length=options.max_length,
            rank=topo.rank,
        )
    except (OSError, ValueError) as exc:
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            raise UsageError(
                f"{options.path} needs its own Python code to load; evalkit runs it only with "
                f"--trust-remote-code (read that code first)"
            ) from None
        raise UsageError(
            f"cannot load model from {options.path} with backend {cls.name}: {one_line(exc)[:300]}"
        ) from None


class HFCausalLM:
    """Scoring and generation with a loaded model, wherever its weights were placed.

    ``tp_group`` is set when the model is tensor-parallel: every rank of the group then runs the
    same batches, and generation stops only when all of them would, so no rank waits alone in an
    all-reduce.
    """

    name = "hf"

    def __init__(
        self,
        path: str,
        *,
        model: torch.nn.Module,
        device: torch.device,
        batch: BatchLimit | int,
        tp_group: Any = None,
        num_parameters_local: int | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        shared_prefix: bool = True,
        rank: int = 0,
    ) -> None:
        self.rank = rank
        self.device = device
        self.tp_group = tp_group
        self.timings: dict[str, float] = {}
        # Scored tokens computed and one row per request would compute; generation's decoding steps
        # and the rows they advanced (every row of a batch steps until the batch stops).
        self.token_counts = {"computed": 0, "one_row_per_request": 0, "generation_steps": 0, "generated": 0}
        self.num_parameters_local = num_parameters_local
        tokens = LMTokenizer(
            transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), self.timings
        )
        self.tokenizer, self.encode, self.encode_pair = tokens.tokenizer, tokens.encode, tokens.encode_pair
        self.prefix_token_id = tokens.prefix_token_id
        self.model = model.eval()
        self.path = path
        # --max-length wins, as lm-eval's max_length model argument does.
        self.max_length = max_length or model_max_length(self.model.config, self.tokenizer)
        inner = unwrap(self.model)
        self.attention = getattr(inner.config, "_attn_implementation", None)
        self.shared_prefix, self.shared_prefix_note = self._check_packing() if shared_prefix else (False, "off")
        self.cache_argument = cache_argument(inner)
        self.keeps_logits = "logits_to_keep" in inspect.signature(inner.forward).parameters
        self.split_prefix = self.shared_prefix and self._check_split()
        self.limit = self._resolve(BatchLimit.of(batch))
        self.batch_size = self.limit.rows if self.limit.tokens is None else ROWS_PER_CHUNK

    @classmethod
    def load(cls, options: TransformersOptions) -> HFCausalLM:
        return load_transformers(cls, options)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "class": type(self.model).__name__,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "num_parameters_this_rank": self.num_parameters_local,
            "max_length": self.max_length,
            "batch": self.limit.describe(),
            "shared_prefix": self.shared_prefix_note,
        }

    def _check_packing(self) -> tuple[bool, str]:
        """Whether packed rows score as separate rows do for this model: (on, what was found).

        Every rank runs the same fixed probe (a TP group in step), so all agree. A model whose
        attention takes no custom mask, or ignores position ids, is scored one request per row.
        """
        if self.attention not in ("sdpa", "eager"):
            return False, f"off: attention {self.attention!r} takes no custom masks"
        window = sliding_window(unwrap(self.model).config)
        if window is not None and window < min(self.max_length, PACKED_WIDTH):
            return False, f"off: sliding-window attention ({window} tokens) is shorter than a packed row"
        pairs = self._probe_pairs()
        try:
            (shared,) = pack_requests(pairs, ["probe"] * len(pairs), self.max_length)
            scores = self._score_rows(len(shared), [shared], True)[0]
            by_request = {segment.request: score for segment, score in zip(shared.segments, scores, strict=True)}
            packed = [by_request[i] for i in range(len(pairs))]
            alone = [self._score_rows(len(p), [p], False)[0][0] for p in pack_requests(pairs, [None] * len(pairs), 100)]
        except (TypeError, ValueError, RuntimeError) as exc:
            return False, f"off: the model refused a packed row ({type(exc).__name__}: {exc})"[:300]
        gap = max(abs(a[0] - b[0]) for a, b in zip(packed, alone, strict=True))
        tolerance = PROBE_TOLERANCE.get(unwrap(self.model).dtype, 0.25)
        if gap > tolerance:
            return False, f"off: packed and separate rows differ by {gap:.3g} on a probe (> {tolerance})"
        return True, f"on (probe: packed and separate rows differ by {gap:.1e})"

    def _probe_pairs(self) -> list[Encoded]:
        """Two choices of one context, and a second context sharing its first 10 tokens (one row)."""
        generator = torch.Generator().manual_seed(0)
        vocab = min(len(self.tokenizer), unwrap(self.model).get_input_embeddings().num_embeddings)
        tokens = torch.randint(0, vocab, (24,), generator=generator).tolist()
        return [(tokens[:14], tokens[14:20]), (tokens[:14], tokens[20:]), (tokens[:10] + tokens[20:], tokens[14:17])]

    def _check_split(self) -> bool:
        """Whether a row split at its shared prefix (``Pack.split``: the prefix once, each context
        in its own row over the prefix's cached keys and values) scores as the packed row does, on
        the packing probe; the note says which."""
        pairs = self._probe_pairs()
        (pack,) = pack_requests(pairs, ["probe"] * len(pairs), self.max_length)
        split = pack.split(min_shared=1)
        try:
            assert split is not None and self.cache_argument is not None
            packed = self._score_rows(len(pack), [pack], True)[0]
            parts = self._score_split(*split)
        except Exception as exc:  # a probe: whatever the model does with a cache, splitting is then off
            self.shared_prefix_note += f"; long shared prefixes are not reused from the KV cache ({type(exc).__name__})"
            return False
        gap = max(abs(a[0] - b[0]) for a, b in zip(packed, parts, strict=True))
        tolerance = PROBE_TOLERANCE.get(unwrap(self.model).dtype, 0.25)
        if gap > tolerance:
            self.shared_prefix_note += f"; long shared prefixes are not reused from the KV cache (probe gap {gap:.3g})"
            return False
        self.shared_prefix_note += (
            f"; shared prefixes of {SPLIT_SHARED}+ tokens computed once, reused from the KV cache"
        )
        return True

    def _resolve(self, limit: BatchLimit) -> BatchLimit:
        """``--batch-size auto``: a token budget for this device, said out loud."""
        if not limit.auto:
            return limit
        if self.device.type != "cuda":
            tokens, how = AUTO_CPU_TOKENS, "the CPU default"
        elif self.tp_group is not None:
            # A probe that runs out of memory on one TP rank would leave the others in an all-reduce.
            tokens, how = tokens_from_free_memory(self.model, self.device, self.tp_group), "estimated (tensor parallel)"
        else:
            width = min(self.max_length, PACKED_WIDTH)
            tokens = largest_fitting(lambda n: self._fits(width, n), start=width)
            how = f"the largest that ran at width {width} on {torch.cuda.get_device_name(self.device)}"
        return announce_auto(limit, tokens, how, self.rank)

    def _guard(self, fn: Any) -> Any:
        """Batches that run out of GPU memory are halved, except under TP (a lone rank retrying
        would leave its group waiting in an all-reduce)."""
        return split_when_out_of_memory(fn) if self.tp_group is None else fn

    def _fits(self, width: int, tokens: int) -> bool:
        """Whether a scoring call of ``tokens`` tokens at ``width`` runs without running out of memory."""
        rows = max(tokens // width, 1)
        context = [self.prefix_token_id] * (width - 1)
        packs = pack_requests([(context, [self.prefix_token_id])] * rows, [None] * rows, self.max_length)
        try:
            self._score_rows(padded_width(width, self.max_length), packs, self.shared_prefix)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    # -- scoring ------------------------------------------------------------------------------

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        groups = share_keys([c for c, _ in pairs]) if self.shared_prefix else [None] * len(pairs)
        return self.score_tokens(encoded, progress, groups=groups, masked=self.shared_prefix)

    def score_tokens(
        self,
        encoded: list[Encoded],
        progress: Progress,
        groups: list[str | None] | None = None,
        masked: bool = False,
    ) -> list[tuple[float, bool]]:
        """(summed log-prob, greedy) of each continuation; requests of one group with the same
        context share a row (``packing``) when ``masked``, which every row of the call then uses."""
        packs = pack_requests(encoded, groups or [None] * len(encoded), self.max_length)
        self.token_counts["computed"] += sum(map(len, packs))
        self.token_counts["one_row_per_request"] += sum(min(len(c) + len(x) - 1, self.max_length) for c, x in encoded)
        out: list[Any] = [None] * len(encoded)

        def report(finished: list[tuple[int, list[tuple[float, bool]]]]) -> None:
            done = []
            for number, scores in finished:
                for segment, score in zip(packs[number].segments, scores, strict=True):
                    out[segment.request] = score
                    done.append((segment.request, score))
            progress(done)

        run_batched(
            packs,
            self.limit,
            length=len,
            cap=self.max_length,
            fn=self._guard(lambda width, batch: self._score_packs(width, batch, masked)),
            progress=report,
            tiebreak=lambda pack: pack.tokens,
        )
        return out

    def _score_packs(self, width: int, packs: list[Pack], masked: bool) -> list[list[tuple[float, bool]]]:
        """One batch of the run (the unit that is saved, retried and reported). A row with a long
        shared prefix is scored split at it (``Pack.split``), the others together at ``width``."""
        splits = [pack.split() if masked and self.split_prefix else None for pack in packs]
        whole = [pack for pack, split in zip(packs, splits, strict=True) if split is None]
        scored = iter(self._score_rows(width, whole, masked) if whole else [])
        return [next(scored) if split is None else self._score_split(*split) for split in splits]

    @torch.no_grad()
    def _score_split(self, prefix: tuple[int, ...], rows: list[Pack]) -> list[tuple[float, bool]]:
        """The (log-prob, greedy) of each segment of the split pack, in the pack's order: the prefix in one causal pass,
        then every row in one pass over the prefix's keys and values. Both passes depend only on the
        pack (widths from its own lengths), never on the batch."""
        kept = {"logits_to_keep": 1} if self.keeps_logits else {}
        out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True, **kept)
        layers = [(layer[0], layer[1]) for layer in getattr(out, self.cache_argument)]
        del out
        if any(keys.shape[-2] != len(prefix) for keys, _ in layers):
            raise ValueError("the model's cache does not hold the whole prefix")
        width = padded_width(max(map(len, rows)), self.max_length)
        # Each call's keys and values stay within SPLIT_MEMORY times the packed row's tokens.
        per_call = max(1, SPLIT_MEMORY * (len(prefix) + sum(map(len, rows))) // (len(prefix) + width))
        scores: list[tuple[float, bool]] = []
        for start in range(0, len(rows), per_call):
            scores += self._score_split_rows(layers, width, rows[start : start + per_call])
        return scores

    def _score_split_rows(
        self, layers: list[tuple[torch.Tensor, torch.Tensor]], width: int, rows: list[Pack]
    ) -> list[tuple[float, bool]]:
        """Rows of a split pack at ``width``, over the prefix's keys and values ``layers``."""
        prefix = layers[0][0].shape[-2]
        positions, own = self._tree_inputs(width, rows)
        seen = torch.ones((len(rows), 1, width, prefix), dtype=torch.bool, device=self.device)
        cache = expanded_cache(layers, len(rows))
        logits = self.model(
            input_ids=self._padded_ids(width, rows),
            attention_mask=self._mask(torch.cat([seen, own], dim=-1)),
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: cache},
        ).logits
        # The rows hold the pack's contexts in order, so their segments concatenate to the pack's.
        return [score for scores in self._scores(logits, rows) for score in scores]

    @torch.no_grad()
    def _score_rows(self, width: int, packs: list[Pack], masked: bool) -> list[list[tuple[float, bool]]]:
        """Per pack, the (log-prob, greedy) of each segment, from one forward pass at ``width``."""
        kwargs: dict[str, Any] = {}
        if masked and width <= PACKED_WIDTH:  # wider rows hold one request each: plain causal rows
            positions, allowed = self._tree_inputs(width, packs)
            kwargs = {"attention_mask": self._mask(allowed), "position_ids": positions}
        # Right padding never changes the scored positions of a causal model.
        return self._scores(self.model(input_ids=self._padded_ids(width, packs), **kwargs).logits, packs)

    def _padded_ids(self, width: int, packs: list[Pack]) -> torch.Tensor:
        """The packs' tokens as rows of ``width``, right-padded, on the model's device."""
        ids = torch.full((len(packs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, pack in enumerate(packs):
            ids[row, : len(pack)] = torch.tensor(pack.tokens)
        return ids.to(self.device)

    def _tree_inputs(self, width: int, packs: list[Pack]) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids, boolean block mask) of the packs' tree rows at ``width``, on the model's device."""
        positions = torch.zeros((len(packs), width), dtype=torch.long)
        for row, pack in enumerate(packs):
            positions[row, : len(pack)] = torch.tensor(pack.positions)
        nodes, blocks = zip(*(pack.visibility(width) for pack in packs), strict=True)
        allowed = block_attention(torch.tensor(nodes, device=self.device), torch.tensor(blocks, device=self.device))
        return positions.to(self.device), allowed

    def _scores(self, logits: torch.Tensor, packs: list[Pack]) -> list[list[tuple[float, bool]]]:
        """Per pack (row ``i`` of ``logits``), the (log-prob, greedy) of each of its segments."""
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        for row, pack in enumerate(packs):
            for segment in pack.segments:
                scoring = pack.scoring_rows(segment)
                rows += [row] * len(scoring)
                cols += scoring
                targets += segment.continuation
        as_index = functools.partial(torch.tensor, dtype=torch.long, device=logits.device)
        # Only the scored positions are normalised, in float32 whatever the model's dtype.
        logprobs = F.log_softmax(logits[as_index(rows), as_index(cols)].float(), dim=-1)
        target = as_index(targets)
        chosen = logprobs.gather(1, target[:, None])[:, 0].double().cpu()
        greedy = (logprobs.argmax(dim=-1) == target).cpu()
        results, start = [], 0
        for pack in packs:
            scores = []
            for segment in pack.segments:
                end = start + len(segment.continuation)
                # Summed in float64: the total of hundreds of tokens stays exact to the float32 inputs.
                scores.append((float(chosen[start:end].sum()), bool(greedy[start:end].all())))
                start = end
            results.append(scores)
        return results

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The block mask in the form the model's attention takes: boolean for SDPA, additive for eager."""
        if self.attention == "sdpa":
            return allowed
        dtype = unwrap(self.model).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        # A few texts at a time, so finished texts are reported while the rest are still running.
        return rolling_loglikelihoods(
            texts,
            self.encode,
            self.prefix_token_id,
            self.max_length,
            self.limit.rows,
            lambda windows: self.score_tokens(windows, progress=lambda finished: None),
            progress,
        )

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[GenerationInput], progress: Progress) -> list[str]:
        out: list[str] = [""] * len(requests)
        if any(not isinstance(r.context, str) or r.images for r in requests):
            raise ValueError("the hf backend takes text prompts only; use --backend hf-vlm for images")
        for members, kwargs, budget in generation_groups(requests, self.max_length):
            prompts = [(requests[i].context, self.encode(requests[i].context)) for i in members]
            texts = run_batched(
                prompts,
                replace(self.limit, per_row=kwargs["max_gen_toks"]),
                length=lambda prompt, cap=budget: min(len(prompt[1]), cap),
                cap=budget,
                fn=self._guard(lambda width, batch, kw=kwargs: self._generate_batch(width, batch, kw)),
                progress=lambda finished, ids=members: progress([(ids[p], text) for p, text in finished]),
                tiebreak=lambda prompt: prompt[0],
            )
            for i, text in zip(members, texts, strict=True):
                out[i] = text
        return out

    @torch.no_grad()
    def _generate_batch(
        self, width: int, prompts: list[tuple[str, list[int]]], gen_kwargs: dict[str, Any]
    ) -> list[str]:
        """Greedy or sampled continuations of (text, tokens) prompts, left-padded to ``width``."""
        until, max_gen_toks, kwargs = stops_and_limits(self.tokenizer, gen_kwargs)
        contexts = [tokens for _, tokens in prompts]
        ids = torch.full((len(contexts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, tokens in enumerate(contexts):
            tokens = tokens[-width:]
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_length=width + max_gen_toks,
            stopping_criteria=[StopOnSequences(self.tokenizer, until, width, len(contexts), group=self.tp_group)],
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            **kwargs,
        )
        steps = generated.shape[1] - ids.shape[1]
        self.token_counts["generation_steps"] += steps
        self.token_counts["generated"] += steps * len(contexts)
        return [
            cut_at_stop(self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True), until)
            for row in generated.tolist()
        ]


def tokens_from_free_memory(model: Any, device: torch.device, group: Any = None) -> int:
    """A token budget from the GPU memory left after loading (float32 logits dominate per token),
    the smallest over ``group`` so a TP group agrees."""
    inner = unwrap(model)
    config = getattr(inner.config, "text_config", None) or inner.config
    free, _ = torch.cuda.mem_get_info(device)
    per_token = 4 * (inner.get_input_embeddings().num_embeddings + 8 * config.hidden_size)
    budget = torch.tensor([int(free * AUTO_MEMORY_SHARE / per_token)], device=device)
    if group is not None:
        torch.distributed.all_reduce(budget, op=torch.distributed.ReduceOp.MIN, group=group)
    return max(int(budget.item()), 1)


def announce_auto(limit: BatchLimit, tokens: int, how: str, rank: int) -> BatchLimit:
    """``limit`` with the token budget ``--batch-size auto`` picked, said on stderr."""
    say(f"evalkit: rank {rank}: --batch-size auto: {tokens} tokens per model call ({how})")
    return replace(limit, tokens=tokens, auto=False)


def cache_argument(model: Any) -> str | None:
    """The keyword a model's forward takes its key/value cache by (transformers renamed it), or None."""
    names = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in names), None)


def expanded_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> Any:
    """A fresh key/value cache holding ``layers`` (one row each) for ``rows`` rows."""
    data = [(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in layers]
    try:
        return transformers.DynamicCache(ddp_cache_data=data)
    except TypeError:  # transformers 4
        return transformers.DynamicCache.from_legacy_cache(tuple(data))


def sliding_window(config: Any) -> int | None:
    """The sliding-window attention span of a model's config, or None when every layer sees the
    whole context (Qwen2 carries a window it does not use)."""
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    return int(window)


def unwrap(model: Any) -> Any:
    """The transformers model inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def stops_and_limits(tokenizer: Any, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
    """(stop sequences with the EOS text added, max_gen_toks, the rest for ``generate``)."""
    kwargs = dict(gen_kwargs)
    until = list(kwargs.pop("until"))
    eos_text = tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
    if eos_text not in until:
        until.append(eos_text)
    return until, kwargs.pop("max_gen_toks"), kwargs
