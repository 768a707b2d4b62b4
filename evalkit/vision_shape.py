"""What a vision-language model adds to the planner's arithmetic, from its config alone.

The vision tower and projector parameters of LLaVA (CLIP), LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL and
InternVL (InternViT), the width of a vision encoder layer, and an upper bound on the tokens one
image becomes in the language model (from the config and the processor's saved settings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from evalkit.errors import UsageError


def first_value(*configs: dict, keys: tuple[str, ...]) -> object:
    """The first value set for any of ``keys``, searching the configs in order."""
    return next((c[k] for c in configs for k in keys if c.get(k) is not None), None)


# The transformers configuration classes' defaults, for keys a config.json leaves out.
VLM_DEFAULTS: dict[str, dict] = {
    "llava": {
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "multimodal_projector_bias": True,
    },
    "internvl": {"downsample_ratio": 0.5},
}
VLM_DEFAULTS["llava_next"] = {
    **VLM_DEFAULTS["llava"],
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}
VISION_DEFAULTS: dict[str, dict] = {
    "clip": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 32,
    },
    "qwen2_vl": {
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 3584,
        "mlp_ratio": 4,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "qwen2_5_vl": {
        "depth": 32,
        "hidden_size": 3584,
        "intermediate_size": 3420,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 3584,
    },
    "internvl": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "intermediate_size": 4096,
        "attention_bias": False,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "image_size": 448,
        "patch_size": 14,
        "num_channels": 3,
        "use_mask_token": False,
        "use_absolute_position_embeddings": True,
        "use_mean_pooling": True,
    },
}
# Qwen2VLImageProcessor's default pixel range, used when the model folder saves none.
QWEN_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
QWEN_DEFAULT_MIN_PIXELS = 56 * 56
# GotOcr2ImageProcessor's default tile limit for InternVL.
INTERNVL_DEFAULT_MAX_TILES = 12


def _side(value: int | list[int]) -> int:
    """One side of a square image or patch size given as ``n`` or ``[n, n]``."""
    return value[0] if isinstance(value, list | tuple) else value


def _vision_facts(config: dict) -> tuple[str, str, dict, dict]:
    """(family, tower, top-level config, vision config), the configs filled with their class
    defaults; tower is the family's own, "clip" for a LLaVA with a CLIP tower, else ""."""
    family = config.get("model_type", "")
    vision = dict(config["vision_config"])
    if "in_chans" in vision:  # the hub's Qwen-VL configs use the original code's name
        vision.setdefault("in_channels", vision["in_chans"])
    clip = family in ("llava", "llava_next") and vision.get("model_type", "clip_vision_model") == "clip_vision_model"
    tower = "clip" if clip else family if family in VISION_DEFAULTS else ""
    return family, tower, {**VLM_DEFAULTS.get(family, {}), **config}, {**VISION_DEFAULTS.get(tower, {}), **vision}


def vision_parameters(config: dict) -> int:
    """Parameters of a VLM's vision tower and multi-modal projector; 0 for a text-only config.

    Exact (biases and norms included) for the transformers implementations of LLaVA and LLaVA-NeXT
    with a CLIP tower, Qwen2-VL, Qwen2.5-VL and InternVL; any other tower is estimated as a ViT of
    its width and depth (attention, MLP and patch weights) with a two-layer projector.
    """
    if "vision_config" not in config:
        return 0
    family, tower, top, vision = _vision_facts(config)
    text_hidden = config.get("text_config", config)["hidden_size"]
    if tower in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_vision(vision, family)
    if tower == "internvl":
        return _internvl_tower(vision) + _internvl_projector(top, vision, text_hidden)
    feature_layers = top.get("vision_feature_layer", -1)
    inputs = (vision.get("hidden_size") or 0) * (len(feature_layers) if isinstance(feature_layers, list) else 1)
    bias = 2 * text_hidden if top.get("multimodal_projector_bias", True) else 0
    newline = text_hidden if family == "llava_next" else 0
    encoder = _clip_tower(vision) if tower == "clip" else _vit_tower(vision)
    return encoder + inputs * text_hidden + text_hidden * text_hidden + bias + newline


def vision_width(config: dict) -> int:
    """Values one vision encoder layer holds per image token: the patches behind a token (merged
    or pixel-shuffled into it) times the layer's ``2 * width + MLP width``; 0 for a text-only config."""
    if "vision_config" not in config:
        return 0
    family, _, top, v = _vision_facts(config)
    if family == "qwen2_vl":
        return v["spatial_merge_size"] ** 2 * (2 * v["embed_dim"] + int(v["embed_dim"] * v["mlp_ratio"]))
    h = v.get("hidden_size") or v.get("embed_dim") or 0
    if family == "qwen2_5_vl":
        return v["spatial_merge_size"] ** 2 * (2 * h + v["intermediate_size"])
    patches = int(1 / top["downsample_ratio"]) ** 2 if family == "internvl" else 1
    return patches * (2 * h + (v.get("intermediate_size") or 4 * h))


def _clip_tower(v: dict) -> int:
    h, i, patch = v["hidden_size"], v["intermediate_size"], _side(v["patch_size"])
    embeddings = h + v["num_channels"] * patch * patch * h + ((_side(v["image_size"]) // patch) ** 2 + 1) * h
    layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h  # q/k/v/out, fc1/fc2, two layer norms
    return embeddings + v["num_hidden_layers"] * layer + 4 * h  # pre- and post-layer norms


def _vit_tower(v: dict) -> int:
    h = v.get("hidden_size") or v.get("embed_dim") or 0
    layers = v.get("num_hidden_layers") or v.get("depth") or 0
    patch, size = _side(v.get("patch_size", 14)), _side(v.get("image_size", 224))
    return (
        layers * (4 * h * h + 2 * h * (v.get("intermediate_size") or 4 * h))
        + (3 * patch * patch + (size // patch) ** 2) * h
    )


def _qwen_vision(v: dict, family: str) -> int:
    """Qwen2-VL: LayerNorms and a fc1/fc2 MLP of width embed_dim * mlp_ratio, merger out to
    hidden_size. Qwen2.5-VL: RMSNorms and a gated MLP of intermediate_size, out to out_hidden_size."""
    if family == "qwen2_vl":
        h, out, norm = v["embed_dim"], v["hidden_size"], 2
        width = int(h * v["mlp_ratio"])
        mlp = 2 * h * width + width + h
    else:
        h, out, norm, width = v["hidden_size"], v["out_hidden_size"], 1, v["intermediate_size"]
        mlp = 3 * h * width + 2 * width + h
    patch = v["in_channels"] * v["temporal_patch_size"] * _side(v["patch_size"]) ** 2 * h
    block = 2 * norm * h + (3 * h * h + 3 * h) + (h * h + h) + mlp
    merged = h * v["spatial_merge_size"] ** 2
    merger = norm * h + merged * merged + merged + merged * out + out
    return patch + v["depth"] * block + merger


def _internvl_tower(v: dict) -> int:
    h, i, patch = v["hidden_size"], v["intermediate_size"], _side(v["patch_size"])
    positions = (_side(v["image_size"]) // patch) ** 2 + 1
    embeddings = h * (1 + bool(v["use_mask_token"]) + positions * bool(v["use_absolute_position_embeddings"]))
    embeddings += v["num_channels"] * patch * patch * h + h
    norm = 2 * h if v["norm_type"] == "layer_norm" else h
    attention = 3 * h * h + 3 * h * bool(v["attention_bias"]) + h * h + h + 2 * h * bool(v["use_qk_norm"])
    layer = attention + 2 * h + 2 * norm + 2 * h * i + i + h  # + layer scales, two norms, fc1/fc2
    return embeddings + v["num_hidden_layers"] * layer + (0 if v["use_mean_pooling"] else 2 * h)


def _internvl_projector(top: dict, v: dict, text_hidden: int) -> int:
    inputs = v["hidden_size"] * int(1 / top["downsample_ratio"]) ** 2
    return 2 * inputs + inputs * text_hidden + text_hidden + text_hidden * text_hidden + text_hidden


def image_tokens_per_image(config: dict, processor: dict | None = None) -> int:
    """An upper bound on the tokens one image adds to a request; 0 for a text-only config.

    ``processor`` holds the processor's saved settings (see ``read_processor_facts``); without
    them the transformers defaults stand. Per family:

    - llava: (image_size / patch_size)^2 features, one more (the CLS) with the "full" strategy.
    - llava_next (any-res): the base image as for llava, plus the largest grid pinpoint H x W in
      (H/patch) x (W/patch) features and one newline token per feature row; unpadding only
      removes features, so the largest pinpoint bounds every image.
    - qwen2_vl, qwen2_5_vl: merged patches of side f = patch * merge, plus the vision start/end
      tokens. Resizing keeps height * width <= max_pixels, so at most max_pixels / f^2 of them,
      except that a side never drops below f: an image so thin that its short side stays at f has
      a long side of at most sqrt(200 * max_pixels) (aspect ratios above 200 are refused), and an
      image scaled up to min_pixels has each side rounded up by at most f. The bound is the
      largest of the three; max_pixels and min_pixels are the processor's, else
      Qwen2VLImageProcessor's defaults (28 * 28 * 1280 and 56 * 56).
    - internvl: image_seq_length context tokens per tile over max_patches tiles and a thumbnail,
      plus <img> and </img>. Tiling is assumed on, as InternVLProcessor defaults to it whatever
      the image processor saved; max_patches is the processor's, else 12.
    - any other family: the config's image_seq_length or mm_tokens_per_image, else
      (image_size / patch_size)^2.
    """
    if "vision_config" not in config:
        return 0
    processor = processor or {}
    family, _, top, vision = _vision_facts(config)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_image_tokens(vision, processor) + 2
    if family == "internvl":
        per_tile = first_value(processor, top, keys=("image_seq_length",))
        if per_tile is None:
            side = _side(vision["image_size"]) // _side(vision["patch_size"])
            per_tile = int(side * side * top["downsample_ratio"] ** 2)
        tiles = processor.get("max_patches") or INTERNVL_DEFAULT_MAX_TILES
        return per_tile * (tiles + 1 if tiles > 1 else 1) + 2
    if family not in ("llava", "llava_next"):
        known = first_value(top, keys=("image_seq_length", "mm_tokens_per_image"))
        if known is not None:
            return int(known)
    if "image_size" not in vision or "patch_size" not in vision:
        raise UsageError(
            f"cannot bound the image tokens of model_type {family!r}: its vision_config has no image_size and "
            "patch_size and the config no image_seq_length"
        )
    size, patch = _side(vision["image_size"]), _side(vision["patch_size"])
    base = (size // patch) ** 2 + (top.get("vision_feature_select_strategy") == "full")
    if family != "llava_next":
        return base
    grid = max((h // patch) * (w // patch) + h // patch for h, w in top["image_grid_pinpoints"])
    return base + grid


def video_tokens_per_clip(config: dict, processor: dict | None, max_frames: int, max_pixels: int) -> int:
    """An upper bound on the tokens one video clip adds, when at most ``max_frames`` frames of at
    most ``max_pixels`` pixels each are taken from it (the frame rule).

    - qwen2_vl, qwen2_5_vl: each ``temporal_patch_size`` frames (2) become one grid of merged
      patches, bounded as for an image within ``max_pixels``; plus the vision start/end tokens.
    - any other family: each frame at most as many tokens as an image.
    """
    if "vision_config" not in config:
        return 0
    processor = processor or {}
    family, _, _, vision = _vision_facts(config)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        temporal = processor.get("temporal_patch_size") or vision.get("temporal_patch_size") or 2
        frames_processor = {**processor, "max_pixels": max_pixels, "size": None}
        return math.ceil(max_frames / temporal) * _qwen_image_tokens(vision, frames_processor) + 2
    return max_frames * image_tokens_per_image(config, processor)


def _qwen_image_tokens(vision: dict, processor: dict) -> int:
    side = (processor.get("patch_size") or _side(vision["patch_size"])) * (
        processor.get("merge_size") or vision["spatial_merge_size"]
    )
    size = processor.get("size") or {}
    most = processor.get("max_pixels") or size.get("longest_edge") or QWEN_DEFAULT_MAX_PIXELS
    least = (processor.get("min_pixels") or size.get("shortest_edge") or QWEN_DEFAULT_MIN_PIXELS) / side**2
    thin = math.sqrt(200 * most) / side  # one merged patch high, at the largest aspect ratio accepted
    scaled_up = least + math.sqrt(200 * least) + math.sqrt(least / 200) + 1  # each side rounded up once
    return int(max(most / side**2, thin, scaled_up))


def read_processor_facts(model: str) -> dict:
    """The saved processor settings of a model folder, flat: preprocessor_config.json (the hub's
    layout) and processor_config.json (transformers 5 nests the image processor's under a key)."""
    facts: dict = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model) / name
        if path.is_file():
            saved = json.loads(path.read_text())
            facts.update(saved.pop("image_processor", None) or {})
            facts.update(saved)
    return facts
