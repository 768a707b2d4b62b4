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
- tokens: images and video clips reach the language model as tokens. ``image_tokens_per_image``
  bounds them per image and ``video_tokens_per_clip`` per clip (by the frame rule's limits); the
  caller passes ``max_len = text tokens + images * image bound + clips * clip bound``.
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
from evalkit.vision_shape import (
    first_value,
    image_tokens_per_image,
    read_processor_facts,
    video_tokens_per_clip,
    vision_parameters,
    vision_width,
)

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
                dtype=str(first_value(config, text, keys=("torch_dtype", "dtype")) or "float32"),
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


def read_image_tokens_per_image(model: str) -> int:
    """``image_tokens_per_image`` of a model folder, from its config and processor files."""
    return image_tokens_per_image(read_config(model), read_processor_facts(model))


def read_video_tokens_per_clip(model: str, max_frames: int, max_pixels: int) -> int:
    """``video_tokens_per_clip`` of a model folder, for clips taken by a frame rule's limits."""
    return video_tokens_per_clip(read_config(model), read_processor_facts(model), max_frames, max_pixels)


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
    """Refuse, before weights load, a layout that cannot shard the model or cannot fit it.

    For a VLM, ``max_len`` includes the images: text tokens + images * ``read_image_tokens_per_image``.
    """
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
