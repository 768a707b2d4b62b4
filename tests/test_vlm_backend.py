"""The hf-vlm backend on a tiny model of each family: answers independent of batch size and
request order, images decoded only when their requests come up, and a reproducible builder."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from evalkit.models import vlm_prompts
from evalkit.models.hf_vlm import LOOKAHEAD_BATCHES, HFVisionLM, collate
from evalkit.models.protocol import GenerationInput, ImageInput
from evalkit.models.vllm_engine import VLLMBackend
from evalkit.models.vlm_prompts import ChatPrompts, load_processor, to_messages
from evalkit.testing.tinyvlm import FAMILIES, build_tiny_vlm

GREEDY = {"until": ["\n\n"], "max_gen_toks": 12}
# (width, height), colour, shape: sizes differ so dynamic-resolution families get different token counts.
PICTURES = [
    ((32, 32), "red", "circle"),
    ((64, 40), "blue", "square"),
    ((48, 48), "green", "circle"),
    ((40, 80), "yellow", "square"),
    ((80, 32), "purple", "circle"),
    ((48, 48), "black", "circle"),
]


def picture(index: int) -> Image.Image:
    (w, h), colour, shape = PICTURES[index]
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    box = [w // 5, h // 4, 4 * w // 5, 3 * h // 4]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return image


class Loads:
    """Counts every ``ImageInput.load`` call, so tests see when images were decoded."""

    def __init__(self) -> None:
        self.count = 0

    def images(self, *indices: int) -> ImageInput:
        def load() -> list[Image.Image]:
            self.count += 1
            return [picture(i) for i in indices]

        return ImageInput(digests=tuple(str(i) for i in indices), load=load)


def requests(loads: Loads, stop: str | None = None) -> list[GenerationInput]:
    """Prompts of different lengths; one with two images, one chat, one text-only; the last one
    with ``stop`` as an extra stop sequence."""
    chat = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in one sentence."}],
        }
    ]
    last = {"until": ["\n\n", stop] if stop else ["\n\n"], "max_gen_toks": 12}
    return [
        GenerationInput("What colour is the shape?", GREEDY, loads.images(0)),
        GenerationInput("What colour is the shape?", GREEDY, loads.images(5)),
        GenerationInput("<image>\nHow many shapes are in the image? Answer with one word.", GREEDY, loads.images(1)),
        GenerationInput("Compare <image> and <image>. Which one is bigger?", GREEDY, loads.images(3, 4)),
        GenerationInput(chat, GREEDY, loads.images(2)),
        GenerationInput("There are two blue squares on the left. Where is the star?", GREEDY, loads.images(2)),
        GenerationInput("How many circles are there?", GREEDY, None),
        GenerationInput("Where is the circle? Answer with one word.", last, loads.images(4)),
    ]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    path = build_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param))
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return request.param, path, model


def generate(tiny, batch_size: int, items: list[GenerationInput], order: list[int] | None = None) -> list[str]:
    _, path, model = tiny
    order = list(range(len(items))) if order is None else order
    backend = HFVisionLM(str(path), model=model, device=torch.device("cpu"), batch=batch_size)
    answers = backend.generate_until([items[i] for i in order], progress=lambda finished: None)
    out = [""] * len(items)
    for position, i in enumerate(order):
        out[i] = answers[position]
    return out


def test_answers_do_not_depend_on_batch_size_or_order(tiny):
    loads = Loads()
    # The last request again without its extra stop sequence, to pick a stop that really fires.
    uncut = generate(tiny, 1, requests(loads))[-1]
    # An ASCII character: a truncated decode can end in a replacement character, never in one.
    stop = next(c for c in uncut[1:] if c.isascii() and c.isalnum())
    items = requests(loads, stop=stop)

    alone = generate(tiny, 1, items)
    assert generate(tiny, 4, items) == alone
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    assert generate(tiny, 4, order=order, items=items) == alone
    assert generate(tiny, 3, order=order[::-1], items=items) == alone

    assert len(set(alone)) >= len(alone) // 2, alone
    assert alone[-1] == uncut.split(stop)[0] and len(alone[-1]) < len(uncut)


def test_requests_of_one_width_share_a_batch(tiny):
    _, _, model = tiny
    widths = []
    original = model.generate

    def recording(**inputs):
        widths.append(tuple(inputs["input_ids"].shape))
        return original(**inputs)

    loads = Loads()
    same = [GenerationInput("What colour is the shape?", GREEDY, loads.images(i)) for i in (0, 5, 0, 5)]
    model.generate = recording
    try:
        answers = generate(tiny, 4, same)
    finally:
        del model.generate
    # Images 0 and 5 differ in size only for dynamic-resolution families; equal shapes batch together.
    assert max(rows for rows, _ in widths) >= 2, widths
    assert answers[0] == answers[2] and answers[1] == answers[3]


def test_images_are_decoded_once_and_only_when_their_batch_comes(tiny):
    _, path, model = tiny
    loads = Loads()
    items = requests(loads)
    with_images = sum(1 for r in items if r.images is not None)
    seen = []
    backend = HFVisionLM(str(path), model=model, device=torch.device("cpu"), batch=1)
    backend.generate_until(items, progress=lambda finished: seen.append((len(finished), loads.count)))
    assert loads.count == with_images
    assert sum(n for n, _ in seen) == len(items)
    assert seen[0][1] <= LOOKAHEAD_BATCHES < with_images


def test_backend_facts(tiny):
    family, path, model = tiny
    backend = HFVisionLM(str(path), model=model, device=torch.device("cpu"), batch=2)
    assert backend.name == "hf-vlm"
    assert backend.describe()["family"] == model.config.model_type
    assert backend.tokenizer.padding_side == "left" and backend.tokenizer.pad_token_id is not None
    with pytest.raises(NotImplementedError, match="generate_until"):
        backend.loglikelihood([("a", "b")], progress=lambda finished: None)
    with pytest.raises(NotImplementedError, match="generate_until"):
        backend.loglikelihood_rolling(["a"], progress=lambda finished: None)
    assert type(load_processor(str(path))).__name__ == type(backend.processor).__name__


def test_a_checkpoint_without_video_settings_loads_for_images_where_torchvision_is_installed(tiny, monkeypatch):
    """With torchvision installed, transformers refuses a processor whose checkpoint holds no video
    processor's settings (as the tiny models' do; seen on a CUDA machine); its images still evaluate."""
    _, path, _ = tiny
    expected = type(load_processor(str(path))).__name__
    monkeypatch.setattr(vlm_prompts, "is_torchvision_available", lambda: True)
    assert type(load_processor(str(path))).__name__ == expected


def test_builder_is_reproducible(tiny, tmp_path):
    family, path, _ = tiny
    again = build_tiny_vlm(family, tmp_path / "again")
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (path / name).read_bytes(), name
    other = build_tiny_vlm(family, tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (path / "model.safetensors").read_bytes()


def test_image_markers_become_image_parts():
    assert to_messages("Look: <image>\nWhat is it?", ("image",)) == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "What is it?"}],
        }
    ]
    assert to_messages("What is it?", ("image", "image"))[0]["content"] == [
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "What is it?"},
    ]
    with pytest.raises(ValueError, match="2 <image> markers for 1 images"):
        to_messages("<image> and <image>", ("image",))
    with pytest.raises(ValueError, match="0 image parts for 1 images"):
        to_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], ("image",))


def test_collate_left_pads_tokens_and_stacks_images():
    first = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    second = {
        "input_ids": torch.tensor([[7, 8, 9]]),
        "attention_mask": torch.ones(1, 3, dtype=torch.long),
        "pixel_values": torch.ones(1, 2, 3),
    }
    third = {**second, "pixel_values": torch.ones(1, 3, 3)}
    batch = collate([first, second, third], width=4, pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6], [0, 7, 8, 9], [0, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert batch["pixel_values"].shape == (2, 3, 3) and batch["pixel_values"][0, 2].sum() == 0


class RecordingEngine:
    """Stands in for a vLLM engine: keeps the prompts it is given and answers each with fixed tokens."""

    def __init__(self, answer: list[int]) -> None:
        self.prompts: list[dict] = []
        self.answer = answer

    def generate(self, prompts, params, use_tqdm=False):
        self.prompts += prompts
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=self.answer)]) for _ in prompts]


def test_vllm_backend_sends_the_chat_prompt_with_one_placeholder_per_image(tiny):
    """What the vllm backend hands its engine for a vision-language model: hf-vlm's chat prompt as
    token ids, each image a single placeholder (vLLM expands it), and the request's own images."""
    family, path, model = tiny
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    engine = RecordingEngine(tokenizer.encode(" a red circle\n\nmore", add_special_tokens=False))
    chat = ChatPrompts(load_processor(str(path)), "vllm")
    backend = VLLMBackend(
        str(path),
        engine=engine,
        tokenizer=tokenizer,
        max_length=1024,
        engine_length=1024,
        chunk=3,
        sampling=dict,
        chat=chat,
    )
    loads = Loads()
    items = requests(loads)
    assert backend.generate_until(items, progress=lambda finished: None) == [" a red circle"] * len(items)
    assert loads.count == sum(1 for r in items if r.images is not None)

    image_token = model.config.image_token_id
    hf = HFVisionLM(str(path), model=model, device=torch.device("cpu"), batch=1)
    for item, sent in zip(items, engine.prompts, strict=True):
        ids = sent["prompt_token_ids"]
        count = len(item.images) if item.images is not None else 0
        assert ids.count(image_token) == count, (family, item.context)
        expanded = hf.encode(hf.prompts.text(item), item.images)["input_ids"][0].tolist()
        assert expanded.count(image_token) > count or count == 0  # the processor expands, the engine gets one each
        assert ids[:2].count(tokenizer.bos_token_id) <= 1 and ids[-3:] == expanded[-3:]
        images = sent.get("multi_modal_data", {}).get("image", [])
        digests = item.images.digests if item.images is not None else ()
        assert [im.tobytes() for im in images] == [picture(int(d)).tobytes() for d in digests]

    text_only = VLLMBackend(
        str(path), engine=engine, tokenizer=tokenizer, max_length=1024, engine_length=1024, chunk=3, sampling=dict
    )
    with pytest.raises(ValueError, match="not a vision-language model"):
        text_only.generate_until(items[:1], progress=lambda finished: None)
