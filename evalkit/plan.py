"""Plan: rank 0 builds every request of the run with lm-eval, in global order, names each by its
content, finds those an earlier run saved, and deals the rest to the dp ranks by cost.

Requests are built once, as lm-eval builds them on one process, so a doc's prompt never depends
on the number of ranks. Saved results are keyed by what produced them (model, task configuration,
request), so a run resumed on any number of processes finds every result it already has.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evalkit.config import RunConfig
from evalkit.errors import UsageError
from evalkit.identity import model_fingerprint, request_key, served_fingerprint, task_config_hash
from evalkit.judge import PLACEHOLDER_KEY, task_environment
from evalkit.models.packing import share_keys
from evalkit.outdir import check_folder
from evalkit.preflight import Inputs
from evalkit.sharding import shard_indices
from evalkit.shards import read_all
from evalkit.tasks.judged import aim_clients
from evalkit.tasks.library import TaskLibrary
from evalkit.tasks.requests import PromptOptions, Request, TaskPlan, build_plans, number_requests


@dataclass
class RunPlan:
    """Everything rank 0 knows about the run: lm-eval's tasks and groups, and every request."""

    model_path: str
    tasks: list[TaskPlan]
    groups: dict[str, Any]
    requests: list[Request]
    model: dict[str, Any]
    task_hashes: dict[str, str]
    done: set[int]

    @functools.cached_property
    def index_of(self) -> dict[str, int]:
        """Global index of each request, by its content key (how saved results are found)."""
        return {r.key: r.index for r in self.requests}

    @property
    def multi_round(self) -> bool:
        """Some task asks for more rounds after the first (``evalkit.rounds``)."""
        return any(getattr(p.task, "multi_round", False) for p in self.tasks)

    def add(self, requests: list[Request], output: Path) -> list[Request]:
        """Append later requests (numbered from the end of the plan, keyed by their content); those
        an earlier run saved join ``done``. Returns the ones still to compute."""
        keyed = [
            replace(r, key=request_key(self.model["hash"], self.task_hashes[r.task], r), index=len(self.requests) + i)
            for i, r in enumerate(requests)
        ]
        self.requests.extend(keyed)
        self.__dict__.pop("index_of", None)
        saved = finished_indices(output, {r.key: r.index for r in keyed})
        self.done |= saved
        return [r for r in keyed if r.index not in saved]


@dataclass(frozen=True)
class Work:
    """What one rank is handed: its share of the pending requests, and facts about the whole run."""

    requests: list[Request]
    pending: int
    launch: str  # names this launch's shard files
    kinds: frozenset[str]  # request kinds of the whole run (a backend checks at load that it can serve them)
    rounds: bool = False  # more rounds of multi-round docs may follow this work (``evalkit.rounds``)


def load_tasks(config: RunConfig, model_path: str, judge_url: str | None = None) -> dict[str, Any]:
    """lm-eval's task objects (and ``"groups"``) for --tasks, loaded the same way on every rank;
    judge task code reads its judge's address (rank 0's proxy at ``judge_url``) as it is imported."""
    from evalkit.compat import install_compat

    install_compat()
    library = TaskLibrary(config.include_path, metadata=config.task_metadata(model_path))
    for line in library.notices(config.tasks):  # information, so on stdout: stderr is for what went wrong
        print(f"evalkit: {line}", flush=True)
    with task_environment(judge_url, config.judge_model):
        loaded = library.load_checked(list(config.tasks))
    if judge_url is not None:  # task code that built a client with an address of its own asks the proxy
        aim_clients(loaded["tasks"], judge_url, PLACEHOLDER_KEY)
    return loaded


def prompt_options(config: RunConfig) -> PromptOptions:
    return PromptOptions(
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        fewshot_seed=config.seed.fewshot,
        gen_kwargs=config.gen_kwargs,
        apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.multiturn,
        system_instruction=config.system_instruction,
    )


def chat_template(config: RunConfig, model_path: str) -> Callable[..., str] | None:
    """The tokenizer's chat template as lm-eval's HF model applies it, when asked for."""
    if not config.apply_chat_template:
        return None
    import transformers

    folder = config.tokenizer or model_path
    if not Path(folder).is_dir():
        raise UsageError(
            f"--apply-chat-template renders prompts with a local tokenizer; pass --tokenizer DIR for {folder}"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"--apply-chat-template: the tokenizer in {folder} has no chat template")

    def apply(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(
            history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    return apply


def build_requests(config: RunConfig, model_path: str, tasks: dict[str, Any]) -> tuple[list[TaskPlan], list[Request]]:
    """Every prompt and request of the run, numbered in global order."""
    plans = build_plans(tasks, prompt_options(config), chat_template(config, model_path))
    return plans, number_requests(plans)


def identify(
    config: RunConfig, inputs: Inputs, tasks: list[TaskPlan], groups: dict[str, Any], requests: list[Request]
) -> RunPlan:
    """The plan with each request named by its content, and the indices earlier runs finished.

    The output folder is checked here: it must be empty, or (with --resume) hold this model's
    and these task configurations' results.
    """
    backend = inputs.spec.name
    if inputs.spec.served:
        model = served_fingerprint(inputs.model, backend, config.tokenizer)
    else:
        model = model_fingerprint(inputs.model, config.dtype, backend, keyed_by_backend=inputs.spec.keyed_by_backend)
    settings = {
        "seed": config.seed.fewshot,
        "chat_template": config.apply_chat_template,
        "multiturn": config.multiturn,
        "system_instruction": config.system_instruction,
        "gen_kwargs": config.gen_kwargs,
        "backend": backend,
    }
    task_hashes = {p.name: task_config_hash(p, settings) for p in tasks}
    check_folder(config.output, resume=config.resume, model=model, tasks=task_hashes)
    keyed = [replace(r, key=request_key(model["hash"], task_hashes[r.task], r)) for r in requests]
    plan = RunPlan(inputs.model, tasks, groups, keyed, model, task_hashes, done=set())
    plan.done = finished_indices(config.output, plan.index_of)
    if inputs.spec.packs_contexts(config):
        plan.done = whole_groups(keyed, plan.done)
    return plan


def finished_indices(output: Path, index_of: dict[str, int]) -> set[int]:
    """Global indices of requests whose results earlier runs saved (read by rank 0 only)."""
    return {index_of[r["k"]] for r in read_all(output) if r.get("k") in index_of and "r" in r}


def sharing_units(requests: list[Request]) -> list[list[Request]]:
    """The requests in the units a packing backend scores together (``packing.share_keys``: a doc's
    choices, docs whose prompts begin alike), each other request alone; in order of first request."""
    scored = [r for r in requests if r.kind == "loglikelihood"]
    key_of = dict(zip((r.index for r in scored), share_keys([r.args[0] for r in scored]), strict=True))
    units: dict[Any, list[Request]] = {}
    for request in requests:
        key = key_of.get(request.index)
        units.setdefault(("request", request.index) if key is None else ("shared", key), []).append(request)
    return list(units.values())


def whole_groups(requests: list[Request], done: set[int]) -> set[int]:
    """``done`` less every request of a sharing unit that is not all done: a resume computes such a
    unit whole again, as an uninterrupted run did, so its values stay bit-identical."""
    broken = {r.index for unit in sharing_units(requests) if not done.issuperset(r.index for r in unit) for r in unit}
    return done - broken


def deal(plan: RunPlan, dp: int, launch: str) -> list[Work]:
    """Each dp rank's share of the pending requests, balanced by cost. A sharing unit (a doc's
    choices, docs whose prompts begin alike) goes to one rank whole, where it shares rows."""
    pending = [r for r in plan.requests if r.index not in plan.done]
    return deal_pending(pending, dp, launch, rounds=plan.multi_round)


def deal_pending(pending: list[Request], dp: int, launch: str, *, rounds: bool) -> list[Work]:
    grouped = sharing_units(pending)
    costs = [unit_cost(unit) for unit in grouped]
    kinds = frozenset(r.kind for r in pending)
    shares = []
    for rank in range(dp):
        share = sorted((r for i in shard_indices(costs, rank, dp) for r in grouped[i]), key=lambda r: r.index)
        shares.append(Work(requests=share, pending=len(pending), launch=launch, kinds=kinds, rounds=rounds))
    return shares


def unit_cost(requests: list[Request]) -> int:
    """The work left after sharing: the contexts' common beginning once, each distinct context's
    rest once, every continuation (never less than the unit's costliest request)."""
    if len(requests) == 1:
        return requests[0].cost
    contexts = sorted({r.args[0].rstrip() for r in requests})
    common = len(os.path.commonprefix([contexts[0], contexts[-1]]))
    shared = common + sum(len(c) - common for c in contexts) + sum(len(r.args[1]) for r in requests)
    return max(shared, max(r.cost for r in requests))
