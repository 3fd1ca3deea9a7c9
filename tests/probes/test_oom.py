"""Running out of (GPU) memory is never read as "this method / vmap does not work on this model",
and the small device crashes of the probes (labels and devices given by a library caller)."""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import probe.probes.hessian._operators as hessian_operators
import probe.probes.ntk.api as ntk_api
import probe.probes.surface.api as surface_api
from probe.cli.common import run_command
from probe.errors import OutOfMemory, UserError
from probe.probes.gradvar import signal_propagation
from probe.probes.hessian import curvature_operator
from probe.probes.ntk import KERNEL_METHODS, empirical_ntk, ntk_topk_lanczos
from probe.probes.surface import loss_surface, random_directions

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB\nmore lines"


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError(OOM_TEXT)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()


def _data(n=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.arange(n) % 3


@pytest.mark.parametrize("method", ["auto", "jacobian", "layerwise", "ntvp"])
def test_ntk_kernel_out_of_memory_is_not_a_fallback(method, monkeypatch):
    x, _ = _data()
    for name, m in KERNEL_METHODS.items():                 # every kernel method's runner runs out of memory
        monkeypatch.setitem(KERNEL_METHODS, name, dataclasses.replace(m, run=_oom))
    with pytest.raises(OutOfMemory, match=r"out of memory in the NTK kernel \(method \w+\) \(CUDA out of memory"
                                          r"\. Tried .*\); use smaller sizes") as info:
        empirical_ntk(_model(), x, method=method, dtype=torch.float64)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert "\n" not in str(info.value)


def test_ntk_per_sample_jacobians_out_of_memory_is_not_a_loop(monkeypatch):
    x, _ = _data()
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: _oom)
    with pytest.raises(OutOfMemory, match="per-sample Jacobians"):
        empirical_ntk(_model(), x, method="jacobian", dtype=torch.float64)


@pytest.mark.parametrize("operator,method", [("_GramOperator", "auto"), ("_NtkOperator", "ntvp")])
def test_ntk_lanczos_out_of_memory_is_not_a_fallback(operator, method, monkeypatch):
    x, _ = _data()
    used = ntk_topk_lanczos(_model(), x, k=2, dtype=torch.float64, method=method).method
    assert used == {"auto": "gram"}.get(method, method)
    monkeypatch.setattr(getattr(ntk_api, operator), "matmat", _oom)   # auto: gram first, ntvp on a model error
    with pytest.raises(OutOfMemory, match=r"out of memory in the NTK Lanczos \((gram|ntvp) operator\)"):
        ntk_topk_lanczos(_model(), x, k=2, dtype=torch.float64, method=method)


def test_hessian_vmap_out_of_memory_is_not_a_loop(monkeypatch):
    model, (x, y) = _model(), _data()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    monkeypatch.setattr(hessian_operators, "vmap", lambda *a, **k: _oom)
    op = curvature_operator(model, x, y, operator="ggn")          # auto: vmap, falls back on a model error
    with pytest.raises(OutOfMemory, match=r"out of memory in the ggn products \(vmap over a block of 3 vectors\)"):
        op.matmat(V)
    assert op.vectorize != "loop" and not any("looped" in n for n in op.notes)


def test_surface_vmap_out_of_memory_is_not_a_loop(monkeypatch):
    model, (x, y) = _model(), _data()
    monkeypatch.setattr(surface_api, "evaluate_points", _oom)
    with pytest.raises(OutOfMemory, match="out of memory in the surface's vmap trial"):
        loss_surface(model, x, y, random_directions(model, 1), "-1:1:3", vectorize="auto")


def test_out_of_memory_is_a_user_error():
    assert issubclass(OutOfMemory, UserError) and issubclass(torch.OutOfMemoryError, RuntimeError)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError(OOM_TEXT), MemoryError(),
                                   OutOfMemory("out of memory in step x (CUDA out of memory); use smaller sizes")])
def test_cli_reports_out_of_memory_in_one_line(error, capsys):
    def command(args):
        raise error
    assert run_command(command, argparse.Namespace(), "probe test") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("probe test: error: out of memory")


def test_signal_propagation_with_device_auto_and_rebuild():
    x, y = _data(12)

    def rebuild(seed):
        torch.manual_seed(seed)
        return _model()
    sig = signal_propagation(_model(), x, y, rebuild=rebuild, seeds=(0, 1), device="auto", dtype=torch.float64)
    ref = signal_propagation(_model(), x, y, rebuild=rebuild, seeds=(0, 1), dtype=torch.float64)
    np.testing.assert_array_equal(sig.act_var, ref.act_var)
    np.testing.assert_array_equal(sig.grad_norm, ref.grad_norm)
