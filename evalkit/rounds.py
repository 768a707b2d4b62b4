"""Later rounds of multi-round docs (lmms-eval's ``generate_until_multi_round`` and
``generate_until_agentic``), in waves.

A multi-round doc's first round is an ordinary generation request of the plan. After each wave of
model calls rank 0 reads back the answers, asks the task for each unfinished doc's next round given
its answers so far (``LmmsTask.next_round``: lmms-eval's ``doc_to_text(doc, previous_output=...,
round_idx=..., previous_round_info=...)``) and deals those requests as the next wave; a doc is done
when its task says so. Every round is a fresh prompt with that round's visuals, as lmms-eval's
qwen2_vl, qwen2_5_vl and llava_onevision classes run them (no earlier turns in the prompt).

A round is a request named by its content like any other (its text, its visuals' digests, its round
number), so a resumed run finds the rounds an earlier run answered, at any process count. The rank
that evaluates a later round reads its visuals from its own copy of the task, asking the task for
that round with the same earlier answers (``RoundRef``). For scoring, a doc's output is its rounds'
answers in order, one list: what lmms-eval's task code indexes round by round.

An agentic doc (lmms-eval's evaluator's agent loop) runs the same way, with that loop's rules: the
task sees the outputs it kept (it may rewrite them), a step without a new prompt or visuals repeats
the last ones, the doc ends when the task says so or after ``max_agentic_steps`` generations, and
its answer is its last output (or lmms-eval's JSON account of the state it reached).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalkit.errors import UsageError
from evalkit.merge import merge_results
from evalkit.plan import RunPlan, Work, deal_pending
from evalkit.tasks.images import RoundRef, Visuals, as_visuals, digests
from evalkit.tasks.requests import Request, TaskPlan
from evalkit.tasks.scoring import RequestError


@dataclass
class Chain:
    """One multi-round doc: the global indices of its rounds' requests so far; for an agentic doc
    also the outputs its task keeps (it may rewrite them) and, once done, its answer."""

    plan: TaskPlan
    instance: Any  # lm-eval's instance (its doc, and the first round's arguments)
    indices: list[int]
    info: Any = None
    done: bool = False
    outputs: list[str] = field(default_factory=list)
    answer: str | None = None


@dataclass
class Rounds:
    """Rank 0's multi-round docs and their rounds so far."""

    plan: RunPlan
    output: Path
    chains: list[Chain] = field(default_factory=list)

    @classmethod
    def of(cls, plan: RunPlan, output: Path) -> Rounds:
        chains = []
        for task_plan in plan.tasks:
            if not getattr(task_plan.task, "multi_round", False):
                continue
            for instance, indices in zip(task_plan.task.instances, task_plan.instance_requests, strict=True):
                if len(indices) != 1:
                    raise UsageError(f"task '{task_plan.name}': a multi-round task runs each doc once (repeats: 1)")
                chains.append(Chain(task_plan, instance, list(indices)))
        return cls(plan, output, chains)

    def next_wave(self, outputs: list[Any]) -> list[Request]:
        """Every unfinished doc's next round, added to the plan; the ones no earlier run answered."""
        later = []
        for chain in self.chains:
            if chain.done:
                continue
            answers = [outputs[i] for i in chain.indices]
            if any(a is None or isinstance(a, RequestError) for a in answers):
                chain.done = True  # a failed round fails the doc (recorded, never scored)
                continue
            request = self._next(chain, answers)
            if request is None:
                chain.done = True
            else:
                later.append((chain, request))
        pending = self.plan.add([r for _, r in later], self.output)
        for (chain, _), added in zip(later, self.plan.requests[len(self.plan.requests) - len(later) :], strict=True):
            chain.indices.append(added.index)
        return pending

    def _next(self, chain: Chain, answers: list[str]) -> Request | None:
        first, last = self.plan.requests[chain.indices[0]], self.plan.requests[chain.indices[-1]]
        number = len(chain.indices)
        name = chain.plan.name
        task = chain.plan.task
        if task.agentic:  # lmms-eval's agent loop hands the task the outputs it kept, and the newest
            chain.outputs.append(answers[-1])
        previous = list(chain.outputs) if task.agentic else answers
        given = copy.deepcopy(chain.info)  # what the evaluating rank passes to get the same visuals
        try:
            step = task.next_round(chain.instance.doc, number, previous, chain.info)
            found = digests(as_visuals(step.visuals)) if step.visuals else ()
        except (OSError, ValueError, TypeError, KeyError, AssertionError) as exc:
            raise UsageError(f"task '{name}' doc {first.doc_id} round {number}: {exc}") from None
        chain.info = step.info
        if task.agentic:
            final = answers[-1]
            if step.outputs is not None:
                chain.outputs = list(step.outputs)
                final = chain.outputs[-1] if chain.outputs else final
            if step.terminal or number >= task.max_steps:
                chain.answer = task.agentic_answer(final, chain.info, chain.outputs)
                return None
        elif step.terminal:
            return None
        if step.visuals is None and task.agentic:  # the step keeps the visuals it had
            visuals = last.visuals
        else:
            visuals = Visuals(name, first.doc_id, found, RoundRef(number, tuple(previous), given)) if found else None
        context = step.context if step.context is not None or not task.agentic else last.args[0]
        return Request(
            index=-1,
            task=name,
            doc_id=first.doc_id,
            instance=first.instance,
            repeat=0,
            kind="generate_until",
            args=(context, first.args[1]),
            visuals=visuals,
            round=number,
        )

    def wave(self, launch: str, dp: int) -> list[Work]:
        """Rank 0, after every rank's answers of the last wave are on disk: the next wave, dealt.
        ``rounds`` stays set while a doc may still need another round."""
        outputs = merge_results(self.output, self.plan, launch, written=None)
        pending = self.next_wave(outputs)
        return deal_pending(pending, dp, launch, rounds=not all(c.done for c in self.chains))

    def fold(self, outputs: list[Any]) -> list[Any]:
        """The outputs with each multi-round doc's first request holding all its answers (an agentic
        doc's: its answer), or the first failed round's error."""
        folded = list(outputs)
        for chain in self.chains:
            answers = [outputs[i] for i in chain.indices]
            failed = next((a for a in answers if isinstance(a, RequestError)), None)
            kept = chain.answer if chain.plan.task.agentic else answers
            folded[chain.indices[0]] = failed if failed is not None else kept
        return folded
