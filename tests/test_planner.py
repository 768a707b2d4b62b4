"""The planner on real model shapes (configs only, no weights), checked against hand arithmetic.

Hand arithmetic for Llama-2-7B in float16 at tp=1, max_len 4096, batch 1:
  parameters = 32000*4096*2 (embedding + LM head) + 32*(4*4096*4096 + 3*4096*11008 + 2*4096) + 4096
             = 6,738,415,616 -> weights 13,476,831,232 B
  KV cache   = 2 * 32 layers * 32 heads * 128 * 4096 * 2 B = 2,147,483,648 B
  activations= 4096*(2*4096 + 11008)*2 + 4096*32000*(2 + 4) = 943,718,400 B
  total      = int(16,568,033,280 * 1.10) + 2**30 = 19,298,578,432 B (17.97 GiB)
Llama-2-70B (80 layers, 8192 hidden, 64 heads, 8 KV heads, 28672 MLP) in float16:
  tp=8: weights (68,713,185,280/8 + 263,462,912)*2 = 17,705,222,144; KV 2*80*1*128*4096*2 = 167,772,160;
        activations 4096*(16384 + 3584)*2 + 786,432,000 = 950,009,856; total 21,779,046,400 B (20.28 GiB)
  tp=4: weights 34,883,518,464; KV 335,544,320; activations 979,369,984; total 40,892,017,868 B (38.08 GiB)
"""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from evalkit.planner import GIB, estimate, plan, read_shape, recommend

SHAPES = {
    "llama-2-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        intermediate_size=13824,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "yi-34b": dict(
        hidden_size=7168,
        num_hidden_layers=60,
        num_attention_heads=56,
        num_key_value_heads=8,
        intermediate_size=20480,
        vocab_size=64000,
        max_position_embeddings=4096,
    ),
    "llama-2-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = {}
    for name, kwargs in SHAPES.items():
        folder = tmp_path_factory.mktemp(name)
        LlamaConfig(**kwargs, dtype="float16").save_pretrained(folder)
        out[name] = read_shape(str(folder))
    return out


def test_parameter_counts(shapes):
    assert shapes["llama-2-7b"].parameters == 6_738_415_616
    assert shapes["llama-2-70b"].parameters == 68_976_648_192


def test_llama_7b_cell(shapes):
    row = estimate(shapes["llama-2-7b"], tp=1, gpus=8, max_len=4096, batch=1)
    assert (row.weights, row.kv_cache, row.activations) == (13_476_831_232, 2_147_483_648, 943_718_400)
    assert row.total == 19_298_578_432


def test_llama_70b_cells(shapes):
    tp8 = estimate(shapes["llama-2-70b"], tp=8, gpus=8, max_len=4096, batch=1)
    assert (tp8.weights, tp8.kv_cache, tp8.activations, tp8.total) == (
        17_705_222_144,
        167_772_160,
        950_009_856,
        21_779_046_400,
    )
    tp4 = estimate(shapes["llama-2-70b"], tp=4, gpus=8, max_len=4096, batch=1)
    assert (tp4.weights, tp4.kv_cache, tp4.activations, tp4.total) == (
        34_883_518_464,
        335_544_320,
        979_369_984,
        40_892_017_868,
    )


@pytest.mark.parametrize(
    ("model", "gpu_mem", "expected_tp"),
    [
        ("llama-2-7b", 40, 1),
        ("llama-2-7b", 80, 1),
        ("llama-2-13b", 40, 1),
        ("llama-2-13b", 80, 1),
        ("yi-34b", 40, 2),
        ("yi-34b", 80, 1),
        ("llama-2-70b", 40, 4),
        ("llama-2-70b", 80, 2),
    ],
)
def test_recommendation_on_8_gpus(shapes, model, gpu_mem, expected_tp):
    rows = plan(shapes[model], gpus=8, max_len=4096, batch=1)
    assert [r.tp for r in rows] == [1, 2, 4, 8]
    best = recommend(rows, gpu_mem)
    assert best.tp == expected_tp and best.dp == 8 // expected_tp
    assert best.total <= gpu_mem * GIB
    smaller = [r for r in rows if r.tp < expected_tp]
    assert all(r.total > gpu_mem * GIB or r.problem for r in smaller)


def test_sharding_rules(shapes):
    rows = {r.tp: r for r in plan(shapes["yi-34b"], gpus=16, max_len=4096, batch=1)}
    assert rows[16].problem == "tp(16) does not divide attention heads(56)"
    assert rows[8].problem is None
