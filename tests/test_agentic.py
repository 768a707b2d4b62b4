"""lmms-eval's agentic tasks (``generate_until_agentic``: tau2_bench_telecom, vending_bench2), unchanged
and by name, against lmms-eval 0.7.3's own agent loop.

A scripted agent answers each prompt from its text alone: evalkit asks it through the OpenAI stub
(``--backend openai-completions``), lmms-eval's loop (``evaluator._run_generate_until_agentic``)
calls it as its model. Both then see the same prompts, so the same answers, and each doc's final
answer, per-sample metrics and the aggregates must be equal. The agent solves tau2's telecom tasks
by tool calls and a submit (the loop ends when the task says so) and never acts in vending_bench2
(the loop runs out of steps and answers with lmms-eval's JSON account of the state).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, StubBehaviour

from conftest import TINY_MODEL, run_evalkit

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by make install")

TASKS = ("tau2_bench_telecom", "vending_bench2")


def agent(prompt: str) -> str:
    """One step of a scripted agent, from the prompt alone."""
    if "Target state is already satisfied" in prompt:
        return '<submit>{"final":"mobile data works now"}</submit>'
    if "agentic telecom support loop" in prompt:
        state = json.loads(prompt.split("Current state: ", 1)[1].split("\n", 1)[0])
        if state["airplane_mode"]:
            name = "disable_airplane_mode"
        elif not state["roaming_enabled"]:
            name = "enable_roaming"
        else:
            name = "reset_network"
        return f'<tool_call>{{"name":"{name}","arguments":{{}}}}</tool_call>'
    return "I will wait and see."


class ScriptedModel:
    """What lmms-eval's agent loop asks of a model (a simple model class): ``generate_until``."""

    is_simple = True

    def __init__(self, task_dict: dict) -> None:
        self.task_dict = task_dict

    def generate_until(self, requests: list) -> list[str]:
        return [agent(request.args[0]) for request in requests]


def lmms_eval_reference(task_name: str) -> tuple[list[dict], dict]:
    """Per doc (answer, metrics) and the aggregates, from lmms-eval's own task and agent loop."""
    import lmms_eval
    from lmms_eval.evaluator import _run_generate_until_agentic
    from lmms_eval.tasks import TaskManager, get_task_dict

    here = os.getcwd()
    os.chdir(Path(lmms_eval.__file__).parents[1])  # the tasks name their data from there
    try:
        task = get_task_dict([task_name], TaskManager())[task_name]
        task.build_all_requests(limit=None, rank=0, world_size=1)
    finally:
        os.chdir(here)
    model = ScriptedModel({task_name: task.dataset})
    docs, values = [], {}
    for instance in sorted(task.instances, key=lambda i: i.doc_id):
        answer = _run_generate_until_agentic(model, [instance])[0]
        metrics = task.process_results(task.dataset[task.config.test_split][instance.doc_id], [answer])
        docs.append({"answer": answer, "metrics": metrics})
        for name, value in metrics.items():
            values.setdefault(name, []).append(value)
    aggregates = {name: task.aggregation()[name](found) for name, found in values.items()}
    return docs, aggregates


def test_agentic_tasks_give_lmms_evals_own_answers_and_scores(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)

    def served_agent(prompt) -> str:
        """The agent behind the stub: evalkit's completions backend sends the prompt's token ids,
        as lm-eval's does."""
        return agent(tokenizer.decode(prompt) if isinstance(prompt, list) else prompt)

    with OpenAIStub(StubBehaviour(completion_reply=served_agent)) as stub:
        run = run_evalkit(
            ["--model", "stub-model", "--tokenizer", str(TINY_MODEL), "--backend", "openai-completions"]
            + ["--base-url", stub.base_url, "--max-length", "4096", "--tasks", ",".join(f"lmms:{t}" for t in TASKS)],
            output=tmp_path / "out",
            cwd=tmp_path,
        )
        asked = len(stub.behaviour.bodies)
    assert run.returncode == 0, run.stderr[-3000:]
    results = run.results()
    steps = 0
    for task in TASKS:
        docs, aggregates = lmms_eval_reference(task)
        rows = [json.loads(line) for line in (tmp_path / "out" / f"samples_{task}.jsonl").read_text().splitlines()]
        rows.sort(key=lambda row: row["doc_id"])
        assert len(rows) == len(docs) == 2, task
        for row, doc in zip(rows, docs, strict=True):
            assert row["filtered_resps"] == [doc["answer"]], (task, row["doc_id"])
            assert {name: row[name] for name in doc["metrics"]} == doc["metrics"], (task, row["doc_id"])
            steps += len(json.loads(doc["answer"])["trace"])
        scores = results["results"][task].items()
        got = {k.removesuffix(",none"): v for k, v in scores if k.endswith(",none") and "_stderr" not in k}
        assert got == pytest.approx(aggregates), task
    # every generation was asked once: tau2's docs until their submit, vending's for all 10 steps
    assert asked == steps
    tau2 = [json.loads(row) for row in rows_of(tmp_path, "tau2_bench_telecom")]
    assert all(answer["success"] and "submit" in answer for answer in tau2)
    vending = [json.loads(row) for row in rows_of(tmp_path, "vending_bench2")]
    assert all(answer["error"] == "max_agentic_steps_reached" and len(answer["trace"]) == 10 for answer in vending)


def rows_of(tmp_path: Path, task: str) -> list[str]:
    rows = [json.loads(line) for line in (tmp_path / "out" / f"samples_{task}.jsonl").read_text().splitlines()]
    return [row["filtered_resps"][0] for row in sorted(rows, key=lambda row: row["doc_id"])]
