"""The matrix-free NTK operators' ways to a product: the VJP/JVP operator vmapped over its
cotangents and tangents (the default off the CPU) against its loops (the CPU's default), its fall
back to the loops where vmap does not apply, and the Gram operator forming each row block once.

Float64 on the tiny models of test_ntk: the vmapped and looped products are the same sums in
another order, equal to rounding (~1e-16 relative); we assert 1e-12 relative to the largest entry.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probe.probes.ntk._operators as ops_mod
import probe.probes.ntk.api as ntk_mod
from probe.functional import eval_mode, functionalize
from probe.probes.ntk import NtkKind, ntk_topk_lanczos
from tests.probes.test_ntk import _gram_operator, _stacked_jacobian, expected, make_inputs, make_model, \
    reference_jacobian

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]
RTOL = 1e-12


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny float64 problems: one thread (see conftest.one_thread)."""


def _ntvp(name: str, kind: str, block: int = 4):
    model = make_model(name)
    x1 = make_inputs(name, 6, 1)
    fm = functionalize(model, dtype=torch.float64)
    with eval_mode(model):
        x = fm.prepare(x1)
        O = fm(fm.params, x[:1]).reshape(1, -1).shape[1]
    return model, x1, fm, ntk_mod._NtkOperator(fm, x, NtkKind(kind), O, block=block)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=rtol * float(b.abs().max()))


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "gated"])
@pytest.mark.parametrize("kind", ["trace", "full"])
def test_ntvp_vmapped_products_equal_the_loop_and_the_kernel(name, kind):
    model, x1, fm, op = _ntvp(name, kind)
    assert op.vectorize == "loop"                                    # the CPU's default
    V = torch.randn(op.size, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with eval_mode(model):
        looped = op.matmat(V)
        op.vectorize = "vmap"                                        # the default on a GPU
        vmapped = op.matmat(V)
    assert op.vectorize == "vmap" and op.looped == ""                # vmap applied: no fallback
    _close(vmapped, looped)
    J = reference_jacobian(model, x1)
    K = torch.as_tensor(expected(J, J, 6, 6, kind))
    _close(vmapped, K @ V, 1e-10)


def test_ntvp_falls_back_to_the_loop_where_vmap_does_not_apply(monkeypatch):
    model, _, _, op = _ntvp("bn_cnn", "trace", block=3)
    V = torch.randn(op.size, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with eval_mode(model):
        looped = op.matmat(V)
    calls = []

    def no_batching_rule(fn, *args, **kwargs):
        def run(*a, **k):
            calls.append(1)
            if len(calls) == 2:             # the second chunk of the first block: a partial block
                raise RuntimeError("Batching rule not implemented for aten::something")
            return torch.func.vmap(fn, *args, **kwargs)(*a, **k)
        return run

    monkeypatch.setattr(ops_mod, "vmap", no_batching_rule)
    op.vectorize = "vmap"
    with eval_mode(model):
        got = op.matmat(V)
    assert op.vectorize == "loop" and "vmap over the cotangents: RuntimeError: Batching rule" in op.looped
    _close(got, looped)
    n = len(calls)
    with eval_mode(model):
        op.matmat(V)                                                 # later products loop from the start
    assert len(calls) == n


def test_ntvp_out_of_memory_under_vmap_is_not_a_fallback(monkeypatch):
    from probe.errors import OutOfMemory

    model, _, _, op = _ntvp("mlp", "full")

    def oom(fn, *args, **kwargs):
        def run(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run

    monkeypatch.setattr(ops_mod, "vmap", oom)
    op.vectorize = "vmap"
    with eval_mode(model), pytest.raises(OutOfMemory):
        op.matmat(torch.ones(op.size, 2, dtype=torch.float64))
    assert op.vectorize == "vmap" and op.looped == ""


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "gated"])
@pytest.mark.parametrize("kind", ["trace", "full"])
def test_gram_operator_forms_each_row_block_once_per_product(name, kind):
    # blocks of 5 samples, rows 2 at a time: sub-chunks of 2, 2 and 1 samples per block
    model, x1 = make_model(name), make_inputs(name, 6, 1)
    fm, op, _ = _gram_operator(model, x1, kind, block=5, chunk=2)
    P = torch.randn(op.F, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with eval_mode(model):
        JP = op.rows_times(P)                                        # one use of every row: one pass
        one_pass = op.row_blocks
        MP = op.matmat(P)                                            # two uses of every row
    assert one_pass > 0 and op.row_blocks == 2 * one_pass           # formed once, not twice
    Js = _stacked_jacobian(fm, reference_jacobian(model, x1), 6, kind)
    _close(MP, Js.T @ (Js @ P), 1e-10)
    _close(JP, Js @ P, 1e-10)


def test_gram_rows_on_a_gpu_come_in_one_product_per_layer_and_output():
    # off the CPU a single-call layer's weight rows are one bmm per sub-chunk and output; the CPU
    # cuts them into cache-sized blocks. Same rows either way.
    model, x1 = make_model("bn_cnn"), make_inputs("bn_cnn", 6, 1)
    fm, op, _ = _gram_operator(model, x1, "trace", block=6, chunk=6)
    P = torch.randn(op.F, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    op._row_bytes = 64                                               # CPU rule: blocks of 4 samples
    with eval_mode(model):
        cpu_rule = op.matmat(P)
        blocks_cpu = op.row_blocks
        op._row_bytes, op.row_blocks = None, 0                       # the GPU rule
        gpu_rule = op.matmat(P)
    assert op.row_blocks < blocks_cpu
    _close(gpu_rule, cpu_rule)


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "gated"])
@pytest.mark.parametrize("kind", ["trace", "full"])
def test_gram_batched_output_gradients_equal_the_loop(name, kind):
    # off the CPU the O backward passes of a chunk are one batched pass (is_grads_batched)
    model, x1 = make_model(name), make_inputs(name, 6, 1)
    fm, op, _ = _gram_operator(model, x1, kind, block=4, chunk=2)
    assert not op.batch_outputs                                      # the CPU's default: the loop
    P = torch.randn(op.F, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with eval_mode(model):
        looped = op.matmat(P)
        op.batch_outputs = True
        batched = op.matmat(P)
    assert op.batch_outputs and op.outputs_looped == ""
    _close(batched, looped)


def test_gram_output_gradients_fall_back_to_the_loop(monkeypatch):
    model, x1 = make_model("bn_cnn"), make_inputs("bn_cnn", 6, 1)
    fm, op, _ = _gram_operator(model, x1, "trace", block=4, chunk=2)
    P = torch.randn(op.F, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with eval_mode(model):
        looped = op.matmat(P)
    grad = torch.autograd.grad

    def no_batching_rule(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::something")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    op.batch_outputs = True
    with eval_mode(model):
        got = op.matmat(P)
    assert not op.batch_outputs and "Batching rule" in op.outputs_looped
    _close(got, looped, 0)


class _NoVmapScale(torch.autograd.Function):
    """2 x with no batching rule: its products work one at a time and are refused under vmap
    (the batching of cotangents and of output gradients)."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * (float(g.new_ones(()).item()) * 2)

    @staticmethod
    def jvp(ctx, t):
        return 2 * t


class _NoVmapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(_NoVmapScale.apply(self.a(x))))


@pytest.mark.parametrize("method,cls,attr,note", [
    ("ntvp", "_NtkOperator", "vectorize", "ntvp: products one vector at a time"),
    ("gram", "_GramOperator", "batch_outputs", "gram: the 3 output gradients one backward pass each"),
])
def test_operator_fallback_from_batched_products_is_in_the_notes(monkeypatch, method, cls, attr, note):
    """Where batching the products fails on the model (forced on here as on a GPU), the operator
    loops, the result is the same, and the notes say why."""
    ops = ops_mod
    torch.manual_seed(0)
    model = _NoVmapNet().double()
    x = torch.randn(12, 3, dtype=torch.float64)
    plain = ntk_topk_lanczos(model, x, k=3, method=method, dtype=torch.float64)
    assert not any(note in n for n in plain.notes)
    init = getattr(ops, cls).__init__

    def batched(self, *a, **kw):
        init(self, *a, **kw)
        setattr(self, attr, "vmap" if attr == "vectorize" else True)

    monkeypatch.setattr(getattr(ops, cls), "__init__", batched)
    res = ntk_topk_lanczos(model, x, k=3, method=method, dtype=torch.float64)
    assert any(note in n for n in res.notes), res.notes
    np.testing.assert_allclose(res.eigenvalues, plain.eigenvalues, rtol=1e-8)
