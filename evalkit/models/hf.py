"""The transformers causal-LM backend, numerically matching lm-eval's ``hf`` model.

Token handling follows lm-eval 0.4.13 so scores compare: the tokenizer adds its own special
tokens, trailing spaces of a context move onto the continuation, over-long inputs are cut from
the left, continuation log-probs are summed, and long texts are scored in rolling windows that
predict every token exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import transformers

from evalkit.models.batching import run_batched
from evalkit.models.protocol import GenerationInput, Progress
from evalkit.models.stopping import StopOnSequences, cut_at_stop
from evalkit.tasks.requests import DEFAULT_MAX_GEN_TOKS

DEFAULT_MAX_LENGTH = 2048
TOKENIZER_UNSET = int(1e30)  # transformers' "no limit" model_max_length is ~1e30


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
        batch_size: int,
        tp_group: Any = None,
        num_parameters_local: int | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self.tp_group = tp_group
        self.num_parameters_local = num_parameters_local
        self.tokenizer = ensure_pad_token(
            transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        )
        self.model = model.eval()
        self.path = path
        # --max-length wins, as lm-eval's max_length model argument does.
        self.max_length = max_length or model_max_length(self.model.config, self.tokenizer)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self.bos_text = self.tokenizer.decode(self.prefix_token_id)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "class": type(self.model).__name__,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "num_parameters_this_rank": self.num_parameters_local,
            "max_length": self.max_length,
        }

    # -- tokenization -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and text.startswith(self.bos_text):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(text, **kwargs)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # -- scoring ------------------------------------------------------------------------------

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        return self.score_tokens(encoded, progress)

    def score_tokens(self, encoded: list[tuple[list[int], list[int]]], progress: Progress) -> list[tuple[float, bool]]:
        return run_batched(
            encoded,
            self.batch_size,
            length=lambda p: min(len(p[0]) + len(p[1]) - 1, self.max_length),
            cap=self.max_length,
            fn=self._score_batch,
            progress=progress,
            tiebreak=lambda p: tuple(p[0] + p[1]),
        )

    @torch.no_grad()
    def _score_batch(self, width: int, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for ctx, cont in batch]
        ids = torch.full((len(inputs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        # Right padding never changes the scored positions of a causal model, so no mask.
        logprobs = F.log_softmax(self.model(ids.to(self.device)).logits, dim=-1)
        results = []
        for row, ((_, cont), tokens) in enumerate(zip(batch, inputs, strict=True)):
            span = logprobs[row, len(tokens) - len(cont) : len(tokens)]
            target = torch.tensor(cont, device=span.device)
            greedy = bool((span.argmax(dim=-1) == target).all())
            # Summed in float64: the total of hundreds of tokens stays exact to the float32 inputs.
            results.append((float(span.gather(1, target[:, None]).double().sum()), greedy))
        return results

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        totals = [0.0] * len(texts)
        # A few texts at a time, so finished texts are reported while the rest are still running.
        for start in range(0, len(texts), self.batch_size):
            windows, owners = [], []
            for owner in range(start, min(start + self.batch_size, len(texts))):
                for window in rolling_windows(self.encode(texts[owner]), self.prefix_token_id, self.max_length):
                    windows.append(window)
                    owners.append(owner)
            scores = self.score_tokens(windows, progress=lambda finished: None)
            for owner, (logprob, _) in zip(owners, scores, strict=True):
                totals[owner] += logprob
            progress([(owner, totals[owner]) for owner in sorted(set(owners))])
        return totals

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[GenerationInput], progress: Progress) -> list[str]:
        out: list[str] = [""] * len(requests)
        if any(not isinstance(r.context, str) or r.images for r in requests):
            raise ValueError("the hf backend takes text prompts only; use --backend hf-vlm for images")
        for members, kwargs, budget in generation_groups(requests, self.max_length):
            texts = run_batched(
                [requests[i].context for i in members],
                self.batch_size,
                length=lambda c, cap=budget: min(len(self.encode(c)), cap),
                cap=budget,
                fn=lambda width, batch, kw=kwargs: self._generate_batch(width, batch, kw),
                progress=lambda finished, ids=members: progress([(ids[p], text) for p, text in finished]),
                tiebreak=lambda c: c,
            )
            for i, text in zip(members, texts, strict=True):
                out[i] = text
        return out

    @torch.no_grad()
    def _generate_batch(self, width: int, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        until, max_gen_toks, kwargs = stops_and_limits(self.tokenizer, gen_kwargs)
        ids = torch.full((len(contexts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, context in enumerate(contexts):
            tokens = self.encode(context)[-width:]
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
        return [
            cut_at_stop(self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True), until)
            for row in generated.tolist()
        ]


def ensure_pad_token(tokenizer: Any) -> Any:
    """A tokenizer without a pad token pads with its EOS (or UNK) token, as lm-eval's hf model does."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def generation_groups(
    requests: list[GenerationInput], max_length: int
) -> Iterator[tuple[list[int], dict[str, Any], int]]:
    """(positions, normalized generation kwargs, prompt token budget) per set of requests that share
    their generation arguments; a max_gen_toks that leaves no room for a prompt is an error."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(repr(sorted(request.gen_kwargs.items())), []).append(i)
    for members in groups.values():
        kwargs = normalize_generation_kwargs(requests[members[0]].gen_kwargs)
        budget = max_length - kwargs["max_gen_toks"]
        if budget <= 0:
            raise ValueError(
                f"max_gen_toks {kwargs['max_gen_toks']} leaves no room for a prompt in the model's {max_length} positions"
            )
        yield members, kwargs, budget


def stops_and_limits(tokenizer: Any, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
    """(stop sequences with the EOS text added, max_gen_toks, the rest for ``generate``)."""
    kwargs = dict(gen_kwargs)
    until = list(kwargs.pop("until"))
    eos_text = tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
    if eos_text not in until:
        until.append(eos_text)
    return until, kwargs.pop("max_gen_toks"), kwargs


def normalize_generation_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's reading of generation_kwargs: token-limit aliases, greedy unless sampling is asked for."""
    kwargs = dict(raw)
    until = kwargs.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    limits = [kwargs.pop(k, None) for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")]
    max_gen_toks = int(next((v for v in limits if v is not None), DEFAULT_MAX_GEN_TOKS))
    temperature = float(kwargs.pop("temperature", 0.0))
    do_sample = kwargs.pop("do_sample", None)
    do_sample = temperature > 0.0 if do_sample is None else bool(do_sample)
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    return {"until": until, "max_gen_toks": max_gen_toks, **sampling, **kwargs}


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, scored tokens) windows: every token scored once, each with as much context as fits.

    The first window conditions on ``prefix``; later ones on the tokens just before them, and
    the last window is full-length but scores only its new tokens.
    """
    windows = []
    first = min(max_len, len(tokens))
    if tokens:
        windows.append(([prefix] + tokens[: first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        windows.append((tokens[max(end - max_len - 1, 0) : end - 1], tokens[end - n : end]))
        done = end
    # Context and scored tokens overlap except for the first scored token; keep them disjoint.
    return [(ctx[: len(ctx) - (len(scored) - 1)], scored) for ctx, scored in windows]


def model_max_length(config: Any, tokenizer: Any) -> int:
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < TOKENIZER_UNSET:
        return int(limit)
    return DEFAULT_MAX_LENGTH
