"""Rank 0's scoring through lm-eval, in-process with made-up model outputs (no model, no ranks)."""

from __future__ import annotations

import json
import statistics

from evalkit.tasks.library import TaskLibrary
from evalkit.tasks.requests import PromptOptions, build_plans, number_requests
from evalkit.tasks.scoring import RequestError, score

VALUES = [9.0, 1.0, 7.0, 3.0, 5.0, 8.0, 2.0]


def median_task(folder) -> None:
    """A generate_until task whose per-doc metric is the number the model answered, aggregated by median."""
    (folder / "data.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": "0"}) + "\n" for i in range(len(VALUES))))
    (folder / "utils.py").write_text(
        "def answer(references, predictions, **kwargs):\n    return float(predictions[0])\n"
    )
    (folder / "median_task.yaml").write_text(
        "task: median_task\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
        "output_type: generate_until\n"
        "test_split: test\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_target: "{{a}}"\n'
        "metric_list:\n  - metric: !function utils.answer\n    aggregation: median\n    higher_is_better: true\n"
    )


def test_median_aggregation_sorts_the_values(tmp_path):
    """The old scorer took the middle of the values in doc order (7.0 here); the median is 5.0."""
    median_task(tmp_path)
    loaded = TaskLibrary([tmp_path]).load_checked(["median_task"])
    plans = build_plans(loaded["tasks"], PromptOptions())
    requests = number_requests(plans)
    outputs = [str(VALUES[r.doc_id]) for r in requests]
    scored = score(plans, {}, outputs, bootstrap_iters=0)
    assert scored.results["results"]["median_task"]["answer,none"] == statistics.median(VALUES) == 5.0
    assert VALUES[len(VALUES) // 2] != 5.0


def test_failed_requests_leave_their_docs_out(tmp_path):
    median_task(tmp_path)
    loaded = TaskLibrary([tmp_path]).load_checked(["median_task"])
    plans = build_plans(loaded["tasks"], PromptOptions())
    requests = number_requests(plans)
    outputs = [RequestError("boom") if r.doc_id == 0 else str(VALUES[r.doc_id]) for r in requests]
    scored = score(plans, {}, outputs, bootstrap_iters=0)
    assert scored.failed == {"median_task": 1}
    scored_values = sorted(VALUES[1:])  # lm-eval's median of an even count is the upper middle value
    assert scored.results["results"]["median_task"]["answer,none"] == scored_values[len(scored_values) // 2]
    rows = scored.samples["median_task"]
    assert [r["doc_id"] for r in rows if "error" in r] == [0]
    assert scored.results["n-samples"]["median_task"] == {"original": len(VALUES), "effective": len(VALUES) - 1}


def test_think_end_token_keeps_what_follows_the_reasoning(tmp_path):
    """lm-eval's think_end_token: the answer is the text after the last marker, whitespace dropped."""
    median_task(tmp_path)
    loaded = TaskLibrary([tmp_path]).load_checked(["median_task"])
    plans = build_plans(loaded["tasks"], PromptOptions())
    requests = number_requests(plans)
    outputs = [f"<think>{99 - i} or</think>{i}?</think> {VALUES[r.doc_id]}" for i, r in enumerate(requests)]
    outputs[0] = str(VALUES[requests[0].doc_id])  # no reasoning: kept whole
    scored = score(plans, {}, outputs, bootstrap_iters=0, think_end_token="</think>")
    assert scored.results["results"]["median_task"]["answer,none"] == 5.0
    rows = {r["doc_id"]: r for r in scored.samples["median_task"]}
    assert rows[requests[1].doc_id]["resps"] == [[str(VALUES[requests[1].doc_id])]]
