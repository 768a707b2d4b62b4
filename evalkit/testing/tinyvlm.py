r"""Build a tiny, randomly initialised vision-language model of one family, for tests.

Why: the hf-vlm backend has to be checked against the real transformers loading and generation
code of each family it claims to run, and no model hub is reachable. So each family is built
from its own config classes at toy size (hidden 64, 2 layers, a 2-layer vision encoder seeing
32-64 px images), with a byte-level BPE tokenizer trained here on a fixed corpus of sentences
about shapes, colours, counts and positions, the family's image tokens, left padding and a chat
template that lays image tokens out as the family does. Weights are random but seeded, so the
folder is byte-for-byte reproducible. Head counts (query and key/value) and widths are divisible
by 2 and 4, so tensor parallelism over 2 or 4 ranks splits them evenly.

Two tweaks keep the random model from being fully degenerate: a large init std (logits vary with
the input, images included), and up-scaled output rows for "\n" and the end-of-turn token, so
greedy generation sometimes stops early and stop sequences get exercised.

Usage::

    python -m evalkit.testing.tinyvlm {llava,llava_next,qwen2_vl,internvl} OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
MAX_POSITIONS = 2048
HIDDEN = 64
INIT_STD = 0.2  # large init so the random model's logits depend on its input
NEWLINE_LOGIT_SCALE = 3.0  # so greedy generation sometimes writes "\n\n" and stop sequences fire
EOS_LOGIT_SCALE = 2.0  # so it sometimes ends its turn early

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SHAPES = ("circle", "square", "triangle", "star", "line", "dot")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
COUNTS = ("one", "two", "three", "four", "five", "no")


def _chat_template(
    turn: str, generation_prompt: str, image: str, default_system: str = "", video: str | None = None
) -> str:
    """A chat template: ``default_system`` when the messages start without a system turn, each
    message as ``turn`` (a Jinja snippet where CONTENT stands for the message's text, images and
    videos, an image rendered as ``image``, a video as ``video``; a family without ``video`` fails
    on a video part rather than drop it), then ``generation_prompt`` when asked for."""
    video_part = f"{{{{ {video!r} }}}}" if video else "{{ raise_exception('this template renders no video') }}"
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ {image!r} }}}}"
        f"{{% elif part['type'] == 'video' %}}{video_part}"
        "{% else %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )
    system = (
        f"{{% if messages[0]['role'] != 'system' %}}{{{{ {default_system!r} }}}}{{% endif %}}" if default_system else ""
    )
    return (
        f"{system}{{% for message in messages %}}{turn.replace('CONTENT', content)}{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{{{{ {generation_prompt!r} }}}}{{% endif %}}"
    )


def corpus() -> list[str]:
    """Fixed English sentences about coloured shapes, their number and where they are."""
    sentences = [
        f"There {'is' if count == 'one' else 'are'} {count} {colour} {shape}{'' if count == 'one' else 's'} {place}."
        for count, colour, shape, place in itertools.product(COUNTS, COLOURS, SHAPES, PLACES)
    ]
    sentences += [
        "What colour is the shape?",
        "How many shapes are in the image?",
        "Where is the circle? Answer with one word.",
        "Describe the image in one sentence.",
        "Question: Is the square bigger than the star?\nAnswer: Yes",
        "The answer is (A). The answer is (B). The answer is (C). The answer is (D).",
        "You are a helpful assistant.",
    ]
    return sentences


def _train_tokenizer(specials: list[str], *, bos: str | None, eos: str, pad: str, extra: dict[str, str]):
    """Byte-level BPE on ``corpus()``; ``bos`` (when given) is prepended like Llama's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token=pad,
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        extra_special_tokens=extra,
    )


def _text_config(tokenizer, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_STD,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **extra,
    }


def _clip_vision(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
        initializer_range=INIT_STD,
    )


def _llava(tokenizer, template: str):
    from transformers import CLIPImageProcessorPil, LlamaConfig, LlavaConfig, LlavaProcessor

    config = LlavaConfig(
        vision_config=_clip_vision(32),
        text_config=LlamaConfig(**_text_config(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token; without it the expansion is one short
        chat_template=template,
    )
    return config, processor


def _llava_next(tokenizer, template: str):
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=_clip_vision(32),
        text_config=LlamaConfig(**_text_config(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    return config, processor


# Qwen2-VL and Qwen2.5-VL share their text rotary sections (scaled to the tiny head) and tokens.
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen_vision_tokens(tokenizer) -> dict[str, Any]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "tie_word_embeddings": False,
    }


def _qwen2_vl(tokenizer, template: str):
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from evalkit.models.vlm_prompts import image_only

    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, rope_parameters=_QWEN_ROPE),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": HIDDEN,
            "mlp_ratio": 2,
            "num_heads": 4,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": INIT_STD,
        },
        **_qwen_vision_tokens(tokenizer),
    )
    # 16x16 .. 48x48 pixels after resizing: 4 to 36 image tokens (8x8 pixels each after merging).
    images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=4, merge_size=2)
    processor = image_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer, chat_template=template)
    return config, processor


def _qwen2_5_vl(tokenizer, template: str):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

    from evalkit.models.vlm_prompts import image_only

    config = Qwen2_5_VLConfig(
        # A clip at lmms-eval's qwen2_5_vl sizes (32 frames of 448x448 pixels) is 4,096 tokens.
        text_config=_text_config(tokenizer, rope_parameters=_QWEN_ROPE, max_position_embeddings=8192),
        # Qwen2.5-VL's patches (14 px, merged 2x2) and windows (112 px) in the first block, full
        # attention in the second, as Qwen2.5-VL alternates them. Real patch sizes keep images cheap
        # at the sizes lmms-eval's qwen2_5_vl class scales them to (at least 448x448 pixels).
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 4,
            "out_hidden_size": HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "initializer_range": INIT_STD,
        },
        **_qwen_vision_tokens(tokenizer),
    )
    # 56x56 .. 112x112 pixels after resizing: 4 to 16 image tokens (28x28 pixels each after merging).
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    processor = image_only(Qwen2_5_VLProcessor)(image_processor=images, tokenizer=tokenizer, chat_template=template)
    return config, processor


def _llava_onevision(tokenizer, template: str):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from evalkit.models.vlm_prompts import image_only

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=INIT_STD,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_config(tokenizer)),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    images = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=images,
        tokenizer=tokenizer,
        num_image_tokens=16,  # (32 / 8) ** 2 patches
        vision_feature_select_strategy="full",
        chat_template=template,
    )
    return config, processor


def _internvl(tokenizer, template: str):
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLProcessor, Qwen2Config

    from evalkit.models.vlm_prompts import image_only

    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": [32, 32],
            "patch_size": [8, 8],
            "initializer_range": INIT_STD,
        },
        text_config=Qwen2Config(**_text_config(tokenizer)),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=4,  # (32 / 8) ** 2 patches, pixel-shuffled by downsample_ratio 0.5
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    images = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = image_only(InternVLProcessor)(
        image_processor=images, tokenizer=tokenizer, image_seq_length=4, chat_template=template
    )
    return config, processor


@dataclass(frozen=True)
class Family:
    """What one family's tokenizer and chat format look like, and how its config is built."""

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    template: str
    build: Callable[[Any, str], tuple[Any, Any]]
    extra: tuple[tuple[str, str], ...] = ()


_LLAVA_SPECIALS = ("<s>", "</s>", "<pad>", "<image>")
_CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CHATML_TURN = "{{ '<|im_start|>' + message['role'] + '\\n' }}CONTENT{{ '<|im_end|>\\n' }}"


_QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _chatml_family(
    build: Callable[..., Any],
    specials: tuple[str, ...],
    image: str,
    video: str,
    *,
    default_system: str = "",
    extra: tuple[tuple[str, str], ...] = (),
) -> Family:
    """A ChatML family (Qwen2's tokens and turns): its own special tokens and image and video parts."""
    return Family(
        specials=(*_CHATML_SPECIALS, *specials),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template=_chat_template(
            _CHATML_TURN, "<|im_start|>assistant\n", image, default_system=default_system, video=video
        ),
        build=build,
        extra=extra,
    )


def _qwen_family(build: Callable[..., Any]) -> Family:
    """Qwen2-VL's and Qwen2.5-VL's prompt format: ChatML with a default system turn, an image or a
    video wrapped in vision start/end tokens."""
    return _chatml_family(
        build,
        ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|vision_start|><|video_pad|><|vision_end|>",
        default_system=_QWEN_SYSTEM,
    )


FAMILIES: dict[str, Family] = {
    # LLaVA-1.5 (Vicuna): "USER: <image>\nWhat is it? ASSISTANT:"
    "llava": Family(
        specials=_LLAVA_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        template=_chat_template(
            "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}CONTENT{{ ' ' }}",
            "ASSISTANT:",
            "<image>\n",
        ),
        build=_llava,
    ),
    # LLaVA-NeXT (Mistral): "[INST] <image>\nWhat is it? [/INST]"
    "llava_next": Family(
        specials=_LLAVA_SPECIALS,
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        template=_chat_template(
            "{% if message['role'] == 'assistant' %}CONTENT{{ '</s>' }}"
            "{% elif message['role'] == 'system' %}CONTENT{{ '\\n\\n' }}"
            "{% else %}{{ '[INST] ' }}CONTENT{{ ' [/INST]' }}{% endif %}",
            "",
            "<image>\n",
        ),
        build=_llava_next,
    ),
    # Qwen2-VL: ChatML with a default system turn, an image wrapped in vision start/end tokens.
    "qwen2_vl": _qwen_family(_qwen2_vl),
    # Qwen2.5-VL: Qwen2-VL's prompt format and tokens, a vision tower with window attention.
    "qwen2_5_vl": _qwen_family(_qwen2_5_vl),
    # LLaVA-OneVision (Qwen2): ChatML with a default system turn, "<image>\n" and "<video>\n" parts.
    "llava_onevision": _chatml_family(
        _llava_onevision,
        ("<image>", "<video>"),
        "<image>\n",
        "<video>\n",
        default_system=_QWEN_SYSTEM,
        extra=(("image_token", "<image>"), ("video_token", "<video>")),
    ),
    # InternVL (transformers-native): ChatML, an image as "<IMG_CONTEXT>\n", expanded to <img>...</img>.
    "internvl": _chatml_family(
        _internvl,
        ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
        "<IMG_CONTEXT>\n",
        "<video>\n",
        extra=(
            ("start_image_token", "<img>"),
            ("end_image_token", "</img>"),
            ("context_image_token", "<IMG_CONTEXT>"),
            ("video_token", "<video>"),
        ),
    ),
}


def build_tiny_vlm(family: str, out_dir: Path, *, seed: int = 0, head_dim: int | None = None) -> Path:
    """Build the tokenizer, processor and a seeded tiny model of ``family``; save them to ``out_dir``.

    ``head_dim`` overrides the language model's attention head size (default 16); vLLM's CPU
    attention needs 32 or more. Qwen2-VL's rotary sections grow with it.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(list(spec.specials), bos=spec.bos, eos=spec.eos, pad=spec.pad, extra=dict(spec.extra))
    config, processor = spec.build(tokenizer, spec.template)
    if head_dim:
        _set_head_dim(config.text_config, head_dim)
    torch.manual_seed(seed)
    with _release_independent_init():
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[tokenizer.convert_tokens_to_ids("\u010a")] *= NEWLINE_LOGIT_SCALE  # byte-level symbol for "\n"
        head[tokenizer.eos_token_id] *= EOS_LOGIT_SCALE
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


@contextlib.contextmanager
def _release_independent_init() -> Iterator[None]:
    """Seeded weights that do not depend on the torch release. torch's ``trunc_normal_`` draws its
    values differently from one release to another (torch 2.11 through the inverse normal CDF,
    2.13 by rejection), and transformers draws SigLIP's patch embedding (LLaVA-OneVision's vision
    tower) with it; the same seed then built another model on a machine with torch 2.11. Here it
    draws normal values clipped to the bounds, as every release draws them."""
    import torch
    from transformers import initialization

    functions = initialization.TORCH_INIT_FUNCTIONS
    original = functions["trunc_normal_"]

    def clipped_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):  # noqa: ANN001, ANN202
        with torch.no_grad():
            return tensor.normal_(mean, std, generator=generator).clamp_(a, b)

    functions["trunc_normal_"] = clipped_normal
    try:
        yield
    finally:
        functions["trunc_normal_"] = original


# The image sizes a released Qwen2-VL or Qwen2.5-VL processor allows. The tiny processors' are
# narrower; parity runs widen them to these, so the sizes come from the lmms-eval class's own rule
# (tasks/lmms_models.py IMAGE_RULES), as with a real checkpoint.
RELEASED_QWEN_PIXELS = {"shortest_edge": 3136, "longest_edge": 12845056}


def with_released_pixels(model: Path, family: str) -> Path:
    """``model``'s processor widened to a released checkpoint's image sizes, for the Qwen families
    (others unchanged); returns ``model``."""
    if family in ("qwen2_vl", "qwen2_5_vl"):
        path = Path(model) / "processor_config.json"
        config = json.loads(path.read_text())
        config["image_processor"]["size"] = RELEASED_QWEN_PIXELS
        path.write_text(json.dumps(config, indent=2))
    return model


def _set_head_dim(text_config: Any, head_dim: int) -> None:
    default = HIDDEN // text_config.num_attention_heads
    if head_dim % default:
        raise ValueError(f"head_dim must be a multiple of {default}, got {head_dim}")
    text_config.head_dim = head_dim
    rope = getattr(text_config, "rope_parameters", None) or {}
    if "mrope_section" in rope:  # the sections split half a head's rotary dimensions
        rope["mrope_section"] = [n * head_dim // default for n in rope["mrope_section"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evalkit.testing.tinyvlm", description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-dim", type=int, help="attention head size (default 16; vLLM on CPU needs 32 or more)")
    args = parser.parse_args(argv)
    out = build_tiny_vlm(args.family, args.out_dir, seed=args.seed, head_dim=args.head_dim)
    print(f"wrote tiny {args.family} model and processor to {out}")


if __name__ == "__main__":
    main()
