"""Prompt, image and scoring functions of the vlm_demo tasks (lmms-eval's function signatures)."""

from __future__ import annotations

from collections import defaultdict


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def parse_yes_no(text):
    """'yes', 'no' or 'other', read from the start of a reply as MME does."""
    reply = text.lower().strip().replace(".", "")
    if reply in ("yes", "no"):
        return reply
    if len(reply) == 1:
        return {"y": "yes", "n": "no"}.get(reply, "other")
    head = reply[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def process_results(doc, results):
    correct = float(parse_yes_no(results[0]) == doc["answer"])
    return {"acc": correct, "mme_score": {"image_id": doc["image_id"], "score": correct}}


def mme_score(items):
    """MME's score: per image, the accuracy over its two questions plus 100 when both are right
    (0-200), averaged over images."""
    per_image = defaultdict(list)
    for item in items:
        per_image[item["image_id"]].append(item["score"])
    totals = [100.0 * sum(s) / len(s) + 100.0 * all(s) for s in per_image.values()]
    return sum(totals) / len(totals)
