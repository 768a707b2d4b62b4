"""lm-eval's rules for turning requests into tokens, shared by every backend that tokenizes locally.

Token handling follows lm-eval 0.4.13 so scores compare: the tokenizer adds its own special
tokens, trailing spaces of a context move onto the continuation, continuation log-probs are
summed, and long texts are scored in rolling windows that predict every token exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from evalkit.errors import did_you_mean
from evalkit.models.protocol import DEFAULT_MAX_GEN_TOKS, GenerationInput, Progress
from evalkit.models.stopping import cut_at_stop

DEFAULT_MAX_LENGTH = 2048
TOKENIZER_UNSET = int(1e30)  # transformers' "no limit" model_max_length is ~1e30


class LMTokenizer:
    """A transformers tokenizer used as lm-eval's ``hf`` model uses it; seconds spent go to ``timings``."""

    def __init__(self, tokenizer: Any, timings: dict[str, float]) -> None:
        self.tokenizer = ensure_pad_token(tokenizer)
        self.timings = timings
        self.timings.setdefault("tokenize", 0.0)
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self.bos_text = tokenizer.decode(self.prefix_token_id)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        start = time.monotonic()
        try:
            return self._encode(text, add_special_tokens)
        finally:
            self.timings["tokenize"] += time.monotonic() - start

    def _encode(self, text: str, add_special_tokens: bool | None) -> list[int]:
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

    def decode_generated(self, token_ids: Sequence[int], until: list[str]) -> str:
        """Generated tokens as the hf backend turns them into an answer: decoded whole (an engine's
        incremental detokenizer can drop a trailing partial character), cut at the first stop."""
        return cut_at_stop(self.tokenizer.decode(list(token_ids), skip_special_tokens=True), until)


def prompt_in_window(context: list[int], continuation: list[int], window: int) -> tuple[list[int], int]:
    """(prompt tokens, how many of them are context) for an engine that scores a whole prompt of at
    most ``window`` tokens: an over-long request is cut from the left."""
    tokens = (context + continuation)[-window:]
    return tokens, len(tokens) - len(continuation)


def scoring_window(max_length: int, engine_length: int) -> int:
    """The longest prompt an engine that scores whole prompts (vLLM, a server) is sent.

    The hf rows see ``max_length`` input tokens plus the last target: a prompt of ``max_length +
    1``. vLLM takes a prompt only with room for one generated token, so when its engine can be
    given ``max_length + 2`` positions the windows, and so every value, are those of the hf backend;
    at the model's full context (``--max-length`` not below it) an over-long request keeps up to
    two context tokens fewer.
    """
    return min(max_length + 1, engine_length - 1)


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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _texts(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


_LIMIT = (lambda v: _integer(v) and v >= 1, "a positive integer")
# The generation settings every backend reads, with what their values must be.
GENERATION_SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "until": (_texts, "a stop string or a list of them"),
    "max_gen_toks": _LIMIT,
    "max_new_tokens": _LIMIT,
    "max_tokens": _LIMIT,
    "max_completion_tokens": _LIMIT,
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "min_p": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "num_beams": _LIMIT,
    "repetition_penalty": (lambda v: _number(v) and v > 0, "a number > 0"),
    "presence_penalty": (_number, "a number"),
    "frequency_penalty": (_number, "a number"),
    "seed": (_integer, "an integer"),
}


def generation_problems(kwargs: dict[str, Any], flag: str = "--gen-kwargs") -> list[str]:
    """What is wrong with generation settings, one line each, before any model loads: a key must be
    one of ``GENERATION_SETTINGS`` (value checked) or another setting transformers' ``generate``
    takes (a ``GenerationConfig`` field)."""
    problems = []
    fields: set[str] | None = None
    for key, value in kwargs.items():
        if key in GENERATION_SETTINGS:
            valid, expected = GENERATION_SETTINGS[key]
            if not valid(value):
                problems.append(f"{flag} {key}={value!r}: expected {expected}")
            continue
        if fields is None:
            from transformers import GenerationConfig

            fields = set(GenerationConfig().to_dict())
        if key not in fields:
            known = [*GENERATION_SETTINGS, *fields]
            problems.append(f"{flag}: unknown generation setting {key!r}{did_you_mean(key, known)}")
    if kwargs.get("do_sample") is True and kwargs.get("temperature", 0) == 0:
        problems.append(f"{flag} do_sample=true samples, and needs temperature > 0 (greedy: do_sample=false)")
    return problems


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


def rolling_loglikelihoods(
    texts: Sequence[str],
    encode: Callable[[str], list[int]],
    prefix: int,
    max_len: int,
    chunk: int,
    score: Callable[[list[tuple[list[int], list[int]]]], Sequence[tuple[float, bool]]],
    progress: Progress,
) -> list[float]:
    """The rolling log-likelihood of each text: the summed scores of its :func:`rolling_windows`.

    Texts go ``chunk`` at a time: the windows of a chunk's texts are scored in one ``score`` call
    (a (log-prob, greedy) per (context, scored tokens) window), and the chunk's finished texts
    are reported to ``progress`` while the rest are still to run.
    """
    totals = [0.0] * len(texts)
    for start in range(0, len(texts), chunk):
        windows, owners = [], []
        for owner in range(start, min(start + chunk, len(texts))):
            for window in rolling_windows(encode(texts[owner]), prefix, max_len):
                windows.append(window)
                owners.append(owner)
        for owner, (logprob, _) in zip(owners, score(windows), strict=True):
            totals[owner] += logprob
        progress([(owner, totals[owner]) for owner in sorted(set(owners))])
    return totals


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
