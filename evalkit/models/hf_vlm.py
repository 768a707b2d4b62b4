"""The transformers vision-language backend: generate_until on prompts that carry images.

Every prompt is the processor's chat template of the request (``vlm_prompts``); the processor then
expands its image tokens to each image's feature count.

A request's answer never depends on the batch it ran in. Each request is processed alone, its
token length after image expansion picks its padded width (``batching.padded_width``, a function
of that length only), and only requests of the same width share a model call, left-padded with an
attention mask. Images are decoded a few batches at a time, when their requests come up, so a rank
never holds every image of its share. (Sampled generation draws from one random stream per call,
so only greedy answers are batch-independent.)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from evalkit.models.batching import BatchLimit, width_batches
from evalkit.models.hf import (
    AUTO_CPU_TOKENS,
    ROWS_PER_CHUNK,
    TransformersOptions,
    announce_auto,
    load_transformers,
    stops_and_limits,
    tokens_from_free_memory,
)
from evalkit.models.lm_rules import ensure_pad_token, generation_groups, model_max_length
from evalkit.models.protocol import GenerationInput, ImageInput, Progress, VideoFrames
from evalkit.models.stopping import StopOnSequences, cut_at_stop
from evalkit.models.vlm_prompts import ChatPrompts, load_processor
from evalkit.models.vlm_video import video_inputs

# Images are decoded this many batches of requests at a time: a request's exact length (and so
# its width) is known only after decoding, and a wider window lets more requests of one width
# share a batch.
LOOKAHEAD_BATCHES = 4
# Processor outputs with one value per token (left-padded to the batch width); all others are
# per-image tensors, concatenated over the batch.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
UNSUPPORTED = "the hf-vlm backend runs generate_until tasks only; use the hf backend for loglikelihood tasks"


class HFVisionLM:
    """Generation with a loaded image-text-to-text model, wherever its weights were placed.

    ``tp_group`` is set when the model is tensor-parallel: every rank of the group runs the same
    batches, and generation stops only when all of them would.
    """

    name = "hf-vlm"

    def __init__(
        self,
        path: str,
        *,
        model: torch.nn.Module,
        device: torch.device,
        batch: BatchLimit | int,
        tp_group: Any = None,
        num_parameters_local: int | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        shared_prefix: bool = False,  # generation only: nothing to share
        rank: int = 0,
    ) -> None:
        self.path = path
        self.device = device
        self.timings: dict[str, float] = {}
        self.token_counts: dict[str, int] = {}
        self.limit = BatchLimit.of(batch)
        if self.limit.auto:
            if device.type == "cuda":
                tokens, how = tokens_from_free_memory(model, device, tp_group), "estimated from free GPU memory"
            else:
                tokens, how = AUTO_CPU_TOKENS, "the CPU default"
            self.limit = announce_auto(self.limit, tokens, how, rank)
        self.batch_size = self.limit.rows if self.limit.tokens is None else ROWS_PER_CHUNK
        self.tp_group = tp_group
        self.num_parameters_local = num_parameters_local
        self.processor = load_processor(path, trust_remote_code=trust_remote_code)
        self.prompts = ChatPrompts(self.processor, self.name)
        self.tokenizer = ensure_pad_token(self.processor.tokenizer)
        self.tokenizer.padding_side = "left"
        self.model = model.eval()
        self.max_length = max_length or model_max_length(self.model.config, self.tokenizer)

    @classmethod
    def load(cls, options: TransformersOptions) -> HFVisionLM:
        import transformers

        return load_transformers(cls, options, auto_class=transformers.AutoModelForImageTextToText)

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "class": type(self.model).__name__,
            "family": self.model.config.model_type,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "num_parameters_this_rank": self.num_parameters_local,
            "max_length": self.max_length,
        }

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress) -> list[tuple[float, bool]]:
        raise NotImplementedError(UNSUPPORTED)

    def loglikelihood_rolling(self, texts: list[str], progress: Progress) -> list[float]:
        raise NotImplementedError(UNSUPPORTED)

    # -- prompts ------------------------------------------------------------------------------

    def encode(self, prompt: str, images: ImageInput | None) -> dict[str, torch.Tensor]:
        """Token ids (image and video tokens expanded) and pixel tensors of one request; decodes its
        images and clips."""
        visuals = images.load() if images is not None else []
        pil = [v for v in visuals if not isinstance(v, VideoFrames)]
        clips = [v for v in visuals if isinstance(v, VideoFrames)]
        special = self.prompts.adds_special_tokens(prompt)
        extra: dict[str, Any] = {}
        if clips and getattr(self.processor, "video_processor", None) is not None:
            extra = {"videos": [np.stack([np.asarray(f) for f in c.frames]) for c in clips], "do_sample_frames": False}
        elif clips:
            if pil:
                raise ValueError("a request with both images and videos needs the processor's video processor")
            prompt, videos = video_inputs(self.processor, prompt, clips)
            return {**self.tokenize(prompt, special), **videos}
        encoded = self.processor(
            text=[prompt], images=pil or None, add_special_tokens=special, padding=False, return_tensors="pt", **extra
        )
        return dict(encoded)

    def tokenize(self, prompt: str, special: bool) -> dict[str, torch.Tensor]:
        """What the processor gives for text whose placeholders are already expanded (its own call
        refuses video placeholders without videos): ids, mask and, where the model takes them, the
        processor's token types (which tokens are image or video)."""
        ids = self.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        if "mm_token_type_ids" in self.processor.model_input_names:
            out["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids([ids]))
        return out

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests: list[GenerationInput], progress: Progress) -> list[str]:
        out: list[str] = [""] * len(requests)
        for members, kwargs, budget in generation_groups(requests, self.max_length):
            for finished in self._generate_group([requests[i] for i in members], kwargs, budget):
                done = [(members[p], text) for p, text in finished]
                for i, text in done:
                    out[i] = text
                progress(done)
        return out

    def _generate_group(
        self, requests: list[GenerationInput], kwargs: dict[str, Any], budget: int
    ) -> Iterator[list[tuple[int, str]]]:
        """(position, text) pairs per finished batch, for requests sharing generation arguments."""
        prompts = [self.prompts.text(r) for r in requests]
        estimate = [
            (len(r.images) if r.images is not None else 0, len(self.tokenizer.tokenize(p)))
            for r, p in zip(requests, prompts, strict=True)
        ]
        # Most images and longest text first: memory trouble shows at once, and neighbours in this
        # order tend to end up with the same width.
        order = sorted(range(len(requests)), key=lambda p: (-estimate[p][0], -estimate[p][1], prompts[p], p))
        window = self.batch_size * LOOKAHEAD_BATCHES
        for start in range(0, len(order), window):
            positions = order[start : start + window]
            encoded = []
            for p in positions:
                item = self.encode(prompts[p], requests[p].images)
                length = item["input_ids"].shape[1]
                if length > budget:
                    raise ValueError(
                        f"prompt of {length} tokens (images expanded) does not fit the {budget} positions "
                        f"left by max_gen_toks {kwargs['max_gen_toks']} in the model's {self.max_length}"
                    )
                encoded.append((p, item))
            batches = width_batches(
                encoded,
                replace(self.limit, per_row=kwargs["max_gen_toks"]),
                length=lambda e: e[1]["input_ids"].shape[1],
                cap=budget,
                tiebreak=lambda e: e[0],
            )
            for width, batch in batches:
                texts = self._generate_batch(width, [item for _, (_, item) in batch], kwargs)
                yield [(p, text) for (_, (p, _)), text in zip(batch, texts, strict=True)]

    @torch.no_grad()
    def _generate_batch(
        self, width: int, batch: list[dict[str, torch.Tensor]], gen_kwargs: dict[str, Any]
    ) -> list[str]:
        until, max_gen_toks, kwargs = stops_and_limits(self.tokenizer, gen_kwargs)
        inputs = {k: v.to(self.device) for k, v in collate(batch, width, self.tokenizer.pad_token_id).items()}
        inputs = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        generated = self.model.generate(
            **inputs,
            max_new_tokens=max_gen_toks,
            stopping_criteria=[StopOnSequences(self.tokenizer, until, width, len(batch), group=self.tp_group)],
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            **kwargs,
        )
        return [
            cut_at_stop(self.tokenizer.decode(row[width:], skip_special_tokens=True), until)
            for row in generated.tolist()
        ]


def collate(batch: list[dict[str, torch.Tensor]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One model input from requests processed alone: per-token values left-padded to ``width``,
    per-image tensors concatenated (zero-padded where their shapes differ, as a batched
    LLaVA-NeXT processor pads its tiles)."""
    out: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for item in batch for k in item):
        values = [item[key] for item in batch if key in item]
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            padded = torch.full((len(values), width), fill, dtype=values[0].dtype)
            for row, value in enumerate(values):
                padded[row, width - value.shape[1] :] = value[0]
            out[key] = padded
        else:
            shape = [max(sizes) for sizes in zip(*(v.shape[1:] for v in values), strict=True)]
            out[key] = torch.cat([_pad_to(v, shape) for v in values])
    return out


def _pad_to(value: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(value.shape[1:]) == shape:
        return value
    padded = value.new_zeros((value.shape[0], *shape))
    padded[(slice(None), *(slice(0, n) for n in value.shape[1:]))] = value
    return padded
