"""What a training step moves to the device and how cuDNN is set for a run: the batches and
augmentations are the CPU generator's draws, bitwise the same as a per-draw reference (so runs and
resumes on the CPU are unchanged), reaching a GPU in one pinned copy per epoch (the order) and per
batch (the augmentation draws); cuDNN benchmarks its kernels on CUDA unless the run is deterministic,
recorded with the run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from probe.data import Augment, make_loader
from probe.data.batches import to_device
from probe.store import RunStore
from probe.training import TrainConfig, train
from probe.training.numerics import cudnn_benchmark, uses_cudnn_benchmark

SMALL = dict(epochs=1, limit_train=64, limit_test=32, batch_size=32, schedule="constant", lr=0.05)


def _reference_augment(x, p, hflip, gen):
    """The augmentation drawn and applied one draw at a time (crop rows, crop columns, flips)."""
    b, _, h, w = x.shape
    if p:
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        x = torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(b)])
    if hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.stack([xi.flip(2) if f else xi for xi, f in zip(x, flip)])
    return x


@pytest.mark.parametrize("p, hflip", [(2, True), (3, False), (0, True)])
def test_loader_batches_are_the_cpu_streams_draws(p, hflip):
    x = torch.randn(10, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    got = list(make_loader(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(5),
                           augment=Augment(p, hflip)))
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(10, generator=gen)
    for k, (xb, yb) in enumerate(got):
        idx = order[4 * k:4 * k + 4]
        assert torch.equal(yb, y[idx])
        assert torch.equal(xb, _reference_augment(x[idx], p, hflip, gen))


def test_to_device_on_the_cpu_is_the_tensor_itself():
    t = torch.arange(5)
    assert to_device(t, torch.device("cpu")) is t


def test_cudnn_benchmark_only_on_cuda_and_never_when_deterministic():
    assert uses_cudnn_benchmark(torch.device("cuda", 0), deterministic=False)
    assert not uses_cudnn_benchmark(torch.device("cuda", 0), deterministic=True)
    assert not uses_cudnn_benchmark(torch.device("cpu"), deterministic=False)


def test_cudnn_benchmark_is_set_for_the_block_and_put_back(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with cudnn_benchmark(True):
        assert torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.benchmark
    with pytest.raises(ZeroDivisionError), cudnn_benchmark(True):
        1 / 0
    assert not torch.backends.cudnn.benchmark
    with cudnn_benchmark(False):
        assert not torch.backends.cudnn.benchmark


def test_a_cpu_run_records_that_cudnn_does_not_benchmark(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_add", **SMALL), store)
    assert store.get_run(res.run_id)["config"]["resolved"]["cudnn_benchmark"] is False
    assert not torch.backends.cudnn.benchmark


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_gives_the_cpu_loaders_batches():
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(40)
    aug = Augment(2, True)
    cpu = list(make_loader(x, y, 16, shuffle=True, generator=torch.Generator().manual_seed(1), augment=aug))
    dev = list(make_loader(x.cuda(), y.cuda(), 16, shuffle=True, generator=torch.Generator().manual_seed(1),
                           augment=aug))
    for (xa, ya), (xb, yb) in zip(cpu, dev):
        assert xb.device.type == "cuda" and torch.equal(xb.cpu(), xa) and torch.equal(yb.cpu(), ya)
    assert to_device(torch.arange(3), torch.device("cuda")).device.type == "cuda"
    with cudnn_benchmark(uses_cudnn_benchmark(torch.device("cuda"), deterministic=False)):
        assert torch.backends.cudnn.benchmark
