"""Device choice and mixed precision: CPU paths here; CUDA paths only where a GPU is lent."""

from __future__ import annotations

import pytest
import torch

from p2pcompute.errors import TrainingError
from p2pcompute.training import device as devices

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_picks_cuda_only_when_present_and_allowed():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.select_device("auto", ("cpu", "cuda")).type == expected
    assert devices.select_device("auto", ("cpu",)) == CPU
    assert devices.select_device("cpu", ("cpu", "cuda")) == CPU


def test_refusals_name_the_reason():
    with pytest.raises(TrainingError, match="trains on cuda"):
        devices.select_device("cpu", ("cuda",))
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="needs a CUDA GPU"):
            devices.select_device("auto", ("cuda",))
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            devices.select_device("cuda", ("cpu", "cuda"))


def test_training_leaves_a_core_to_the_swarm():
    """torch's default intra-op threads (every core) crowded out p2pd, the DHT and the averagers on a small machine;
    the trainer's default leaves them one core, a config value wins, and one core is still one thread."""
    assert [devices.cpu_threads(0, cores) for cores in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert devices.cpu_threads(6, cores=2) == 6
    assert devices.cpu_threads() >= 1


def test_cpu_trains_in_fp32_without_scaling():
    assert devices.autocast_dtype(CPU) is None and devices.grad_scaler(CPU, None) is None
    with devices.autocast(CPU, None):
        assert (torch.ones(2) @ torch.ones(2)).dtype == torch.float32
    devices.limit_memory(CPU, 0.5)  # no-op on CPU


@needs_cuda
def test_cuda_mixed_precision_step():
    gpu = devices.select_device("cuda", ("cuda",))
    dtype = devices.autocast_dtype(gpu)
    assert dtype in (torch.bfloat16, torch.float16)
    scaler = devices.grad_scaler(gpu, dtype)
    assert (scaler is None) == (dtype == torch.bfloat16)
    model = torch.nn.Linear(8, 1).to(gpu)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with devices.autocast(gpu, dtype):
        loss = model(torch.randn(4, 8, device=gpu)).pow(2).mean()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
