"""Document processing for the demo_mc_choices task."""

import datasets

CHOICES = ["yes", "no"]


def _normalise(doc: dict) -> dict:
    answer = doc["answer"].strip().rstrip(".").lower()
    return {"answer": answer, "label": CHOICES.index(answer)}


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Normalise the free-form ``answer`` ("Yes", " no", "YES.") and add an integer ``label``."""
    return dataset.map(_normalise)
