"""Model placement: which GPUs a rank may use, and the GPU path where a GPU exists."""

from __future__ import annotations

import pytest
import torch
import transformers

from evalkit.errors import UsageError
from evalkit.models.device_map import split_device_map
from evalkit.models.placement import SPLIT_WEIGHT_SHARE, load_model, rank_gpus
from evalkit.parallel import Layout, Topology

from conftest import TINY_MODEL, model_args, run_evalkit


def test_each_rank_gets_its_own_block_of_gpus():
    assert rank_gpus(0, 2, visible=8) == [0, 1]
    assert rank_gpus(3, 2, visible=8) == [6, 7]
    assert [rank_gpus(r, 4, visible=8) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UsageError, match="at most 4 processes per node"):
        rank_gpus(4, 2, visible=8)


def test_models_load_without_hub_kernels():
    """transformers 5 swaps hub kernels in by default, fetched while loading (an offline CUDA
    machine fails there) and only for a model loaded onto GPUs; evalkit keeps one choice."""
    topo = Topology(layout=Layout(world_size=1), rank=0, local_rank=0, device=torch.device("cpu"), backend="gloo")
    model = load_model(str(TINY_MODEL), "float32", topo, trust_remote_code=False)
    assert getattr(model, "use_kernels", False) is False
    assert transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL).use_kernels  # the default it overrides


def test_gpus_per_rank_refused_without_cuda(tmp_path):
    run = run_evalkit(model_args("--tasks", "demo_mc", "--gpus-per-rank", "2"), output=tmp_path)
    assert run.returncode == 2
    assert "--gpus-per-rank needs CUDA devices" in run.stderr


def assert_split_over_two_gpus(results: dict, budgets: dict[int, int]) -> None:
    """What one rank splitting the tiny model over GPUs 0 and 1 records, and the map it loads with.

    ``results.json`` records the layout and the parameters the rank holds, not the device map; the
    map comes from ``split_device_map`` over the rank's GPUs and budgets (``placement``), so it is
    rebuilt here from the same inputs.
    """
    assert results["parallel"] == {
        "world_size": 1,
        "dp": 1,
        "tp": 1,
        "placement": "split",
        "gpus_per_rank": 2,
        "backend": "nccl",
        "device": "cuda",
    }
    # Split, not sharded: the one rank holds every parameter of the model, over its two GPUs.
    full = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL).parameters())
    assert results["parameters_per_rank"] == {"0": full}
    assert results["model"]["num_parameters_this_rank"] == full
    assert results["model"]["class"] == "LlamaForCausalLM"
    assert results["n-samples"]["demo_mc"]["effective"] == 4
    device_map = split_device_map(str(TINY_MODEL), transformers.AutoModelForCausalLM, [0, 1], budgets, "auto")
    assert set(device_map.values()) == {0, 1}, device_map
    assert device_map.get("model.embed_tokens") == 0, device_map
    layers = [gpu for name, gpu in device_map.items() if name.startswith("model.layers.")]
    assert layers == sorted(layers) and set(layers) == {0, 1}, device_map


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_split_model_stays_on_its_gpus(tmp_path):
    run = run_evalkit(
        ["--model", model_args()[1], "--tasks", "demo_mc", "--limit", "4", "--gpus-per-rank", "2", "--device", "cuda"],
        output=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    budgets = {gpu: int(torch.cuda.get_device_properties(gpu).total_memory * SPLIT_WEIGHT_SHARE) for gpu in (0, 1)}
    assert_split_over_two_gpus(run.results(), budgets)
