r"""Build a tiny, randomly initialised Llama model and tokenizer for tests.

Why: evalkit must reproduce lm-evaluation-harness numbers, and that can only be
checked against a real Hugging Face model evaluated by both tools.  No model
hub is reachable, so we build one locally: a byte-level BPE tokenizer trained on
the bundled demo task data (so prompts tokenize into a realistic mix of merged
and byte tokens) and a ~160k-parameter ``LlamaForCausalLM``.  The weights are
random but seeded, so the output is byte-for-byte reproducible and small enough
(< 1 MB) to commit as a test fixture.  Two tweaks keep the random model from
being fully degenerate: a large init std (logits vary by position and input),
and an up-scaled newline row in the output layer, so greedy generation
sometimes emits "\n\n" and generation stop sequences get exercised.

Usage::

    python -m evalkit.testing.tinymodel OUT_DIR [--tasks-dir DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

DEFAULT_TASKS_DIR = Path(__file__).resolve().parent.parent / "bundled_tasks" / "demo"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 512
MAX_POSITIONS = 128
NEWLINE_LOGIT_SCALE = 3.0


def _strings(value: Any) -> Iterator[str]:
    """Yield every string nested anywhere inside a decoded JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def corpus_from_tasks(tasks_dir: Path) -> list[str]:
    """Collect all string values from the ``*.jsonl`` files under ``tasks_dir`` (sorted)."""
    texts: list[str] = []
    for path in sorted(tasks_dir.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(_strings(json.loads(line)))
    if not texts:
        raise ValueError(f"no text found in *.jsonl files under {tasks_dir}")
    return texts


def _train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer that prepends ``<s>`` like Llama (no EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(
    out_dir: Path,
    corpus: list[str],
    *,
    seed: int = 0,
    head_dim: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 176,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = MAX_POSITIONS,
    init_std: float = 0.2,
    dtype: str = "float32",
    newline_scale: float = NEWLINE_LOGIT_SCALE,
) -> Path:
    """Train the tokenizer on ``corpus``, build a seeded tiny Llama, save both to ``out_dir``.

    The defaults are the test model. ``head_dim`` overrides the default of 16 (hidden size over
    heads); vLLM's CPU attention takes head sizes from 32 up. The benchmarks build larger models
    from the same tokenizer with the size keywords; ``max_positions`` is also the tokenizer's
    ``model_max_length``, and a ``newline_scale`` of 1.0 leaves the output layer as initialised.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(corpus)
    tokenizer.model_max_length = max_positions
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        **({"head_dim": head_dim} if head_dim else {}),
        max_position_embeddings=max_positions,
        initializer_range=init_std,  # the test model's is large, so its random logits are not flat
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    newline_id = tokenizer.convert_tokens_to_ids("\u010a")  # byte-level symbol for "\n"
    with torch.no_grad():
        model.lm_head.weight[newline_id] *= newline_scale
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# A minimal chat format of evalkit's own: a role header line per turn, each turn closed by </s>.
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def with_chat_template(model_dir: Path, out_dir: Path) -> Path:
    """A copy of a model folder whose tokenizer has a chat template, for instruct-style runs."""
    import shutil

    out_dir = Path(out_dir)
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evalkit.testing.tinymodel", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--tasks-dir", type=Path, default=DEFAULT_TASKS_DIR, help="folder whose *.jsonl files form the tokenizer corpus"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head-dim", type=int, help="attention head size (default 16; vLLM on CPU needs 32 or more)")
    args = parser.parse_args(argv)
    out = build_tiny_llama(args.out_dir, corpus_from_tasks(args.tasks_dir), seed=args.seed, head_dim=args.head_dim)
    print(f"wrote tiny Llama model and tokenizer to {out}")


if __name__ == "__main__":
    main()
