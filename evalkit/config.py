"""The run configuration: typed, validated once, with defaults in one place.

Flags and an optional YAML file (``--config``) fill the same dataclass; a YAML key the
dataclass does not know is an error naming the file and the closest known key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from evalkit.errors import UsageError, did_you_mean, one_line, raise_all
from evalkit.models.batching import MAX_ROWS, BatchLimit
from evalkit.models.dtypes import DTYPE_NAMES
from evalkit.models.lm_rules import generation_problems

if TYPE_CHECKING:
    from evalkit.judge import JudgeOptions

TP_BACKENDS = ("deepspeed", "transformers")


@dataclass(frozen=True, kw_only=True)
class Seeds:
    python: int
    numpy: int
    torch: int
    fewshot: int

    @classmethod
    def parse(cls, text: str | int) -> Seeds:
        """One value sets all four (as ``lm_eval --seed N`` does); 3 or 4 comma-separated values set
        python, numpy, torch (and few-shot, 1234 when left out)."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--seed {text!r}: expected an integer or four comma-separated integers") from None
        if len(values) == 1:
            values = values * 4
        elif len(values) == 3:
            values.append(DEFAULT_SEED.fewshot)
        if len(values) != 4:
            raise UsageError(f"--seed {text!r}: expected 1, 3 or 4 values, got {len(values)}")
        return cls(python=values[0], numpy=values[1], torch=values[2], fewshot=values[3])


# lm-eval's default seeds: python random 0, numpy, torch and the few-shot sampler 1234.
DEFAULT_SEED = Seeds(python=0, numpy=1234, torch=1234, fewshot=1234)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: str
    tasks: tuple[str, ...]
    output: Path
    include_path: tuple[Path, ...] = ()
    backend: str = "auto"
    # Requests per model call: an integer, or "auto" (a token budget that fits the device).
    batch_size: int | str | None = None
    max_batch_tokens: int | None = None
    shared_prefix: bool = True
    # vllm: loglikelihood prompts read vLLM's prefix cache (faster; values move by float rounding).
    vllm_prefix_cache: bool = False
    limit: float | None = None
    num_fewshot: int | None = None
    seed: Seeds = DEFAULT_SEED
    dtype: str = "auto"
    device: str | None = None
    tp: int = 1
    tp_backend: str = "deepspeed"
    gpus_per_rank: int = 1
    deepspeed: Path | None = None
    gpu_mem: float | None = None
    timeout: float = 1800.0
    resume: bool = False
    stall_timeout: float = 300.0
    flush_interval: float = 5.0
    on_error: str = "fail"
    trust_remote_code: bool = False
    max_length: int | None = None
    apply_chat_template: bool = False
    # None: lm-eval's default, on exactly when a chat template is applied.
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None
    gen_kwargs: dict | None = None
    think_end_token: str | None = None  # a generation's answer is what follows the last one
    confirm_run_unsafe_code: bool = False
    bootstrap_iters: int = 100_000
    # A model behind an OpenAI-compatible server (--backend openai-completions / openai-chat).
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never the key)
    tokenizer: str | None = None  # local tokenizer folder of a served model (default: --model if a folder)
    concurrency: int = 8  # requests in flight per rank
    max_retries: int = 5  # per request, on 429, 5xx, dropped connections and timeouts
    request_timeout: float = 600.0  # seconds one request may take
    # The LLM judge of tasks that score through one; concurrency, retries and timeout as above.
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the judge's key

    def batch_limit(self) -> BatchLimit:
        """What one model call may hold: --batch-size requests (1 by default), --max-batch-tokens
        tokens (any number of requests unless --batch-size also caps them), or auto."""
        if self.batch_size == "auto":
            return BatchLimit(rows=MAX_ROWS, auto=True)
        if self.max_batch_tokens is not None:
            return BatchLimit(rows=self.batch_size or MAX_ROWS, tokens=self.max_batch_tokens)
        return BatchLimit(rows=self.batch_size or 1)

    def task_metadata(self, model_path: str) -> dict:
        """What lm-eval hands its tasks as metadata: the model arguments (some tasks read the tokenizer)."""
        metadata: dict = {"pretrained": model_path}
        if self.max_length is not None:
            metadata["max_length"] = self.max_length
        return metadata

    def judge_options(self) -> JudgeOptions | None:
        """The judge's own options, when one is configured."""
        if not self.judge_base_url or not self.judge_model:
            return None
        from evalkit.judge import JudgeOptions

        return JudgeOptions(
            base_url=self.judge_base_url,
            model=self.judge_model,
            api_key_env=self.judge_api_key_env,
            concurrency=self.concurrency,
            max_retries=self.max_retries,
            request_timeout=self.request_timeout,
        )

    @property
    def multiturn(self) -> bool:
        return self.apply_chat_template if self.fewshot_as_multiturn is None else self.fewshot_as_multiturn

    def validate(self) -> RunConfig:
        raise_all(self.problems(), "bad arguments")
        return self

    def given(self, name: str) -> bool:
        """Whether option ``name`` differs from its default (a flag or config key set it)."""
        return getattr(self, name) != DEFAULTS[name]

    def problems(self) -> list[str]:
        """Every problem with the values themselves, one line each; whether the chosen backend honours
        them is its BackendSpec's question (``evalkit.models.registry``)."""
        problems = []
        if self.vllm_prefix_cache and not self.shared_prefix:
            problems.append(
                "--vllm-prefix-cache reads vLLM's prefix cache, which --no-shared-prefix turns off; drop one"
            )
        if not self.tasks:
            problems.append("no tasks given; pass --tasks name1,name2")
        if self.batch_size is not None and self.batch_size != "auto":
            if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
                problems.append(f"--batch-size {self.batch_size!r} must be a positive integer or auto")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            problems.append(f"--max-batch-tokens {self.max_batch_tokens} must be a positive number of tokens")
        if self.max_batch_tokens is not None and self.batch_size == "auto":
            problems.append("--batch-size auto picks the token budget itself; drop --max-batch-tokens or give a number")
        if self.limit is not None and (self.limit <= 0 or (self.limit > 1 and self.limit != int(self.limit))):
            problems.append(f"--limit {self.limit} must be a positive integer or a fraction in (0, 1]")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            problems.append(f"--num-fewshot {self.num_fewshot} must be 0 or more")
        if self.think_end_token is not None and (not self.think_end_token.strip() or self.think_end_token.isdigit()):
            problems.append(
                f"--think-end-token {self.think_end_token!r} must be the token's text, e.g. '</think>' (not its id)"
            )
        problems.extend(generation_problems(self.gen_kwargs or {}))
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
        if self.tp < 1:
            problems.append(f"--tp {self.tp} must be at least 1")
        if self.tp_backend not in TP_BACKENDS:
            problems.append(f"--tp-backend {self.tp_backend!r} is not one of {', '.join(TP_BACKENDS)}")
        if self.gpus_per_rank < 1:
            problems.append(f"--gpus-per-rank {self.gpus_per_rank} must be at least 1")
        if self.gpus_per_rank > 1 and self.tp > 1:
            problems.append("--gpus-per-rank and --tp cannot be combined; pick one way to split the model")
        if self.gpu_mem is not None and self.gpu_mem <= 0:
            problems.append(f"--gpu-mem {self.gpu_mem} must be positive (GiB per GPU)")
        if self.on_error not in ("fail", "record"):
            problems.append(f"--on-error {self.on_error!r} must be fail or record")
        if self.stall_timeout <= 0 or self.flush_interval <= 0:
            problems.append("--stall-timeout and --flush-interval must be positive seconds")
        if self.timeout <= 0:
            problems.append(f"--timeout {self.timeout} must be positive")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"--max-length {self.max_length} must be at least 2 tokens")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            problems.append("--fewshot-as-multiturn needs --apply-chat-template (few-shot turns are chat turns)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            problems.append(f"--base-url {self.base_url!r} must start with http:// or https://")
        if bool(self.judge_base_url) != bool(self.judge_model):
            problems.append(
                "--judge-base-url and --judge-model go together: the judge's API root and the model it serves"
            )
        if self.judge_base_url and not self.judge_base_url.startswith(("http://", "https://")):
            problems.append(f"--judge-base-url {self.judge_base_url!r} must start with http:// or https://")
        if self.concurrency < 1:
            problems.append(f"--concurrency {self.concurrency} must be at least 1")
        if self.max_retries < 0:
            problems.append(f"--max-retries {self.max_retries} must be 0 or more")
        if self.request_timeout <= 0:
            problems.append(f"--request-timeout {self.request_timeout} must be positive seconds")
        if self.bootstrap_iters < 0:
            problems.append(f"--bootstrap-iters {self.bootstrap_iters} must be 0 (no stderr) or more")
        for path in self.include_path:
            if not path.is_dir():
                problems.append(f"--include-path {path} is not a folder")
        return problems

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["output"] = str(self.output)
        data["include_path"] = [str(p) for p in self.include_path]
        data["deepspeed"] = str(self.deepspeed) if self.deepspeed else None
        data["tasks"] = list(self.tasks)
        return data


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(RunConfig))
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RunConfig)}


def read_config_file(path: Path) -> dict:
    """Keys of a ``--config`` YAML file, checked against RunConfig's fields and their types."""
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: malformed YAML: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    problems = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES:
            problems.append(f"unknown key '{key}'{did_you_mean(name, FIELD_NAMES)}")
        elif not _has_type(value, VALUE_TYPES[name][0]):
            problems.append(f"'{key}' must be {VALUE_TYPES[name][1]}, got {value!r}")
    raise_all(problems, f"--config {path}")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    if isinstance(out.get("include_path"), str):
        out["include_path"] = [out["include_path"]]
    return out


# What a YAML file may give for a field of each type (flags arrive parsed; a file's values are
# checked against these), and how the error names it.
YAML_FORMS: dict[Any, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
    Path: ((str,), "a path"),
    dict: ((dict, str), "a mapping or key=value pairs"),
    Seeds: ((int, str), "an integer or comma-separated integers"),
}


def _yaml_form(hint: Any) -> tuple[tuple[type, ...], str]:
    """The YAML types a RunConfig field of type ``hint`` accepts: None is always allowed, a union
    takes any of its members, a tuple field one value or a list of them."""
    members = [m for m in typing.get_args(hint) if m is not type(None)] if _is_union(hint) else [hint]
    kinds: list[type] = [type(None)] if _is_union(hint) and type(None) in typing.get_args(hint) else []
    words: list[str] = []
    for member in members:
        if typing.get_origin(member) is tuple:
            item_kinds, item_word = _yaml_form(typing.get_args(member)[0])
            kinds += [*item_kinds, list]
            words.append(f"{item_word} or a list of them")
        else:
            member_kinds, word = YAML_FORMS[typing.get_origin(member) or member]
            kinds += member_kinds
            words.append(word)
    return tuple(dict.fromkeys(kinds)), " or ".join(dict.fromkeys(words))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


VALUE_TYPES = {name: _yaml_form(hint) for name, hint in typing.get_type_hints(RunConfig).items()}


def _has_type(value: object, kinds: tuple[type, ...]) -> bool:
    """YAML booleans are Python ints; only a boolean field takes them."""
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


DEEPSPEED_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def deepspeed_settings(path: Path, flags: dict) -> dict:
    """tp and dtype from a DeepSpeed-Inference JSON config; a flag that contradicts it is an error."""
    import json

    if not path.is_file():
        raise UsageError(f"--deepspeed {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--deepspeed {path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    known = {"tensor_parallel", "dtype", "replace_with_kernel_inject"}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise UsageError(f"--deepspeed {path}: unsupported key(s) {unknown}{did_you_mean(unknown[0], known)}")
    if data.get("replace_with_kernel_inject"):
        raise UsageError(f"--deepspeed {path}: replace_with_kernel_inject is not supported; set it to false (AutoTP)")
    out = {"tp_backend": "deepspeed"}
    tp = (data.get("tensor_parallel") or {}).get("tp_size")
    if tp is not None:
        if flags.get("tp") not in (None, tp):
            raise UsageError(f"--tp {flags['tp']} contradicts tensor_parallel.tp_size={tp} in {path}")
        out["tp"] = int(tp)
    if "dtype" in data:
        dtype = DEEPSPEED_DTYPES.get(str(data["dtype"]).removeprefix("torch."))
        if dtype is None:
            raise UsageError(f"--deepspeed {path}: dtype {data['dtype']!r} is not one of {', '.join(DEEPSPEED_DTYPES)}")
        if flags.get("dtype") not in (None, "auto", dtype):
            raise UsageError(f"--dtype {flags['dtype']} contradicts dtype={data['dtype']} in {path}")
        out["dtype"] = dtype
    return out
