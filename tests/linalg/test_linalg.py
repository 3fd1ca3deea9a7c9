"""probe.linalg: the one block Lanczos against dense ``numpy.linalg.eigvalsh`` in float64.

Tolerances: ``block_lanczos`` stops when every top-k Ritz residual is <= tol * lambda_max, and a
Ritz value is within its residual of an eigenvalue. With tol = 1e-10 and test spectra whose top k
lie within a factor 10 of lambda_max, the relative eigenvalue error is <= 1e-9; eigvalsh itself is
exact to ~n * eps (~1e-14 here). rtol 1e-9 therefore fails on any real mistake (a lost multiplicity
or a wrong operator moves an eigenvalue by O(1) relative) and never on rounding.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import probe.probes.ntk.api as ntk_api
from probe.functional import eval_mode, functionalize
from probe.linalg import (CallableOperator, DenseOperator, SymmetricOperator, block_lanczos, dot64,
                          spectrum_stats)
from probe.probes.ntk import NtkKind
from probe.probes.ntk._operators import _GramOperator, _NtkOperator

TOL = 1e-10
RTOL = 1e-9       # see the module docstring
# torch's forward-AD decompositions (the ntvp operator's JVPs) are loaded through torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny float64 problems: one thread (see conftest.one_thread)."""


def psd_with_spectrum(ev: np.ndarray, seed: int = 0) -> np.ndarray:
    """Q diag(ev) Q^T for a random orthogonal Q (float64)."""
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((ev.size, ev.size)))
    A = (Q * ev) @ Q.T
    return 0.5 * (A + A.T)


# ------------------------------------------------------------------------------------------------
# A dense PSD matrix with a known spectrum
# ------------------------------------------------------------------------------------------------


def test_block_lanczos_on_tenfold_eigenvalues_resolves_or_warns():
    """Eigenvalues 10, 9, 8 each ten times, then a tail. Blocks of s < 10 stop at clusters of
    s or more copies (here 8): the top 20 is wrong, and a note says which eigenvalues may have
    more copies. A block of exactly 10 finds all of them but cannot rule out an eleventh (noted);
    a larger block finds them all and says nothing."""
    rng = np.random.default_rng(3)
    ev = np.concatenate([np.repeat([10.0, 9.0, 8.0], 10), rng.uniform(0, 1, 90)])
    op = DenseOperator(psd_with_spectrum(ev))
    want = np.sort(ev)[::-1][:20]
    for s in (2, 4):
        res = block_lanczos(op, 20, block_size=s, tol=TOL)
        assert not np.allclose(res.eigenvalues, want, rtol=1e-3)       # copies are missing ...
        assert any("eigenvalue 10 appears" in n and f"block size {s}" in n for n in res.notes)
    res = block_lanczos(op, 20, block_size=10, tol=TOL)
    np.testing.assert_allclose(res.eigenvalues, want, rtol=1e-8)
    assert [n.split(" appears")[0] for n in res.notes] == ["eigenvalue 10", "eigenvalue 9"]
    res = block_lanczos(op, 20, block_size=12, tol=TOL)
    np.testing.assert_allclose(res.eigenvalues, want, rtol=1e-8)
    assert res.converged and not res.notes


def test_block_lanczos_resolves_repeated_eigenvalues_of_a_dense_psd_matrix():
    # top: 10 (three times), 7 (twice), 5, then a tail in [0, 1] with exact zeros (rank 50 of 60)
    tail = np.concatenate([np.linspace(1.0, 0.01, 44), np.zeros(10)])
    ev = np.concatenate([[10.0] * 3, [7.0] * 2, [5.0], tail])
    A = psd_with_spectrum(ev)
    dense = np.linalg.eigvalsh(A)[::-1]
    op = DenseOperator(A)
    assert isinstance(op, SymmetricOperator) and op.size == 60 and op.dtype == torch.float64
    k = 6
    res = block_lanczos(op, k, block_size=3, tol=TOL, return_vectors=True)
    # 10 appears as often as the block size: the solver cannot rule out a fourth copy and says so
    assert res.converged and res.block_size == 3
    assert len(res.notes) == 1 and "eigenvalue 10 appears 3 times" in res.notes[0]
    np.testing.assert_allclose(res.eigenvalues, dense[:k], rtol=RTOL)
    np.testing.assert_allclose(res.eigenvalues, [10, 10, 10, 7, 7, 5], rtol=RTOL)
    # Ritz vectors: orthonormal (float64 rounding) and A y = theta y up to the reported residuals
    Y = res.vectors.numpy()
    np.testing.assert_allclose(Y.T @ Y, np.eye(k), atol=1e-12)
    resid = np.linalg.norm(A @ Y - Y * res.eigenvalues, axis=0)
    np.testing.assert_allclose(resid, res.residuals, atol=1e-12 * ev.max())
    assert (resid <= TOL * ev.max() * (1 + 1e-6)).all()
    assert res.n_matvecs == res.dim and res.n_blocks == -(-res.dim // 3)
    assert json.loads(json.dumps(res.summary()))["k"] == k


def test_block_lanczos_float32_storage_accumulates_in_float64():
    # vectors stored in float32: inner products in float64 keep the basis orthonormal to float32
    # rounding, so the eigenvalues agree to ~1e-6 (float32 rounding of A's entries and products)
    ev = np.concatenate([[4.0, 3.0, 3.0, 2.0], np.linspace(1.0, 0.0, 196)])
    A = psd_with_spectrum(ev, seed=1)
    res = block_lanczos(DenseOperator(A, dtype=torch.float32), 4, block_size=2)
    assert res.converged and res.tol == 1e-5                     # the float32 default
    np.testing.assert_allclose(res.eigenvalues, [4, 3, 3, 2], rtol=2e-5)


def test_block_lanczos_on_a_callable_spans_the_space_and_reports_a_cap():
    ev = np.array([3.0, 2.0, 1.0, 0.5, 0.25])
    A = torch.as_tensor(psd_with_spectrum(ev, seed=2))
    seen = []
    op = CallableOperator(lambda V: A @ V, 5)
    res = block_lanczos(op, 5, block_size=2, tol=TOL, progress=seen.append)
    assert res.converged and res.dim == 5 and sum(seen) == res.n_matvecs == 5
    np.testing.assert_allclose(res.eigenvalues, ev, rtol=RTOL)
    # a Krylov space capped below what the tolerance needs: not converged, and the tail says so
    big = np.concatenate([[1.0], np.geomspace(0.9, 1e-3, 299)])
    capped = block_lanczos(DenseOperator(psd_with_spectrum(big, seed=3)), 8, max_dim=10, tol=TOL)
    assert not capped.converged and capped.dim == 10
    assert dot64(torch.ones(1, 3), torch.ones(2, 3)).dtype == torch.float64


def test_block_lanczos_rejects_a_wrong_shape_and_bad_arguments():
    op = CallableOperator(lambda V: V[:-1], 4)
    with pytest.raises(ValueError, match="operator returned shape"):
        block_lanczos(op, 2)
    with pytest.raises(ValueError, match="k must be between"):
        block_lanczos(DenseOperator(np.eye(3)), 4)


def test_spectrum_stats_of_a_partial_spectrum():
    # top 3 of a 1000-dimensional operator: the default floor uses the operator's size
    s = spectrum_stats([1e-20, 4.0, 1.0], size=1000)
    assert s.floor == pytest.approx(1000 * np.finfo(float).eps * 4.0)
    assert s.n_below_floor == 1 and s.condition_number == pytest.approx(4.0)
    assert any("near-singular: 1 of 3" in n for n in s.notes)
    assert s.participation_ratio == pytest.approx(25 / 17, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# The two NTK operators on a tiny float64 model, against the explicitly computed kernel
# ------------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Linear -> BatchNorm -> tanh -> Linear (3 outputs), times a free scalar (vmap(jacrev) path)."""

    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.head = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return self.scale * self.head(torch.tanh(self.bn(self.l1(x))))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # the slow obvious reference: J (N*O, P), one autograd.grad per (sample, output), eval mode
    params = [p for p in model.parameters()]
    rows = []
    with eval_mode(model):
        for i in range(x.shape[0]):
            y = model(x[i:i + 1])[0]
            for o in range(y.numel()):
                gs = torch.autograd.grad(y[o], params, retain_graph=True)
                rows.append(torch.cat([g.reshape(-1) for g in gs]))
    J = torch.stack(rows).numpy()                                      # (N*O, P)
    K_full = J @ J.T                                                   # (N*O, N*O), sample-major
    K_trace = K_full.reshape(7, 3, 7, 3).trace(axis1=1, axis2=3)       # (N, N)
    return model, x, {"full": K_full, "trace": K_trace}


@pytest.mark.parametrize("kind", ["trace", "full"])
def test_ntvp_operator_lanczos_matches_the_explicit_kernel(tiny, kind):
    model, x, K = tiny
    fm = functionalize(model, dtype=torch.float64)
    with eval_mode(model):
        op = _NtkOperator(fm, fm.prepare(x), NtkKind(kind), 3, block=3)
        assert op.size == K[kind].shape[0] and op.dtype == torch.float64
        res = block_lanczos(op, 4, block_size=2, tol=TOL)
    dense = np.linalg.eigvalsh(K[kind])[::-1]
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues, dense[:4], rtol=RTOL)


@pytest.mark.parametrize("kind", ["trace", "full"])
def test_gram_operator_lanczos_matches_the_explicit_kernel(tiny, kind):
    # M = J^T J in parameter space has the kernel's non-zero eigenvalues
    model, x, K = tiny
    fm = functionalize(model, dtype=torch.float64)
    with eval_mode(model):
        xp = fm.prepare(x)
        layers = ntk_api._find_layers(fm)
        stats = ntk_api._measure(fm, xp[:1].clone(), layers)
        c = ntk_api._Ctx(fm, NtkKind(kind), xp, xp, True, stats, 8, 2 ** 30)
        good, fallback, bad = ntk_api._checked_layers(c, layers)
        assert fallback == ["scale"] and not bad                       # l1, bn, head in closed form
        op = _GramOperator(fm, xp, NtkKind(kind), 3, good, fallback, block=4, sub=2)
        assert op.size == fm.n_params * (3 if kind == "trace" else 1) and op.dtype == torch.float64
        res = block_lanczos(op, 4, block_size=2, tol=TOL)
    dense = np.linalg.eigvalsh(K[kind])[::-1]
    assert res.converged and op.sweeps == res.n_blocks
    np.testing.assert_allclose(res.eigenvalues, dense[:4], rtol=RTOL)


@pytest.mark.parametrize("kind", ["trace", "full"])
def test_public_ntk_operator_is_the_ntvp_operator(tiny, kind):
    from probe.probes.ntk import ntk_operator
    model, x, K = tiny
    op = ntk_operator(model, x, kind, block_size=3)
    V = np.random.default_rng(0).standard_normal((op.size, 2))
    assert op.size == K[kind].shape[0] and op.dtype == torch.float64
    np.testing.assert_allclose(op.matmat(V).numpy(), K[kind] @ V, rtol=1e-8, atol=1e-10 * np.abs(K[kind]).max())
