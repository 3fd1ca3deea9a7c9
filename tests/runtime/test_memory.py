"""Memory budgets from the device's free memory, and the nestable MemoryMeter (probe.runtime.memory)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import probe.runtime.memory as memory
from probe.errors import UserError
from probe.probes.ntk import empirical_ntk, ntk_topk_lanczos
from probe.probes.surface import loss_surface, random_directions
from probe.runtime.memory import (BUDGET_CAP_BYTES, DEFAULT_BUDGET_BYTES, FREE_FRACTION, MemoryMeter, memory_budget,
                                  peak_allocated, reset_peak_allocated)

GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# memory_budget
# ---------------------------------------------------------------------------------------------


def test_cpu_budget_is_the_fixed_default_or_the_request():
    assert memory_budget(None, "cpu") == DEFAULT_BUDGET_BYTES == 2 * GIB
    assert memory_budget(123_456, "cpu") == 123_456
    assert memory_budget(5e12, "cpu") == 5_000_000_000_000          # no device limit known on the host
    for bad in (0, -1, float("nan"), float("inf"), True, "2"):
        with pytest.raises(UserError, match="memory_budget_bytes must be positive"):
            memory_budget(bad, "cpu", name="memory_budget_bytes")


def test_device_budget_is_a_capped_fraction_of_the_free_memory():
    free = (10 * GIB, 80 * GIB)
    assert memory_budget(None, "cuda:0", free=free) == int(FREE_FRACTION * 10 * GIB)
    assert memory_budget(None, "cuda:0", free=(79 * GIB, 80 * GIB)) == int(0.75 * 79 * GIB)   # an idle H100
    assert memory_budget(None, "cuda:0", free=(139 * GIB, 141 * GIB)) == BUDGET_CAP_BYTES == 64 * GIB
    assert memory_budget(None, "cuda:0", free=(0, 80 * GIB)) == 1  # nothing free: the planner says no plan fits
    assert memory_budget(3 * GIB, "cuda:0", free=free) == 3 * GIB
    assert memory_budget(10 * GIB, "cuda:0", free=free) == 10 * GIB
    with pytest.raises(UserError, match=r"memory_gb of 12 GiB exceeds the 10 GiB free on cuda:0 \(of 80 GiB\)"):
        memory_budget(12 * GIB, "cuda:0", name="memory_gb", free=free)


def test_device_memory_is_none_off_cuda():
    assert memory.device_memory("cpu") is None


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return model, torch.randn(12, 6, dtype=torch.float64)


def test_the_probes_plan_by_the_device_budget(monkeypatch):
    """With the device's free memory reported small (as on a full GPU), the default budget is a fraction
    of it and the planners refuse what does not fit it; an explicit budget above it is refused up front."""
    model, x = _mlp()
    ref = empirical_ntk(model, x, dtype=torch.float64)                        # CPU: the 2 GiB default
    seen = []

    def small(device):
        seen.append(torch.device(device).type)
        return 2000, 80 * GIB
    monkeypatch.setattr(memory, "device_memory", small)
    with pytest.raises(UserError, match="memory_budget_bytes"):                # 1500 bytes: no plan fits
        empirical_ntk(model, x, dtype=torch.float64)
    with pytest.raises(UserError, match="exceeds the 1.86e-06 GiB free"):
        empirical_ntk(model, x, dtype=torch.float64, memory_budget_bytes=GIB)
    with pytest.raises(UserError, match="exceeds"):
        ntk_topk_lanczos(model, x, k=2, dtype=torch.float64, memory_budget_bytes=GIB)
    dirs = random_directions(model, dims=1, seed=0)
    y = torch.arange(12) % 3
    with pytest.raises(UserError, match="memory_gb of 1 GiB exceeds"):
        loss_surface(model, x, y, dirs, "-1:1:3", memory_gb=1.0)
    with pytest.raises(UserError, match="memory budget .* is too small"):
        loss_surface(model, x, y, dirs, "-1:1:3")
    assert seen and set(seen) == {"cpu"}
    monkeypatch.setattr(memory, "device_memory", lambda device: (4 * GIB, 80 * GIB))
    res = empirical_ntk(model, x, dtype=torch.float64)                        # 3 GiB: the same kernel
    assert torch.allclose(torch.as_tensor(res.kernel), torch.as_tensor(ref.kernel), rtol=1e-12, atol=0)


def test_probe_options_default_to_the_device_budget():
    from probe.probes.ntk.probe import NTKParams
    from probe.probes.surface.probe import SurfaceParams

    assert NTKParams().memory_gb == 0.0 and SurfaceParams().memory_gb == 0.0    # 0: memory_budget's default
    for params in (NTKParams, SurfaceParams):
        with pytest.raises(UserError, match="memory budget"):
            params(memory_gb=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_budget_from_mem_get_info():
    dev = torch.device("cuda", torch.cuda.current_device())
    free, total = memory.device_memory(dev)
    driver_free, driver_total = torch.cuda.mem_get_info(dev)
    assert total == driver_total and driver_free <= free <= total
    assert memory_budget(None, dev) == pytest.approx(min(FREE_FRACTION * free, BUDGET_CAP_BYTES), rel=0.05)
    with pytest.raises(UserError, match="exceeds"):
        memory_budget(total + GIB, dev)


# ---------------------------------------------------------------------------------------------
# MemoryMeter on CUDA: the bookkeeping against a stand-in allocator
# ---------------------------------------------------------------------------------------------


class _Allocator:
    """The allocator's counters as CUDA keeps them: bytes allocated, and a peak that only a reset lowers."""

    def __init__(self):
        self.allocated = 0
        self.peak = 0
        self.resets = 0
        self.warmed = False

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n):
        self.allocated -= n

    def reset(self, device):
        self.resets += 1
        self.peak = self.allocated

    def warm_up(self, device):           # the cuBLAS workspace, made once and kept
        if not self.warmed:
            self.alloc(1000)
            self.warmed = True


@pytest.fixture
def fake_cuda(monkeypatch):
    a = _Allocator()
    monkeypatch.setattr(memory, "_cuda_sync", lambda device: None)
    monkeypatch.setattr(memory, "_cuda_allocated", lambda device: a.allocated)
    monkeypatch.setattr(memory, "_cuda_peak", lambda device: a.peak)
    monkeypatch.setattr(memory, "_cuda_reset_peak", a.reset)
    monkeypatch.setattr(memory, "_cuda_warm_up", a.warm_up)
    monkeypatch.setattr(memory, "_CARRIED", {})
    monkeypatch.setattr(memory, "_ACTIVE", [])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return a


def test_meter_excludes_the_first_use_workspace(fake_cuda):
    a = fake_cuda
    a.alloc(50)                                      # tensors held before: not counted
    with MemoryMeter("cuda:0") as m:
        a.alloc(300)
        a.free(300)
    assert m.peak_bytes == 300                       # not 1300: the workspace came before the start
    assert a.allocated == 1050


def test_meters_nest_and_keep_the_outer_peak(fake_cuda):
    a = fake_cuda
    dev = "cuda:0"
    reset_peak_allocated(dev)
    a.alloc(10)                                      # + the workspace the first meter makes: 1010
    with MemoryMeter(dev) as outer:
        a.alloc(500)
        a.free(500)                                  # the outer code's peak: 500 above its start
        with MemoryMeter(dev) as inner:              # resets the allocator's counter
            a.alloc(200)
            a.free(200)
        a.alloc(100)
        with MemoryMeter(dev) as inner2:
            with MemoryMeter(dev) as innermost:
                a.alloc(50)
                a.free(50)
            a.alloc(700)
            a.free(700)
        a.free(100)
    assert inner.peak_bytes == 200 and innermost.peak_bytes == 50 and inner2.peak_bytes == 700
    assert outer.peak_bytes == 800                   # 100 held + 700 inside inner2, above the 500 earlier
    assert a.resets >= 4
    assert peak_allocated(dev) == 1010 + 800          # as if no meter had reset the counter
    assert peak_allocated("cuda") == 1010 + 800       # the current device by another name
    reset_peak_allocated("cuda")
    assert peak_allocated(dev) == 1010


def test_an_outer_peak_before_the_inner_meter_survives_it(fake_cuda):
    a = fake_cuda
    with MemoryMeter("cuda:1") as outer:
        a.alloc(4000)
        a.free(4000)
        with MemoryMeter("cuda:1") as inner:
            a.alloc(10)
            a.free(10)
        with MemoryMeter("cuda:0"):                   # another device's meter leaves this one alone
            pass
    assert (inner.peak_bytes, outer.peak_bytes) == (10, 4000)


def test_cpu_meters_nest():
    with MemoryMeter("cpu") as outer:
        big = torch.empty(1000, dtype=torch.float64)
        del big
        with MemoryMeter("cpu") as inner:
            small = torch.empty(10, dtype=torch.float64)
            del small
    assert inner.peak_bytes == 80 and outer.peak_bytes == 8000


_GPU_SCRIPT = """
import torch
from probe.runtime.memory import MemoryMeter, peak_allocated, reset_peak_allocated
dev = torch.device("cuda", 0)
a = torch.randn(256, 256, device=dev)
reset_peak_allocated(dev)
big = torch.empty(64 << 20, dtype=torch.uint8, device=dev); del big
with MemoryMeter(dev) as m:            # the first matmul of the process: cuBLAS makes its workspace
    b = a @ a
    del b
with MemoryMeter(dev) as m2:
    b = a.double() @ a.double()
    del b
assert 256 * 256 * 4 <= m.peak_bytes <= 256 * 256 * 4 + 4096, m.peak_bytes
assert 3 * 256 * 256 * 8 <= m2.peak_bytes <= 3 * 256 * 256 * 8 + 4096, m2.peak_bytes
assert peak_allocated(dev) >= (64 << 20) + 256 * 256 * 4, peak_allocated(dev)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_meter_counts_the_product_not_the_workspace():
    """In a fresh process, so that the metered matmul is cuBLAS's first use."""
    out = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_meter_and_ntk_plan_do_not_import_dynamo():
    """The meter and the NTK's flop count are dispatch modes that compile nothing: entering them
    must not import torch._dynamo (seconds of CPU time in every process that probes)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from probe.runtime.memory import MemoryMeter\n"
            "from probe import empirical_ntk\n"
            "m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
            "with MemoryMeter(torch.device('cpu')) as meter:\n"
            "    (m(torch.ones(5, 3)) ** 2).sum().backward()\n"
            "assert meter.peak_bytes > 0\n"
            "empirical_ntk(m, torch.randn(6, 3))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
