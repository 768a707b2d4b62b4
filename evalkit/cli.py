"""Command line: ``python -m evalkit --model PATH --tasks a,b ...`` under any launcher.

Flags are a stable contract; ``--config FILE`` holds the same options in YAML and flags given
on the command line win over it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evalkit.config import RunConfig, Seeds, deepspeed_settings, read_config_file
from evalkit.errors import USAGE_EXIT_CODE, UsageError, raise_all, say


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, like every other usage error
        raise UsageError(f"{message} (see python -m evalkit --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m evalkit",
        description="Evaluate a language model on lm-evaluation-harness tasks. "
        "Subcommands: 'tasks list', 'tasks validate NAME...', 'plan'.",
        argument_default=None,
    )
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument("--model", help="local model folder (a transformers checkpoint)")
    p.add_argument(
        "--backend",
        help="hf (causal LM), hf-vlm (vision-language model), vllm, openai-completions, openai-chat, "
        "or auto (default: hf or hf-vlm from the model's config)",
    )
    p.add_argument("--tasks", help="comma-separated task names, tags or YAML paths")
    p.add_argument("--include-path", action="append", type=Path, help="extra folder of task YAMLs (repeatable)")
    p.add_argument("--output", type=Path, help="folder for results.json and samples_<task>.jsonl")
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        help="requests per model call (default 1), or auto: a token budget that fits the device",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        help="fill model calls by padded tokens instead of by count (with --batch-size also capping requests)",
    )
    p.add_argument(
        "--no-shared-prefix",
        dest="shared_prefix",
        action="store_false",
        default=None,
        help="score each loglikelihood request in its own row instead of once per shared context "
        "(--backend vllm: turn off vLLM's prefix cache)",
    )
    p.add_argument(
        "--vllm-prefix-cache",
        action="store_true",
        default=None,
        help="vllm: loglikelihood prompts reuse vLLM's cached prefixes (few-shot tasks: several times faster; "
        "values move by float rounding, about 1e-6, and then depend on which prompts ran before)",
    )
    p.add_argument("--limit", type=float, help="first N docs per task, or a fraction in (0, 1)")
    p.add_argument("--num-fewshot", type=int, help="override every task's num_fewshot")
    p.add_argument("--seed", help="one seed for everything, or python,numpy,torch,fewshot (default 0,1234,1234,1234)")
    p.add_argument("--dtype", help="auto, float32, float16 or bfloat16 (default auto)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is present)")
    p.add_argument("--tp", type=int, help="tensor-parallel size; must divide the process count (default 1)")
    p.add_argument("--tp-backend", help="deepspeed (AutoTP, default) or transformers (tp_plan='auto')")
    p.add_argument("--deepspeed", type=Path, help="DeepSpeed-Inference JSON config (tensor_parallel.tp_size, dtype)")
    p.add_argument("--gpus-per-rank", type=int, help="split each rank's model over its own K GPUs (device_map)")
    p.add_argument("--gpu-mem", type=float, help="GiB per GPU to check the layout against (default: the device's)")
    p.add_argument("--timeout", type=float, help="seconds any collective may wait before the run fails (default 1800)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run saved in --output")
    p.add_argument(
        "--stall-timeout", type=float, help="end the run when a rank finishes nothing for this long (default 300 s)"
    )
    p.add_argument("--flush-interval", type=float, help="seconds between forced writes of saved results (default 5)")
    p.add_argument(
        "--on-error", help="fail (default): a failing request ends the run; record: save the error, skip the doc"
    )
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="allow the model's own Python code")
    p.add_argument("--max-length", type=int, help="the model's context in tokens (lm-eval's max_length model argument)")
    p.add_argument(
        "--apply-chat-template", action="store_true", default=None, help="wrap prompts in the tokenizer's chat template"
    )
    p.add_argument(
        "--fewshot-as-multiturn",
        nargs="?",
        const="true",
        type=_boolean,
        help="few-shot examples as chat turns (default: on with --apply-chat-template)",
    )
    p.add_argument("--system-instruction", help="a system message put before every prompt")
    p.add_argument(
        "--gen-kwargs", help="generation settings for generate_until tasks, e.g. temperature=0,max_gen_toks=64"
    )
    p.add_argument(
        "--think-end-token",
        metavar="TEXT",
        help="reasoning models: a generation's answer is the text after the last TEXT (e.g. </think>), "
        "as lm-eval's think_end_token",
    )
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        default=None,
        help="allow tasks that execute model-generated code (in a sandboxed subprocess)",
    )
    p.add_argument("--bootstrap-iters", type=int, help="bootstrap resamples for standard errors (default 100000)")
    served = p.add_argument_group(
        "a model behind an OpenAI-compatible server (--backend openai-completions|openai-chat)"
    )
    served.add_argument("--base-url", help="the server's API root, e.g. http://localhost:8000/v1")
    served.add_argument(
        "--api-key-env", help="environment variable that holds the API key (default OPENAI_API_KEY); never logged"
    )
    served.add_argument("--tokenizer", help="local tokenizer folder (default: --model when it is a folder)")
    served.add_argument("--concurrency", type=int, help="requests in flight per process (default 8)")
    served.add_argument("--max-retries", type=int, help="retries per request on 429/5xx/timeouts (default 5)")
    served.add_argument("--request-timeout", type=float, help="seconds one request may take (default 600)")
    judge = p.add_argument_group(
        "an LLM judge, for tasks that score through one (lmms-eval's mmvet, llava_in_the_wild, mathvista, ...); "
        "--concurrency, --max-retries and --request-timeout apply to it too"
    )
    judge.add_argument(
        "--judge-base-url", help="the judge's OpenAI-compatible API root, e.g. https://api.openai.com/v1"
    )
    judge.add_argument("--judge-model", help="the model the judge serves, e.g. gpt-4o-2024-11-20")
    judge.add_argument(
        "--judge-api-key-env",
        help="environment variable that holds the judge's API key (default OPENAI_API_KEY); never logged",
    )
    return p


def _batch_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def parse_gen_kwargs(value: str | dict) -> dict:
    """lm-eval's ``key=value,key=value`` form (numbers and booleans typed as lm-eval types them)."""
    if isinstance(value, dict):
        return dict(value)
    from lm_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(value)
    except (ValueError, IndexError) as exc:
        raise UsageError(f"--gen-kwargs {value!r}: expected key=value pairs separated by commas ({exc})") from None


def parse_config(argv: list[str] | None = None) -> RunConfig:
    args = vars(build_parser().parse_args(argv))
    file_values = read_config_file(args.pop("config")) if args.get("config") else {}
    values = {**file_values, **{k: v for k, v in args.items() if v is not None}}
    missing = [f"--{name}" for name in ("model", "tasks", "output") if not values.get(name)]
    if missing:
        raise UsageError(f"missing required option(s): {', '.join(missing)}")
    if "seed" in values:
        values["seed"] = Seeds.parse(values["seed"])
    tasks = values["tasks"]
    values["tasks"] = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip())
    values["include_path"] = tuple(Path(p) for p in values.get("include_path", ()))
    values["output"] = Path(values["output"])
    values["model"] = str(values["model"])
    if values.get("gen_kwargs") is not None:
        values["gen_kwargs"] = parse_gen_kwargs(values["gen_kwargs"]) or None
    if values.get("deepspeed"):
        values["deepspeed"] = Path(values["deepspeed"])
        values.update(deepspeed_settings(values["deepspeed"], values))
    from evalkit.models import registry

    try:
        config = RunConfig(**values)
    except TypeError as exc:
        raise UsageError(f"bad option: {exc}") from None
    raise_all(config.problems() + registry.config_problems(config), "bad arguments")
    return config


def entry_point() -> None:
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    from evalkit.runner import run_guarded

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["plan"]:
            from evalkit.planner import main as plan_main

            return plan_main(argv[1:])
        if argv[:1] == ["tasks"]:
            from evalkit.tasks.commands import main as tasks_main

            return tasks_main(argv[1:])
        config = parse_config(argv)
    except UsageError as exc:
        say(f"evalkit: error: {exc}")
        return USAGE_EXIT_CODE
    return run_guarded(config)
