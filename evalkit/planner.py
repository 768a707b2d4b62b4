"""The layout planner: which (tp, dp) layouts fit a model on N GPUs, from its config alone.

Memory per rank, in bytes, for a decoder-only transformer at tensor-parallel size ``tp``:

- weights: embedding and norms stay whole on every TP rank; attention, MLP and the LM head
  are split ``tp`` ways.
- KV cache: ``2 * layers * (kv_heads / tp) * head_dim * max_len * batch`` values.
- activations: one layer's working set, ``batch * max_len * (2 * hidden + intermediate / tp)``
  values, plus the full-vocabulary logits ``batch * max_len * vocab`` in the model dtype and again
  in float32 for the log-softmax.
- safety margin: the sum times 1.10, plus 1 GiB for the CUDA context and allocator slack.

Vision-language models (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, InternVL) differ in three ways:

- weights: the vision tower and projector are counted whole on every TP rank. DeepSpeed AutoTP
  does shard a CLIP encoder's layers, but not every tower's head count divides tp (InternViT-6B
  has 25 heads), so whole is the safe side, an overestimate of at most the tower itself.
- tokens: images reach the language model as tokens. ``image_tokens_per_image`` bounds them per
  image; the caller passes ``max_len = text tokens + images * bound``.
- activations: the working set is the larger of a decoder layer's and a vision encoder layer's
  (``batch * max_len * vision_width``, as if every token were an image token; attention scores
  are left out, as fused attention never holds them), and the logits are those of the last
  position only: VLMs run generation only (the hf-vlm backend), and transformers' generate asks
  the model for the last position's logits.

A layout is legal when tp divides the GPU count, the attention heads, the KV heads and the
MLP width. The recommendation is the legal layout with the smallest tp that fits: the most
data-parallel replicas, so the highest throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from evalkit.errors import UsageError

GIB = 1024**3
MARGIN_FACTOR = 1.10
MARGIN_BYTES = 1 * GIB
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    max_positions: int
    dtype: str
    vision: int = 0  # vision tower and projector parameters, kept whole on every TP rank
    vision_width: int = 0  # values a vision encoder layer holds per image token

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        text = config.get("text_config", config)
        try:
            heads = text["num_attention_heads"]
            return cls(
                hidden=text["hidden_size"],
                layers=text["num_hidden_layers"],
                heads=heads,
                kv_heads=text.get("num_key_value_heads") or heads,
                intermediate=text["intermediate_size"],
                vocab=text["vocab_size"],
                # A VLM config may say it at the top, in its text config or both; untied unless all agree.
                tied=bool(text.get("tie_word_embeddings", False)) and bool(config.get("tie_word_embeddings", True)),
                max_positions=text.get("max_position_embeddings", 2048),
                dtype=str(_first(config, text, keys=("torch_dtype", "dtype")) or "float32"),
                vision=vision_parameters(config),
                vision_width=vision_width(config),
            )
        except KeyError as exc:
            raise UsageError(
                f"model config lacks {exc.args[0]!r}; the planner needs a decoder-only transformer config"
            ) from None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def split_parameters(self) -> tuple[int, int]:
        """(parameters split across TP ranks, parameters every TP rank keeps whole)."""
        kv_width = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv_width
        mlp = 3 * self.hidden * self.intermediate
        lm_head = 0 if self.tied else self.vocab * self.hidden
        split = self.layers * (attention + mlp) + lm_head
        whole = self.vocab * self.hidden + self.layers * 2 * self.hidden + self.hidden + self.vision
        return split, whole

    @property
    def parameters(self) -> int:
        return sum(self.split_parameters())


def read_config(model: str) -> dict:
    path = Path(model) / "config.json"
    if not path.is_file():
        raise UsageError(f"--model {model}: no config.json there; the planner reads only the model config")
    return json.loads(path.read_text())


def read_shape(model: str, dtype: str | None = None) -> ModelShape:
    shape = ModelShape.from_config(read_config(model))
    chosen = dtype if dtype and dtype != "auto" else shape.dtype
    if chosen not in DTYPE_BYTES:
        chosen = "float32"
    return dataclasses.replace(shape, dtype=chosen)


def _first(*configs: dict, keys: tuple[str, ...]) -> object:
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
# Qwen2VLImageProcessor's default max_pixels, used when the model folder saves none.
QWEN_DEFAULT_MAX_PIXELS = 28 * 28 * 1280
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
    - qwen2_vl, qwen2_5_vl: max_pixels / (patch * merge)^2 merged patches (resizing keeps
      height * width <= max_pixels at the aspect ratios it accepts, up to 200, whenever max_pixels
      >= 200 * (patch * merge)^2 as in every released config), plus the vision start/end tokens.
      max_pixels is the processor's, else Qwen2VLImageProcessor's default 28 * 28 * 1280.
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
        patch = processor.get("patch_size") or _side(vision["patch_size"])
        merge = processor.get("merge_size") or vision["spatial_merge_size"]
        max_pixels = processor.get("max_pixels") or (processor.get("size") or {}).get("longest_edge")
        return (max_pixels or QWEN_DEFAULT_MAX_PIXELS) // (patch * merge) ** 2 + 2
    if family == "internvl":
        per_tile = _first(processor, top, keys=("image_seq_length",))
        if per_tile is None:
            side = _side(vision["image_size"]) // _side(vision["patch_size"])
            per_tile = int(side * side * top["downsample_ratio"] ** 2)
        tiles = processor.get("max_patches") or INTERNVL_DEFAULT_MAX_TILES
        return per_tile * (tiles + 1 if tiles > 1 else 1) + 2
    if family not in ("llava", "llava_next"):
        known = _first(top, keys=("image_seq_length", "mm_tokens_per_image"))
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


def read_image_tokens_per_image(model: str) -> int:
    """``image_tokens_per_image`` of a model folder, from its config and processor files."""
    return image_tokens_per_image(read_config(model), read_processor_facts(model))


@dataclass(frozen=True, kw_only=True)
class Estimate:
    tp: int
    dp: int
    weights: int
    kv_cache: int
    activations: int
    problem: str | None

    @property
    def total(self) -> int:
        return int((self.weights + self.kv_cache + self.activations) * MARGIN_FACTOR) + MARGIN_BYTES


def shard_problem(shape: ModelShape, tp: int) -> str | None:
    for name, value in (
        ("attention heads", shape.heads),
        ("KV heads", shape.kv_heads),
        ("intermediate size", shape.intermediate),
    ):
        if value % tp:
            return f"tp({tp}) does not divide {name}({value})"
    return None


def estimate(shape: ModelShape, tp: int, gpus: int, max_len: int, batch: int) -> Estimate:
    size = DTYPE_BYTES[shape.dtype]
    split, whole = shape.split_parameters()
    weights = (split // tp + whole) * size
    kv_cache = 2 * shape.layers * max(1, shape.kv_heads // tp) * shape.head_dim * max_len * batch * size
    tokens = batch * max_len
    working_set = tokens * max(2 * shape.hidden + shape.intermediate // tp, shape.vision_width) * size
    logit_positions = batch if shape.vision else tokens
    activations = working_set + logit_positions * shape.vocab * (size + 4)
    problem = f"tp({tp}) does not divide the GPU count({gpus})" if gpus % tp else shard_problem(shape, tp)
    return Estimate(tp=tp, dp=gpus // tp, weights=weights, kv_cache=kv_cache, activations=activations, problem=problem)


def plan(shape: ModelShape, gpus: int, max_len: int, batch: int) -> list[Estimate]:
    return [estimate(shape, tp, gpus, max_len, batch) for tp in range(1, gpus + 1) if gpus % tp == 0]


def recommend(rows: list[Estimate], gpu_mem_gib: float) -> Estimate | None:
    fitting = [r for r in rows if r.problem is None and r.total <= gpu_mem_gib * GIB]
    return min(fitting, key=lambda r: r.tp) if fitting else None


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def format_plan(
    shape: ModelShape, rows: list[Estimate], gpu_mem_gib: float, model: str, max_len: int, batch: int
) -> str:
    vision = f" (vision tower + projector {shape.vision / 1e9:.2f}B, whole on every rank)" if shape.vision else ""
    lines = [
        f"model: {shape.parameters / 1e9:.2f}B parameters{vision}, {shape.dtype}, {shape.layers} layers, "
        f"{shape.heads} heads / {shape.kv_heads} KV heads; max_len {max_len}, batch {batch}; {gpu_mem_gib:g} GiB per GPU",
        "| tp | dp | weights GiB | KV cache GiB | activations GiB | total GiB (x1.10 + 1) | fits |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = r.problem or ("yes" if r.total <= gpu_mem_gib * GIB else "no")
        lines.append(
            f"| {r.tp} | {r.dp} | {gib(r.weights)} | {gib(r.kv_cache)} | {gib(r.activations)} | {gib(r.total)} | {verdict} |"
        )
    best = recommend(rows, gpu_mem_gib)
    if best is None:
        lines.append("no layout fits: use GPUs with more memory, more GPUs, a smaller --max-len or --batch-size")
    else:
        gpus = best.tp * best.dp
        lines.append(f"recommended: tp={best.tp} x dp={best.dp}")
        lines.append(
            f"torchrun --nproc_per_node={gpus} -m evalkit --model {model} --tp {best.tp} "
            f"--batch-size {batch} --tasks TASKS --output OUT"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evalkit plan", description="Plan a tp x dp layout from a model config."
    )
    parser.add_argument("--model", required=True, help="model folder (only config.json is read)")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU")
    parser.add_argument("--max-len", type=int, help="longest request in tokens (default: the model's context)")
    parser.add_argument(
        "--images", type=int, default=0, help="images in the longest request; their tokens are added to --max-len"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", help="override the config's dtype")
    args = parser.parse_args(argv)
    shape = read_shape(args.model, args.dtype)
    per_image = read_image_tokens_per_image(args.model)
    if args.images and not per_image:
        raise UsageError(f"--images {args.images}: {args.model} is not a vision-language model (no vision_config)")
    max_len = min(shape.max_positions, (args.max_len or shape.max_positions) + args.images * per_image)
    print(
        format_plan(
            shape, plan(shape, args.gpus, max_len, args.batch_size), args.gpu_mem, args.model, max_len, args.batch_size
        )
    )
    if per_image:
        print(f"images: at most {per_image} tokens each; --images N adds N x {per_image} to --max-len")
    return 0


def check_run_layout(
    model: str, dtype: str, tp: int, gpus: int, gpu_mem_gib: float | None, max_len: int, batch: int
) -> None:
    """Refuse, before weights load, a layout that cannot shard the model or cannot fit it."""
    shape = read_shape(model, dtype)
    problem = shard_problem(shape, tp)
    if problem:
        raise UsageError(
            f"--tp {tp} cannot shard {model}: {problem}; {_suggestion(shape, gpus, gpu_mem_gib, max_len, batch)}"
        )
    if gpu_mem_gib is None:
        return
    row = estimate(shape, tp, gpus, max_len, batch)
    if row.total > gpu_mem_gib * GIB:
        raise UsageError(
            f"layout tp={tp} x dp={gpus // tp} does not fit: about {gib(row.total)} GiB per GPU needed "
            f"(weights {gib(row.weights)}, KV cache {gib(row.kv_cache)}, activations {gib(row.activations)}, "
            f"with margin) but {gpu_mem_gib:g} GiB available; {_suggestion(shape, gpus, gpu_mem_gib, max_len, batch)}"
        )


def _suggestion(shape: ModelShape, gpus: int, gpu_mem_gib: float | None, max_len: int, batch: int) -> str:
    rows = plan(shape, gpus, max_len, batch)
    best = recommend(rows, gpu_mem_gib if gpu_mem_gib is not None else float("inf"))
    if best is None:
        return "no layout on this many GPUs fits; see python -m evalkit plan --help"
    return f"the planner suggests --tp {best.tp} (python -m evalkit plan --model ... --gpus {gpus} --gpu-mem ...)"
