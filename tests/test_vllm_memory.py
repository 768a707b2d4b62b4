"""Memory sizing for vLLM engines (evalkit.models.vllm_memory): plain numbers, no vLLM needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evalkit.errors import UsageError
from evalkit.models.vllm_memory import (
    GiB,
    KVShape,
    ModelFacts,
    NodeFacts,
    cpu_kv_cache_bytes,
    kv_shape,
    mem_available,
    minimum_kv_bytes,
    plan,
    run_weight_bytes,
    useful_kv_bytes,
    weight_bytes,
)

# The demo's tiny Llama with 32-dim heads: 2 layers, 2 KV heads, float32.
TINY = KVShape(layers=2, kv_heads=2, head_dim=32, dtype_bytes=4)
# A Llama-2-7B-like model in bfloat16: 32 layers, 32 KV heads of 128.
LLAMA7B = KVShape(layers=32, kv_heads=32, head_dim=128, dtype_bytes=2)


def node(available_gib: float, user: str | None = None, gpus: int = 0) -> NodeFacts:
    return NodeFacts(user_kv_space=user, available=int(available_gib * GiB), gpus=gpus)


def model(shape: KVShape | None, *, weights_gib: float, vocab: int, max_model_len: int, tp: int = 1) -> ModelFacts:
    return ModelFacts(shape=shape, weights=int(weights_gib * GiB), vocab=vocab, max_model_len=max_model_len, tp=tp)


def test_bytes_per_token_split_over_tp_and_replicated_past_the_kv_heads():
    assert TINY.bytes_per_token(1) == 2 * 2 * 2 * 32 * 4 == 1024
    assert TINY.bytes_per_token(2) == 512
    assert TINY.bytes_per_token(4) == 512  # 2 KV heads over 4 ranks: each rank keeps one
    assert LLAMA7B.bytes_per_token(1) == 512 * 1024


def test_kv_shape_from_a_config():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert kv_shape(config, "float32") == TINY
    no_head_dim = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)
    assert kv_shape(no_head_dim, "bfloat16") == LLAMA7B
    vlm = SimpleNamespace(text_config=config, vision_config=object())
    assert kv_shape(vlm, "float32") == TINY
    mla = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=32, kv_lora_rank=512)
    assert kv_shape(mla, "bfloat16") is None


def test_minimum_is_one_sequence_in_whole_blocks_plus_the_null_block():
    assert minimum_kv_bytes(1024, 128) == 2 * 128 * 1024
    assert minimum_kv_bytes(1024, 129) == 3 * 128 * 1024
    assert useful_kv_bytes(1024, 128, 256) == (256 + 1) * 128 * 1024


def test_the_tiny_model_gets_what_its_scheduler_can_fill_on_any_node():
    tiny = model(TINY, weights_gib=0.001, vocab=512, max_model_len=128)
    for available, ranks in ((22, 1), (22, 2), (8, 4)):
        chosen = plan(tiny, node(available), "cpu", ranks)["kv_cache_memory_bytes"]
        assert chosen == useful_kv_bytes(1024, 128, 256)  # about 32 MiB


def test_a_large_model_divides_the_node_among_its_ranks():
    big = model(LLAMA7B, weights_gib=12.6, vocab=32000, max_model_len=4096)
    one = plan(big, node(100), "cpu", 1)["kv_cache_memory_bytes"]
    two = plan(big, node(100), "cpu", 2)["kv_cache_memory_bytes"]
    reserve = GiB + 2 * 4096 * 32000 * 4
    assert one == int(100 * GiB * 0.9) - int(12.6 * GiB) - reserve
    assert two == int(100 * GiB * 0.9) // 2 - int(12.6 * GiB) - reserve
    assert 2 * (two + int(12.6 * GiB)) < 100 * GiB * 0.9  # both ranks fit on the node


def test_tensor_parallel_ranks_each_hold_a_shard_of_weights_and_heads():
    big = model(LLAMA7B, weights_gib=12.6, vocab=32000, max_model_len=4096, tp=2)
    chosen = plan(big, node(100), "cpu", 2)["kv_cache_memory_bytes"]
    reserve = GiB + 2 * 8192 * 32000 * 4
    assert chosen == int(100 * GiB * 0.9) // 2 - int(12.6 * GiB) // 2 - reserve


def test_a_node_too_small_is_refused_in_one_line_before_the_engine_starts():
    big = model(LLAMA7B, weights_gib=12.6, vocab=32000, max_model_len=4096)
    with pytest.raises(UsageError) as caught:
        plan(big, node(23), "cpu", 2)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("vLLM on CPU needs")
    assert "needs 2.06 GiB of KV cache per process" in message  # 32 blocks + the null block, 64 MiB each
    assert "2 process(es) on this node leave 10.35 GiB each (23.00 GiB available)" in message
    assert "fewer processes" in message and "--max-length" in message and "VLLM_CPU_KVCACHE_SPACE" in message


def test_refusal_when_room_is_just_below_one_sequence():
    minimum = minimum_kv_bytes(1024, 128)
    args = {"local_ranks": 1, "weights_per_rank": 0, "reserve_per_rank": 0, "useful": 10 * minimum}
    assert minimum <= cpu_kv_cache_bytes(available=int(minimum / 0.9) + 16, minimum=minimum, **args) < minimum + 32
    with pytest.raises(UsageError):
        cpu_kv_cache_bytes(available=int(minimum / 0.9) - 16, minimum=minimum, **args)


def test_a_user_set_kv_cache_space_is_left_to_vllm():
    big = model(LLAMA7B, weights_gib=12.6, vocab=32000, max_model_len=4096)
    assert plan(big, node(23, user="40"), "cpu", 8) == {}  # not refused, not overridden


def test_a_model_of_unknown_shape_gets_the_node_budget():
    odd = model(None, weights_gib=1, vocab=1000, max_model_len=2048)
    chosen = plan(odd, node(20), "cpu", 2)["kv_cache_memory_bytes"]
    assert chosen == int(20 * GiB * 0.9) // 2 - GiB - (GiB + 2 * 4096 * 1000 * 4)


def test_on_cuda_more_ranks_than_gpus_on_a_node_is_refused_before_any_engine():
    big = model(LLAMA7B, weights_gib=12.6, vocab=32000, max_model_len=4096)
    assert plan(big, node(100, gpus=2), "cuda", 2) == {}
    assert plan(big, node(100, gpus=8), "cuda", 4) == {}
    with pytest.raises(UsageError) as error:
        plan(big, node(100, gpus=1), "cuda", 2)
    assert str(error.value) == (
        "--backend vllm runs one engine per GPU, but 2 processes on this node share 1 GPU(s); start at most 1 "
        "process(es) per node (one per GPU), with --tp to split a model over them"
    )


def test_weights_as_the_engine_holds_them(tmp_path):
    (tmp_path / "model-00001.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"x" * 500)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 9999)  # a second copy in another format: not counted
    (tmp_path / "config.json").write_text("{}")
    assert weight_bytes(tmp_path) == 1500
    assert run_weight_bytes(1500, "bfloat16", "float32") == 3000
    assert run_weight_bytes(1500, "float32", "bfloat16") == 750
    assert run_weight_bytes(1500, "auto", "float32") == 1500


def test_mem_available_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683664 kB\nMemFree:  1000 kB\nMemAvailable:   21993740 kB\n")
    assert mem_available(meminfo) == 21993740 * 1024
    assert mem_available(tmp_path / "absent") > 0
