"""TF32 off around the probes that promise float32 / float64 accuracy (probe.runtime.precision)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probe.runtime.precision as precision
from probe.probes.gradvar import GradVarParams, gradient_variance
from probe.probes.hessian import hessian_spectrum
from probe.probes.interp import interpolation_paths
from probe.probes.ntk import empirical_ntk, ntk_spectrum, ntk_topk_lanczos
from probe.probes.saturation import saturation
from probe.probes.surface import loss_surface, random_directions
from probe.runtime.precision import TF32_NOTE, exact, exact_matmul, precision_flags

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

#: every public probe function that promises float32 / float64 accuracy
EXACT_FUNCTIONS = [empirical_ntk, ntk_spectrum, ntk_topk_lanczos, hessian_spectrum, loss_surface, gradient_variance,
                   interpolation_paths, saturation]


def _ieee(flags: dict) -> bool:
    return all(v in ("ieee", False) for v in flags.values())


@pytest.fixture
def tf32_on():
    """Every switch in its TF32 position (not torch's default, so that restoring is visible)."""
    saved = precision_flags()
    for name in saved:
        obj = torch.backends.cuda.matmul if name.startswith("cuda") else (
            torch.backends.cudnn.conv if name.startswith("cudnn.conv") else torch.backends.cudnn)
        attr = name.rsplit(".", 1)[1]
        setattr(obj, attr, "tf32" if attr == "fp32_precision" else True)
    before = precision_flags()
    assert not _ieee(before)
    yield before
    for name, value in saved.items():
        obj = torch.backends.cuda.matmul if name.startswith("cuda") else (
            torch.backends.cudnn.conv if name.startswith("cudnn.conv") else torch.backends.cudnn)
        setattr(obj, name.rsplit(".", 1)[1], value)


def test_this_torch_has_the_switches():
    flags = precision_flags()
    assert len(flags) == 2                                  # one for matmuls, one for convolutions
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        assert set(flags) == {"cuda.matmul.fp32_precision", "cudnn.conv.fp32_precision"}


def test_flags_are_ieee_inside_and_restored_after(tf32_on):
    with exact_matmul():
        assert _ieee(precision_flags())
        with exact_matmul():                                # nests
            assert _ieee(precision_flags())
        assert _ieee(precision_flags())
    assert precision_flags() == tf32_on


def test_flags_are_restored_after_an_exception(tf32_on):
    with pytest.raises(KeyError):
        with exact_matmul():
            assert _ieee(precision_flags())
            raise KeyError("boom")
    assert precision_flags() == tf32_on

    @exact
    def fails():
        assert _ieee(precision_flags())
        raise RuntimeError("inside")
    with pytest.raises(RuntimeError, match="inside"):
        fails()
    assert precision_flags() == tf32_on


@pytest.mark.parametrize("fn", EXACT_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_exact_probe_function_is_decorated(fn):
    assert getattr(fn, "exact_matmul", False) and fn.__wrapped__.__name__ == fn.__name__


class _Spy(nn.Module):
    """A tiny classifier whose forward records the precision switches it runs under."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16, 3)
        self.seen: list[dict] = []

    def forward(self, x):
        self.seen.append(precision_flags())
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _calls(model: _Spy, x, y):
    return {
        "empirical_ntk": lambda: empirical_ntk(model, x[:4], dtype=torch.float64),
        "ntk_topk_lanczos": lambda: ntk_topk_lanczos(model, x[:6], k=2, dtype=torch.float64),
        "hessian_spectrum": lambda: hessian_spectrum(model, x, y, k=1, trace=None, density=False),
        "loss_surface": lambda: loss_surface(model, x, y, random_directions(model, 1), "-1:1:3"),
        "gradient_variance": lambda: gradient_variance(model, x, y, GradVarParams(batches=2, batch_size=4)),
        "interpolation_paths": lambda: interpolation_paths(model, x, y, pairs=2, steps=5, max_degree=2, triples=1,
                                                           plane_resolution=3),
        "saturation": lambda: saturation(model, x),
    }


@pytest.mark.parametrize("name", ["empirical_ntk", "ntk_topk_lanczos", "hessian_spectrum", "loss_surface",
                                  "gradient_variance", "interpolation_paths", "saturation"])
def test_each_probe_runs_its_model_with_tf32_off_and_restores_the_flags(name, tf32_on):
    model = _Spy()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 4, 4, generator=g), torch.arange(12) % 3
    res = _calls(model, x, y)[name]()
    assert model.seen and all(_ieee(s) for s in model.seen)
    assert precision_flags() == tf32_on
    notes = getattr(res, "notes", ())
    assert TF32_NOTE not in notes                           # on the CPU: no note


def test_the_note_is_added_only_on_cuda(monkeypatch):
    model = _Spy()
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    assert TF32_NOTE not in empirical_ntk(model, x, dtype=torch.float64).notes
    monkeypatch.setattr(precision, "uses_cuda", lambda *a, **k: True)
    res = empirical_ntk(model, x, dtype=torch.float64)
    assert res.notes[-1] == TF32_NOTE and res.notes.count(TF32_NOTE) == 1
    assert TF32_NOTE in res.summary()["notes"]
    spec = ntk_spectrum(res.kernel)
    assert TF32_NOTE in spec.notes and np.isfinite(spec.eigenvalues).all()


def test_uses_cuda_reads_the_device_argument_and_the_model():
    model = nn.Linear(2, 2)
    assert not precision.uses_cuda(model, torch.zeros(1, 2), device="cpu")
    assert precision.uses_cuda(model, device="cuda:0") and precision.uses_cuda(model, device=torch.device("cuda"))
    assert precision.uses_cuda(model, device="auto") == torch.cuda.is_available()
    assert not precision.uses_cuda(model)


@pytest.mark.parametrize("build", ["curvature_operator", "ntk_operator"])
def test_returned_operators_compute_with_tf32_off(build, tf32_on):
    """The operators run their products after the function that built them returned (and restored the
    caller's TF32 flags): each product switches TF32 off itself, and restores the flags after."""
    from probe.probes.hessian import curvature_operator
    from probe.probes.ntk import ntk_operator

    model = _Spy()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 1, 4, 4, generator=g), torch.arange(6) % 3
    op = curvature_operator(model, x, y) if build == "curvature_operator" else ntk_operator(model, x)
    assert precision_flags() == tf32_on                     # the function returned: the caller's flags
    if build == "curvature_operator":                       # a forward pass of its own (on another operator:
        other = curvature_operator(model, x, y)             # this one would keep its graph for the products)
        model.seen.clear()
        assert np.isfinite(other.mean_loss()) and model.seen and all(_ieee(s) for s in model.seen)
        assert precision_flags() == tf32_on
    model.seen.clear()
    V = torch.randn(op.size, 2, generator=g, dtype=op.dtype)
    out = op.matmat(V)
    assert model.seen and all(_ieee(s) for s in model.seen)
    assert precision_flags() == tf32_on
    assert torch.equal(out, op.matmat(V))                   # the same product, once more
    assert precision.exact_products(op) is op and getattr(op.matmat, "exact_matmul", False)
