"""Which lmms-eval model class a checkpoint stands for, and how that class reads a task's settings.

lmms-eval hands every task the ``--model`` name the user typed (``TaskManager(model_name=...)``);
a task picks its ``lmms_eval_specific_kwargs``, ``model_specific_generation_kwargs`` and
``model_specific_target_kwargs`` block by that exact name, else ``default``. evalkit has no
``--model`` name, so the name is that of the lmms-eval class a user would run for the checkpoint,
read from ``model_type`` in its ``config.json``: transformers' LLaVA, LLaVA-NeXT and LLaVA-OneVision
checkpoints all run under ``llava_hf`` (lmms-eval's ``llava`` and ``llava_onevision`` classes load
the original LLaVA repositories' checkpoints, which transformers cannot load).

Each of those classes also reads the task's ``generation_kwargs`` its own way (its default token
limit, whether it stops at ``until``, which settings reach ``generate``). ``request_gen_kwargs``
gives a request the settings that class would generate with; a checkpoint without a known class
keeps the task's settings as lmms-eval's task config left them. Some classes also change each image
before their processor sees it (``prepare_image``): lmms-eval's ``qwen2_vl`` sends it through a
JPEG data URL and ``qwen_vl_utils``' resize.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

# transformers model_type -> the lmms-eval model name (class) that runs such a checkpoint.
MODEL_CLASSES: dict[str, str] = {
    "llava": "llava_hf",
    "llava_next": "llava_hf",
    "llava_onevision": "llava_hf",
    "qwen": "qwen_vl",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "idefics2": "idefics2",
    "mllama": "llama_vision",
    "phi3_v": "phi3v",
    "internvl": "internvl_hf",
    "internvl_chat": "internvl2",
    "gemma3": "gemma3",
    "aria": "aria",
    "instructblip": "instructblip",
    "fuyu": "fuyu",
    "internlmxcomposer2": "xcomposer2_4khd",
}


@dataclass(frozen=True, kw_only=True)
class GenerationRule:
    """How one lmms-eval model class turns a task's generation_kwargs into a ``generate`` call."""

    max_new_tokens: int  # when the task gives none
    stops_at_until: bool  # False: the class drops ``until`` and stops only at the end of sequence
    greedy_from_temperature: bool  # True: samples iff temperature > 0, whatever do_sample says
    passes: tuple[str, ...]  # the task's settings that reach generate


SAMPLING = ("temperature", "top_p", "num_beams")
# A token limit by any of its names; lm-eval's max_gen_toks (as --gen-kwargs gives it) first.
TOKEN_LIMITS = ("max_gen_toks", "max_new_tokens", "max_tokens")
RULES: dict[str, GenerationRule] = {
    # models/chat/llava_hf.py:75-94 and models/chat/internvl_hf.py:284-305
    "llava_hf": GenerationRule(
        max_new_tokens=1024, stops_at_until=False, greedy_from_temperature=True, passes=SAMPLING
    ),
    "internvl_hf": GenerationRule(
        max_new_tokens=1024, stops_at_until=False, greedy_from_temperature=True, passes=SAMPLING
    ),
    # models/simple/qwen2_vl.py:229-240 (until cuts the answer), 398-421
    "qwen2_vl": GenerationRule(max_new_tokens=128, stops_at_until=True, greedy_from_temperature=True, passes=SAMPLING),
    # models/chat/qwen2_5_vl.py:120-150
    "qwen2_5_vl": GenerationRule(
        max_new_tokens=128, stops_at_until=False, greedy_from_temperature=True, passes=(*SAMPLING, "top_k")
    ),
    # models/simple/internvl2.py:23-27, 311-322: only these three survive
    "internvl2": GenerationRule(
        max_new_tokens=1024, stops_at_until=False, greedy_from_temperature=False, passes=("num_beams", "do_sample")
    ),
}


@functools.lru_cache(maxsize=64)
def _model_type(path: str) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def model_type(metadata: Any) -> str | None:
    """The ``model_type`` of the model a task is built for (``metadata["pretrained"]``); None when
    there is no model folder or no config.json."""
    path = metadata.get("pretrained") if isinstance(metadata, Mapping) else None
    return _model_type(str(path)) if path else None


def model_name(metadata: Any) -> str | None:
    """The lmms-eval model name for the model a task is built for; None without a model (the
    ``default`` blocks apply)."""
    kind = model_type(metadata)
    return MODEL_CLASSES.get(kind, kind) if kind else None


def request_gen_kwargs(name: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generation settings the lmms-eval class ``name`` would use for a task's ``kwargs``."""
    rule = RULES.get(name or "")
    if rule is None:
        return dict(kwargs)
    out: dict[str, Any] = {
        "until": _as_list(kwargs.get("until")) if rule.stops_at_until else [],
        "max_new_tokens": next((kwargs[k] for k in TOKEN_LIMITS if kwargs.get(k) is not None), rule.max_new_tokens),
        **{key: kwargs[key] for key in rule.passes if key in kwargs},
    }
    if rule.greedy_from_temperature:
        out["do_sample"] = float(kwargs.get("temperature") or 0) > 0
        if not out["do_sample"]:  # the classes pass None for these when greedy
            for key in ("temperature", "top_p", "top_k"):
                out.pop(key, None)
    else:
        out["do_sample"] = bool(kwargs.get("do_sample", False))
    return out


def _as_list(until: Any) -> list[str]:
    if until is None:
        return []
    return [until] if isinstance(until, str) else list(until)


@dataclass(frozen=True, kw_only=True)
class ImageRule:
    """How one lmms-eval model class changes an image before its processor: a JPEG round trip at
    ``jpeg_quality`` (None: none), then ``qwen_vl_utils``' resize to multiples of ``factor`` pixels
    whose area lies in [min_pixels, max_pixels] (PIL's default resampling). Where the class loads
    its processor with bounds of its own (``processor_pixels``), that processor resizes once more
    within them (bicubic, as its PIL backend), whatever the checkpoint's processor allows."""

    jpeg_quality: int | None
    factor: int
    min_pixels: int
    max_pixels: int
    processor_pixels: tuple[int, int] | None = None


IMAGE_RULES: dict[str, ImageRule] = {
    # models/simple/qwen2_vl.py:173-180 (_encode_image_data_url) and its max_pixels/min_pixels defaults
    "qwen2_vl": ImageRule(jpeg_quality=85, factor=28, min_pixels=3136, max_pixels=602112),
    # models/chat/qwen2_5_vl.py:53-95: the PIL image from doc_to_messages goes to qwen_vl_utils with
    # no pixel bounds, so its own (4 to 16384 tokens of 28x28 pixels); the processor, loaded with
    # min_pixels=256*28*28 and max_pixels=1605632 (models/simple/qwen2_5_vl.py:44-45, 91), rescales.
    "qwen2_5_vl": ImageRule(
        jpeg_quality=None,
        factor=28,
        min_pixels=4 * 28 * 28,
        max_pixels=16384 * 28 * 28,
        processor_pixels=(256 * 28 * 28, 1605632),
    ),
}


def prepare_image(name: str | None, image: Any) -> Any:
    """``image`` as the lmms-eval class ``name`` hands it to its processor (others unchanged)."""
    rule = IMAGE_RULES.get(name or "")
    if rule is None or not isinstance(image, Image.Image):
        return image
    decoded = image.convert("RGB")
    if rule.jpeg_quality is not None:
        buffer = io.BytesIO()
        decoded.save(buffer, format="JPEG", quality=rule.jpeg_quality)
        buffer.seek(0)
        decoded = Image.open(buffer).convert("RGB")
    width, height = decoded.size
    resized = decoded.resize(_fitted(height, width, rule.factor, rule.min_pixels, rule.max_pixels)[::-1])
    if rule.processor_pixels is None:
        return resized
    width, height = resized.size
    size = _fitted(height, width, rule.factor, *rule.processor_pixels)[::-1]
    return resized if size == resized.size else resized.resize(size, Image.Resampling.BICUBIC)


def _fitted(height: int, width: int, f: int, least: int, most: int) -> tuple[int, int]:
    """qwen_vl_utils.smart_resize: (height, width) in multiples of ``f`` within [least, most] pixels."""
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > most:
        beta = math.sqrt(height * width / most)
        h, w = math.floor(height / beta / f) * f, math.floor(width / beta / f) * f
    elif h * w < least:
        beta = math.sqrt(least / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w
