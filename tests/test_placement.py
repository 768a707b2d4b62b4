"""Model placement: which GPUs a rank may use, and the GPU path where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from evalkit.errors import UsageError
from evalkit.models.placement import rank_gpus

from conftest import model_args, run_evalkit


def test_each_rank_gets_its_own_block_of_gpus():
    assert rank_gpus(0, 2, visible=8) == [0, 1]
    assert rank_gpus(3, 2, visible=8) == [6, 7]
    assert [rank_gpus(r, 4, visible=8) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UsageError, match="at most 4 processes per node"):
        rank_gpus(4, 2, visible=8)


def test_gpus_per_rank_refused_without_cuda(tmp_path):
    run = run_evalkit(model_args("--tasks", "demo_mc", "--gpus-per-rank", "2"), output=tmp_path)
    assert run.returncode == 2
    assert "--gpus-per-rank needs CUDA devices" in run.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_split_model_stays_on_its_gpus(tmp_path):
    run = run_evalkit(
        ["--model", model_args()[1], "--tasks", "demo_mc", "--limit", "4", "--gpus-per-rank", "2", "--device", "cuda"],
        output=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
