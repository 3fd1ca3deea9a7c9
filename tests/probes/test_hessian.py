"""The Hessian probe's library layer: operators vs dense float64 Hessians, the estimators on dense
matrices, per-block spectra, side effects and input errors.

Tolerances: exact identities in float64 (products against ``torch.func.hessian`` / ``jacrev``
references, mini-batch sums, Lanczos eigenvalues) 1e-10 to 1e-8 relative; stochastic
estimators against bounds computed from their exact variances (4 standard deviations); float32
eigenvectors against float64 ones at 1e-5 (float32 storage rounding, 6e-8, times the
conditioning of the eigenvector through the eigen-gaps of the tiny test Hessians, >= 1e-2).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from probe.errors import UserError
from probe.linalg import (DenseOperator, SymmetricOperator, extreme_eigenpairs, hutchinson_trace, hutchpp_trace,
                          slq_density)
from probe.probes import hessian as hs
from probe.probes.hessian import GGNOperator, HessianOperator, curvature_operator, group_blocks, hessian_spectrum

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


# --------------------------------------------------------------------------------------------
# Tiny models (float64)
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in=4, hidden=5, out=3, unused=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, out)
        if unused:
            self.spare = nn.Linear(2, 2)          # never called in forward

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class ConvBN(nn.Module):
    """conv -> BatchNorm2d -> tanh -> mean pool -> linear; 1x4x4 inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean((2, 3)))


class MulFusion(nn.Module):
    """A multiplicative-fusion block ``shortcut(x) * sigmoid(out)`` and a linear head."""

    def __init__(self, d=3, out=3):
        super().__init__()
        self.r1, self.r2, self.shortcut, self.head = (nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d),
                                                      nn.Linear(d, out))

    def forward(self, x):
        out = self.r2(torch.tanh(self.r1(x)))
        return self.head(self.shortcut(x) * torch.sigmoid(out))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):            # running statistics that describe no batch
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.to(D).eval()


def _data(kind: str, n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 4, 4) if kind == "conv" else (n, 4 if kind == "mlp" else 3), generator=g, dtype=D)
    return x, torch.randint(0, 3, (n,), generator=g)


MODELS = {"mlp": lambda: _seeded(MLP()), "conv": lambda: _seeded(ConvBN()), "fusion": lambda: _seeded(MulFusion())}


def _flat(model: nn.Module):
    """(theta (P,), t -> {name: view of t}) for the model's parameters in order."""
    names, shapes = [n for n, _ in model.named_parameters()], [p.shape for p in model.parameters()]

    def params(t):
        out, off = {}, 0
        for n, sh in zip(names, shapes):
            out[n], off = t[off:off + sh.numel()].reshape(sh), off + sh.numel()
        return out

    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(D), params


def _dense(model: nn.Module, x, y, crit=F.cross_entropy, kind: str = "hessian"):
    """The float64 reference, independent of the probe's code: a copy of the model in eval mode,
    its flat parameters theta (P,), and H = hessian(L)(theta), G = J^T H_out J (J = jacrev of the
    outputs, H_out = hessian of the criterion in output space) or J itself (``kind="jacobian"``)."""
    m = copy.deepcopy(model).eval()
    theta, params = _flat(m)
    buffers = {n: b.clone() for n, b in m.named_buffers()}

    def outputs(t):
        return functional_call(m, (params(t), {k: v.clone() for k, v in buffers.items()}), (x,))

    if kind == "hessian":
        return hessian(lambda t: crit(outputs(t), y))(theta)
    z = outputs(theta).detach()
    J = jacrev(lambda t: outputs(t).reshape(-1))(theta)                       # (n O, P)
    if kind == "jacobian":
        return J
    Hout = hessian(lambda zz: crit(zz.reshape(z.shape), y))(z.reshape(-1))     # (n O, n O)
    return J.T @ Hout @ J


def _convbn_batch_stats_hessian(model: ConvBN, x, y):
    """The Hessian of :class:`ConvBN`'s loss with BatchNorm written out by hand with the batch's
    mean and biased variance (what ``bn="train"`` must compute), float64."""
    theta, params = _flat(model)

    def loss(t):
        ps = params(t)
        h = F.conv2d(x, ps["conv.weight"], ps["conv.bias"], padding=1)
        mu, var = h.mean((0, 2, 3), keepdim=True), h.var((0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + model.bn.eps) * ps["bn.weight"][:, None, None] + ps["bn.bias"][:, None, None]
        return F.cross_entropy(F.linear(torch.tanh(h).mean((2, 3)), ps["fc.weight"], ps["fc.bias"]), y)

    return hessian(loss)(theta)


def _rel(a, b) -> float:
    return float(torch.linalg.norm(torch.as_tensor(a) - torch.as_tensor(b)) / torch.linalg.norm(torch.as_tensor(b)))


# --------------------------------------------------------------------------------------------
# Operators against dense references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", ["loop", "vmap", "graph"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("name", list(MODELS))
def test_products_match_dense_float64(name, kind, vectorize):
    if kind == "ggn" and vectorize == "graph":
        with pytest.raises(UserError, match="graph"):
            curvature_operator(MODELS[name](), *_data(name), operator=kind, vectorize=vectorize)
        return
    model = MODELS[name]()
    x, y = _data(name)
    A = _dense(model, x, y, kind=kind)
    op = curvature_operator(model, x, y, operator=kind, vectorize=vectorize)
    assert isinstance(op, SymmetricOperator) and isinstance(op, HessianOperator if kind == "hessian" else GGNOperator)
    assert op.size == A.shape[0] and op.dtype == D
    V = torch.randn(op.size, 3, generator=torch.Generator().manual_seed(2), dtype=D)
    assert _rel(op.matmat(V), A @ V) < 1e-10                      # float64 identity
    assert op.matvecs == 3
    if kind == "ggn":                                             # PSD (rounding-level negatives only)
        assert torch.linalg.eigvalsh(A).min() > -1e-12 * torch.linalg.eigvalsh(A).max()


def test_callable_criterion_and_mse_scaling():
    model, (x, y) = MODELS["mlp"](), _data("mlp")
    smooth = lambda out, t: F.cross_entropy(out, t, label_smoothing=0.1)   # noqa: E731
    op = curvature_operator(model, x, y, criterion=smooth)
    V = torch.randn(op.size, 2, generator=torch.Generator().manual_seed(3), dtype=D)
    assert _rel(op.matmat(V), _dense(model, x, y, crit=smooth) @ V) < 1e-10
    # MSE over n samples and O outputs: H_out = 2 / (n O) I, so G = 2 / (n O) J^T J
    op = curvature_operator(model, x, y, criterion="mse", operator="ggn")
    J = _dense(model, x, y, kind="jacobian")
    assert _rel(op.matmat(V), (2.0 / J.shape[0]) * (J.T @ (J @ V))) < 1e-10


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_minibatch_accumulation_equals_full_batch(kind):
    model, (x, y) = MODELS["conv"](), _data("conv", n=10)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=torch.Generator().manual_seed(4),
                    dtype=D)
    full = curvature_operator(model, x, y, operator=kind).matmat(V)
    for b in (1, 3, 7):                                            # uneven last batches too
        part = curvature_operator(model, x, y, operator=kind, batch_size=b).matmat(V)
        assert _rel(part, full) < 1e-12


def test_vmap_failure_falls_back_to_loop(monkeypatch):
    model, (x, y) = MODELS["fusion"](), _data("fusion")
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=torch.Generator().manual_seed(5),
                    dtype=D)
    ref = curvature_operator(model, x, y, vectorize="loop").matmat(V)

    def broken(*a, **k):
        raise RuntimeError("Batching rule not implemented for aten::something")

    ref_ggn = curvature_operator(model, x, y, operator="ggn", vectorize="loop").matmat(V)
    monkeypatch.setattr(hs._operators, "vmap", broken)
    op = curvature_operator(model, x, y, operator="ggn")          # auto: vmap, falls back
    assert _rel(op.matmat(V), ref_ggn) < 1e-12
    assert op.vectorize == "loop" and any("vmap" in n and "looped" in n for n in op.notes)
    with pytest.raises(RuntimeError, match="Batching rule"):       # an explicit vmap does not
        curvature_operator(model, x, y, vectorize="vmap").matmat(V)
    assert _rel(curvature_operator(model, x, y).matmat(V), ref) < 1e-12   # the Hessian's auto needs no vmap


def test_kept_gradient_graph_is_built_once_and_released():
    """With the whole subset in one batch the graph of the gradient is built at the first
    product and reused (no forward pass after it) until released; with mini-batches every
    product runs the batches' forward passes again. Same products either way (1e-12)."""
    model, (x, y) = MODELS["conv"](), _data("conv", n=10)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=torch.Generator().manual_seed(6),
                        dtype=D)
        op = curvature_operator(model, x, y)
        assert op.vectorize == "graph"
        first = op.matmat(V)
        assert calls == [10]
        second = op.matmat(V)
        assert calls == [10] and torch.equal(first, second)
        op.release()
        op.matmat(V[:, :1])
        assert calls == [10, 10]
        calls.clear()
        mini = curvature_operator(model, x, y, batch_size=4)
        out = mini.matmat(V)
        mini.matmat(V)
        assert calls == [4, 4, 2, 4, 4, 2]
        assert _rel(out, first) < 1e-12
        assert _rel(first, _dense(model, x, y) @ V) < 1e-10
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# Eigenvalues, trace and blocks through hessian_spectrum
# --------------------------------------------------------------------------------------------


def test_spectrum_extremes_trace_and_blocks_match_dense():
    model, (x, y) = MODELS["mlp"](), _data("mlp", n=12)
    H = _dense(model, x, y)
    lam, U = np.linalg.eigh(H.numpy())                             # ascending
    P = lam.size
    res = hessian_spectrum(model, x, y, k=3, which="both", n_samples=None, dtype=D, trace="hutchpp",
                           trace_matvecs=3 * P + 10, density=False, blocks="layer")
    assert res.n_params == P and res.n_samples == 12
    scale = np.abs(lam).max()
    np.testing.assert_allclose(res.largest.eigenvalues, lam[::-1][:3], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(res.smallest.eigenvalues, lam[:3], rtol=0, atol=1e-8 * scale)
    assert res.converged and res.eigenvectors.dtype == np.float32 and res.eigenvectors.shape == (P, 3)
    gaps = np.abs(np.diff(lam))
    assert gaps[-3:].min() > 1e-2 * scale and gaps[:3].min() > 1e-2 * scale      # vectors well defined
    for got, ref in ((res.largest.eigenvectors, U[:, ::-1][:, :3]), (res.smallest.eigenvectors, U[:, :3])):
        cos = np.abs(np.sum(got.astype(np.float64) * ref, axis=0))
        np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    # Hutch++ with a sketch of at least P vectors spans the range of H (rank < P: softmax shift
    # invariance), the deflated rest is zero and the trace exact
    assert res.trace.rank <= P and res.trace_matvecs == 3 * P + 10
    assert np.abs(res.trace.samples).max() < 1e-12 * scale
    assert abs(res.trace_estimate - float(np.trace(H))) < 1e-9 * np.abs(H.numpy()).sum()
    # blocks: the diagonal blocks of the dense Hessian, in parameter order
    assert list(res.blocks) == ["fc1", "fc2"]
    off = 0
    for name, b in res.blocks.items():
        Hb = H[off:off + b.n_params, off:off + b.n_params].numpy()
        off += b.n_params
        lb = np.linalg.eigvalsh(Hb)
        sb = np.abs(lb).max()
        np.testing.assert_allclose(b.largest, lb[::-1][:3], atol=1e-8 * sb, rtol=0)
        np.testing.assert_allclose(b.smallest, lb[:3], atol=1e-8 * sb, rtol=0)
        assert abs(b.trace - np.trace(Hb)) < 1e-9 * np.abs(Hb).sum()     # 3P+10 > 3 P_b: exact too
    assert off == P
    assert res.n_hvps == res.largest.n_matvecs + res.smallest.n_matvecs + res.trace_matvecs + sum(
        b.n_matvecs for b in res.blocks.values())


def test_subset_is_seeded_and_loss_reported():
    model, (x, y) = MODELS["mlp"](), _data("mlp", n=20)
    res = hessian_spectrum(model, x, y, k=1, n_samples=7, seed=3, trace=None, density=False, dtype=D,
                           return_eigenvectors=False)
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(3))[:7].sort().values
    with torch.no_grad():
        want = float(F.cross_entropy(model(x[idx]), y[idx]))
    assert res.n_samples == 7 and abs(res.loss - want) < 1e-12 and res.eigenvectors is None
    H = _dense(model, x[idx], y[idx])
    assert abs(res.eigenvalues[0] - float(torch.linalg.eigvalsh(H).max())) < 1e-8 * float(H.abs().max())


def test_mse_with_integer_labels_uses_one_hot_targets():
    model, (x, y) = MODELS["mlp"](), _data("mlp")
    res = hessian_spectrum(model, x, y, criterion="mse", k=1, n_samples=None, trace=None, density=False,
                           dtype=D, return_eigenvectors=False)
    with torch.no_grad():
        want = float(((model(x) - F.one_hot(y, 3).to(D)) ** 2).mean())
    assert res.criterion == "mse" and abs(res.loss - want) < 1e-12


def test_density_through_the_api():
    model, (x, y) = MODELS["fusion"](), _data("fusion")
    res = hessian_spectrum(model, x, y, k=2, n_samples=None, dtype=D, trace=None, density=True,
                           density_probes=2, density_steps=8)
    assert res.density.nodes.shape == (2, 8)
    assert abs(np.trapezoid(res.density_values, res.density_grid) - 1.0) < 1e-6
    lam = torch.linalg.eigvalsh(_dense(model, x, y)).numpy()
    v = res.density_nodes[res.density_weights > 0]                 # Ritz values lie in [min, max]
    assert v.min() >= lam.min() - 1e-10 and v.max() <= lam.max() + 1e-10


# --------------------------------------------------------------------------------------------
# Estimators on dense matrices
# --------------------------------------------------------------------------------------------


def _sym(n: int, seed: int, spectrum=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = rng.standard_normal(n) if spectrum is None else np.asarray(spectrum, dtype=float)
    return (Q * lam) @ Q.T


class Counting(DenseOperator):
    def __init__(self, A):
        super().__init__(A)
        self.count = 0

    def matmat(self, V):
        self.count += V.shape[1]
        return super().matmat(V)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_honest_stderr(dist):
    A = _sym(40, 0) + 0.3 * np.diag(np.arange(40.0))               # diagonal weight: Rademacher helps
    tr, m, runs = float(np.trace(A)), 8, 300
    fro2, diag2 = float((A ** 2).sum()), float((np.diag(A) ** 2).sum())
    var = 2 * (fro2 - diag2) / m if dist == "rademacher" else 2 * fro2 / m   # exact variance, m vectors
    op = Counting(A)
    est = [hutchinson_trace(op, m, seed=s, dist=dist, block=3) for s in range(runs)]
    assert op.count == m * runs and all(e.n_matvecs == m for e in est)
    mean = np.mean([e.estimate for e in est])
    assert abs(mean - tr) < 4 * math.sqrt(var / runs)              # unbiased: fails for a bias > 4 sigma
    # the reported standard error estimates the true one (mean of stderr^2 is unbiased for var)
    assert 0.8 < np.mean([e.stderr ** 2 for e in est]) / var < 1.25
    assert np.std([e.estimate for e in est]) == pytest.approx(math.sqrt(var), rel=0.2)


def test_hutchpp_within_bound_and_better_than_hutchinson():
    n, m = 200, 60
    A = _sym(n, 1, spectrum=1.0 / np.arange(1, n + 1) ** 2)         # PSD, decaying
    tr = float(np.trace(A))
    s = m // 3
    lam = np.sort(np.linalg.eigvalsh(A))[::-1]
    tail = math.sqrt(float((lam[s:] ** 2).sum()))                   # ||A - A_s||_F
    # Hutchinson on the deflated rest, h = m - 2s vectors: std <= sqrt(2 / h) ||B||_F, and the
    # sketch leaves ||B||_F <= 2 ||A - A_s||_F (randomized range finder, Halko et al. 2011);
    # 4 of those standard deviations
    bound = 4 * math.sqrt(2 / (m - 2 * s)) * 2 * tail
    assert bound < 0.05 * tr                                         # the bound is informative
    errs_pp, errs_h = [], []
    for seed in range(20):
        op = Counting(A)
        e = hutchpp_trace(op, m, seed=seed)
        assert op.count == m == e.n_matvecs and e.rank == s
        assert abs(e.estimate - tr) <= bound
        errs_pp.append(abs(e.estimate - tr))
        errs_h.append(abs(hutchinson_trace(DenseOperator(A), m, seed=seed).estimate - tr))
    assert np.mean(errs_pp) < 0.25 * np.mean(errs_h)


def test_hutchpp_rank_deficient_spends_the_budget():
    rng = np.random.default_rng(2)
    B = rng.standard_normal((50, 4))
    A = B @ B.T                                                       # rank 4
    op = Counting(A)
    e = hutchpp_trace(op, 30, seed=0)
    assert e.rank == 4 and op.count == 30 == e.n_matvecs
    assert abs(e.estimate - np.trace(A)) < 1e-10 * np.trace(A)       # sketch spans the range: exact


def test_slq_density_normalised_and_first_moment_is_the_trace():
    n, probes = 120, 6
    A = _sym(n, 3) + np.diag(np.linspace(-1, 3, n))
    d = slq_density(DenseOperator(A), probes, 30, seed=0, grid=2000)
    assert abs(np.trapezoid(d.density, d.grid) - 1.0) < 1e-6
    np.testing.assert_allclose(d.weights.sum(1), 1.0, atol=1e-12)
    assert d.n_matvecs == probes * 30 and (d.steps == 30).all()
    # sum_j w_j theta_j = e1^T T e1 = v^T A v, so the moment estimate is Hutchinson's with
    # Rademacher starts: 4 standard deviations of that (exact variance) over the probes
    var = 2 * ((A ** 2).sum() - (np.diag(A) ** 2).sum()) / probes
    assert abs(d.trace - np.trace(A)) < 4 * math.sqrt(var)
    # the broadened density keeps the mean: integral of t phi(t) = trace / n (grid covers +-5 sigma)
    assert abs(np.trapezoid(d.grid * d.density, d.grid) - d.trace / n) < 1e-6 * np.abs(A).max()
    lam = np.linalg.eigvalsh(A)
    ok = d.weights > 0
    assert d.nodes[ok].min() >= lam[0] - 1e-10 and d.nodes[ok].max() <= lam[-1] + 1e-10


def test_slq_exact_on_few_distinct_eigenvalues():
    values, mult = np.array([-2.0, 0.5, 1.0, 4.0]), np.array([5, 10, 20, 15])
    A = np.diag(np.repeat(values, mult))
    n = int(mult.sum())
    d = slq_density(DenseOperator(A), 3, 10, seed=1)
    assert (d.steps == 4).all() and d.n_matvecs == 12               # stops at the invariant space
    for i in range(3):
        nodes, w = d.nodes[i, :4], d.weights[i, :4]
        np.testing.assert_allclose(nodes, values, atol=1e-12)
        np.testing.assert_allclose(w, mult / n, atol=1e-12)         # Rademacher: v_i^2 = 1/n
        assert (d.weights[i, 4:] == 0).all()
    assert abs(d.trace - np.trace(A)) < 1e-10 * n


def test_extreme_eigenpairs_on_dense_and_repeated_smallest():
    lam = np.concatenate([[-3.0, -3.0, -3.0], np.linspace(-1, 5, 57)])
    A = _sym(60, 4, spectrum=lam)
    top = extreme_eigenpairs(DenseOperator(A), 3, "largest", block_size=1)
    low = extreme_eigenpairs(DenseOperator(A), 4, "smallest", block_size=4, return_vectors=True)
    ref = np.sort(lam)
    np.testing.assert_allclose(top.eigenvalues, ref[::-1][:3], atol=1e-8 * 5, rtol=0)
    np.testing.assert_allclose(low.eigenvalues, ref[:4], atol=1e-8 * 5, rtol=0)             # ascending
    np.testing.assert_allclose(A @ low.vectors.numpy(), low.vectors.numpy() * low.eigenvalues, atol=1e-7)
    two = extreme_eigenpairs(DenseOperator(A), 3, "smallest", block_size=2)
    assert any("among the smallest" in n for n in two.notes)            # a block of 2 may miss copies
    with pytest.raises(ValueError, match="largest' or 'smallest"):
        extreme_eigenpairs(DenseOperator(A), 1, "middle")


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def test_block_grouping_rules():
    import models
    names = [n for n, _ in models.create_model("tiny_add").named_parameters()]
    stages = group_blocks(names, "stage")
    assert list(stages) == ["stem", "layer1", "layer2", "layer3", "head"]
    assert stages["stem"] == ["conv1.weight", "bn1.weight", "bn1.bias"] and sum(map(len, stages.values())) == len(names)
    assert {k for k in group_blocks(names, "layer")} >= {"conv1", "layer1.0.conv1", "fc"}
    assert list(group_blocks(names, "*conv*"))[:2] == ["conv1", "layer1.0.conv1"]          # glob
    assert all(k.startswith("layer2.") for k in group_blocks(names, r"layer2\.0\."))     # regex
    mlp = [n for n, _ in models.create_model("tiny_mlp").named_parameters()]
    assert list(group_blocks(mlp, "stage")) == ["net.1", "net.3", "net.5"]               # wrapper stripped
    assert list(group_blocks(["a.w", "b.w"], "stage")) == ["a", "b"]                     # no stages
    with pytest.raises(UserError, match=r"matches no block.*layer1\.0\.conv1"):
        group_blocks(names, "decoder*")
    model, (x, y) = MODELS["mlp"](), _data("mlp")
    with pytest.raises(UserError, match=r"matches no block.*fc1, fc2"):
        hessian_spectrum(model, x, y, k=1, blocks="nothing_*", trace=None, density=False)


# --------------------------------------------------------------------------------------------
# Side effects, BatchNorm modes, unused parameters
# --------------------------------------------------------------------------------------------


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [(n, m.training) for n, m in model.named_modules()],
            [(n, m.track_running_stats) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)])


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_model_unchanged(bn):
    model = MODELS["conv"]()
    model.train()
    model.fc.eval()                                                 # mixed flags must survive
    model.conv.bias.requires_grad_(False)                           # frozen: held fixed
    x, y = _data("conv")
    before = _snapshot(model)
    res = hessian_spectrum(model, x, y, k=2, trace="hutchinson", trace_matvecs=4, density=True,
                           density_probes=1, density_steps=3, blocks="layer", bn=bn, operator="hessian")
    after = _snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])   # params and BN buffers
    assert before[1:] == after[1:] and all(g is None for _, _, g in after[1])
    assert res.n_params == sum(p.numel() for p in model.parameters()) - model.conv.bias.numel()
    assert any("train mode" in n for n in res.notes)


def test_bn_train_uses_batch_statistics_of_the_subset():
    model, (x, y) = MODELS["conv"](), _data("conv", n=8)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=torch.Generator().manual_seed(6),
                    dtype=D)
    ref = _convbn_batch_stats_hessian(model, x, y)
    assert _rel(curvature_operator(model, x, y, bn="train").matmat(V), ref @ V) < 1e-10
    assert _rel(ref, _dense(model, x, y)) > 1e-3                   # differs from eval mode
    with pytest.raises(UserError, match="batch_size of at least 8"):
        curvature_operator(model, x, y, bn="train", batch_size=4)
    with pytest.raises(UserError, match="batch_size"):
        hessian_spectrum(model, x, y, bn="train", batch_size=3, n_samples=None)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_unused_parameter_contributes_zero(kind):
    model, (x, y) = _seeded(MLP(unused=True)), _data("mlp")
    op = curvature_operator(model, x, y, operator=kind)
    P = op.size
    spare = slice(P - 6, P)                                         # spare.weight (4) + bias (2), last
    V = torch.randn(P, 2, generator=torch.Generator().manual_seed(7), dtype=D)
    W = op.matmat(V)
    assert torch.equal(W[spare], torch.zeros_like(W[spare]))
    Vs = torch.zeros(P, 1, dtype=D)
    Vs[spare] = 1.0
    assert torch.equal(op.matmat(Vs), torch.zeros(P, 1, dtype=D))
    res = hessian_spectrum(model, x, y, k=2, which="smallest", operator=kind, trace="hutchpp", trace_matvecs=9,
                           density=False, blocks="layer", dtype=D)
    assert res.blocks["spare"].trace == 0.0 and (res.blocks["spare"].smallest == 0).all()


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_user_errors():
    model, (x, y) = MODELS["mlp"](), _data("mlp")
    P = sum(p.numel() for p in model.parameters())
    quick = dict(trace=None, density=False)
    with pytest.raises(UserError, match=f"k={P + 1} is larger than the number of parameters \\({P}\\)"):
        hessian_spectrum(model, x, y, k=P + 1, **quick)
    with pytest.raises(UserError, match="same number of samples"):
        hessian_spectrum(model, x, y[:-1], **quick)
    with pytest.raises(UserError, match="unknown criterion 'hinge'.*cross_entropy, mse"):
        hessian_spectrum(model, x, y, criterion="hinge", **quick)
    with pytest.raises(UserError, match="unknown operator 'fisher'.*hessian, ggn"):
        hessian_spectrum(model, x, y, operator="fisher", **quick)
    with pytest.raises(UserError, match="unknown which"):
        hessian_spectrum(model, x, y, which="middle", **quick)
    with pytest.raises(UserError, match="trace_matvecs must be an integer of at least 3"):
        hessian_spectrum(model, x, y, trace="hutchpp", trace_matvecs=2, density=False)
    with pytest.raises(UserError, match="mean loss over a batch"):
        hessian_spectrum(model, x, y, criterion=lambda o, t: F.cross_entropy(o, t, reduction="none"), **quick)
    with pytest.raises(UserError, match="loss could not be evaluated.*targets fit"):
        hessian_spectrum(model, x, y + 5, **quick)                  # labels beyond the 3 outputs
    with pytest.raises(UserError, match="targets shaped like the outputs"):
        hessian_spectrum(model, x, torch.randn(len(x), 2, dtype=D), criterion="mse", **quick)
    calls = []
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.fc2.bias[0] = float("nan")
    with pytest.raises(UserError, match="loss at the probe point is not finite"):
        hessian_spectrum(bad, x, y, progress=lambda *a: calls.append(a))
    assert calls == []                                              # nothing computed after the check


def test_repeated_top_eigenvalue_is_resolved_or_flagged_by_the_default_block():
    """A bias-free linear map under MSE has H = 2 / (n O) (I_O kron X^T X): every eigenvalue O
    times. With O = 3 the default block of 2 for the largest finds two copies and the notes say
    that the cluster reaches the block size; lanczos_block=3 resolves it, and top-1 with a block
    of 1 has the right value (float64, 1e-8 of the scale)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 5, generator=g, dtype=D)
    y = torch.randn(20, 3, generator=g, dtype=D)
    lam = np.linalg.eigvalsh(_dense(model, x, y, crit=F.mse_loss).numpy())[::-1]
    assert np.allclose(lam[:3], lam[0], rtol=1e-10)                      # the top is 3-fold
    res = hessian_spectrum(model, x, y, criterion="mse", k=3, trace=None, density=False, n_samples=None)
    assert not np.allclose(res.eigenvalues, lam[:3], rtol=0, atol=1e-8 * lam[0])   # 2 of the 3 copies ...
    assert any("appears 2 times" in n and "block size 2" in n for n in res.notes), res.notes   # ... and said so
    full = hessian_spectrum(model, x, y, criterion="mse", k=3, trace=None, density=False, n_samples=None,
                            lanczos_block=3)
    np.testing.assert_allclose(full.eigenvalues, lam[:3], rtol=0, atol=1e-8 * lam[0])
    top1 = hessian_spectrum(model, x, y, criterion="mse", k=1, trace=None, density=False, n_samples=None)
    assert abs(top1.eigenvalues[0] - lam[0]) < 1e-8 * lam[0]           # block 1: the value is right
