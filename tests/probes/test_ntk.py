"""probe.probes.ntk against a slow obvious reference, in float64, on tiny models.

Reference: the Jacobian J (N*O x P) built row by row with ``torch.autograd.grad`` on an eval-mode
float64 copy of the model; K_full = J1 J2^T. Every method computes the same sums in another order,
so in float64 they agree to rounding: |error| <~ P * eps * max|K| (P <= ~1200 here, so
<~3e-13 relative to the largest entry). We assert 1e-10 relative to the largest entry, which
leaves a thousandfold margin and still fails on any real mistake (a missing parameter, a wrong
BN mode or a transposed axis moves entries by O(1)).
"""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import probe.probes.ntk.api as ntk_mod
from probe.functional import eval_mode, flatten_params, functionalize, select_param_names, unflatten_like
from probe.errors import UserError
from probe.probes.ntk import (KERNEL_METHODS, NtkKind, NtkMethod, NtkResult, SpectrumResult, empirical_ntk,
                              ntk_spectrum, ntk_topk_lanczos)

RTOL = 1e-10      # exact identity in float64 (see the module docstring)
pytestmark = [
    # torch's forward-AD decompositions are loaded through torch.jit.script on first use
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    # BNCNN uses an even kernel with padding="same" on purpose (asymmetric padding)
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]
METHODS = ["jacobian", "ntvp", "layerwise", "auto"]
KINDS = ["full", "trace", "diagonal"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny float64 problems: one thread (see conftest.one_thread)."""


# ------------------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Tanh MLP whose middle layer is applied twice (a module called twice per forward)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h))
        return self.head(torch.tanh(self.l2(h)))


class BNCNN(nn.Module):
    """Conv-BN-ReLU(inplace) / grouped strided conv-BN / even-kernel 'same' conv / linear head.
    Covers both per-sample conv-gradient paths (few input channels per group: patch matrix;
    >= 8: batch-as-groups convolution backward), groups, stride and asymmetric padding."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 2, padding="same")
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        h = self.relu(self.bn1(self.c1(x)))
        h = self.relu(self.bn2(self.c2(h)))
        h = torch.tanh(self.c3(h))
        return self.fc(h.flatten(1))


class GatedAttention(nn.Module):
    """a(x) * sigmoid(b(x)) from two conv branches, an SE-style channel attention block, a
    GroupNorm and a free scalar parameter (the last two have no closed-form layer rule)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 3, padding=2, dilation=2)
        self.fc1, self.fc2 = nn.Linear(3, 2), nn.Linear(2, 3)
        self.norm = nn.GroupNorm(1, 3)
        self.gain = nn.Parameter(torch.tensor(1.3))
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        h = self.a(x) * torch.sigmoid(self.b(x))                  # multiplicative fusion
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
        h = self.norm(h * w[:, :, None, None]) * self.gain        # channel attention
        return self.head(h.flatten(1))


class SeqLinear(nn.Module):
    """A Linear layer applied at T=2 positions (input (N, 2, 16)): wide enough that the planner
    contracts it through the Gram identity instead of forming its Jacobian."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(16, 16), nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).flatten(1))


class Tricky(nn.Module):
    """A Linear weight that is also used outside its module: the closed-form layer rule alone
    would miss that gradient path, so the layerwise self-check must hand it to the generic path."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x) + x @ self.fc.weight)
        return self.out(h)


MODELS = {"mlp": (MLP, (5,)), "bn_cnn": (BNCNN, (2, 6, 6)), "gated": (GatedAttention, (2, 4, 4)),
          "seq": (SeqLinear, (2, 16)), "tricky": (Tricky, (4,))}


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    cls, _ = MODELS[name]
    model = cls().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):   # running stats far from (0, 1): eval != train
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.num_batches_tracked.fill_(7)
    model.train()                               # probes must cope with (and restore) train mode
    return model


def make_inputs(name: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + MODELS[name][1], generator=g, dtype=torch.float64)


def reference_jacobian(model: nn.Module, x: torch.Tensor, names=None) -> torch.Tensor:
    """(N*O, P) Jacobian, sample-major rows, by one autograd.grad call per (sample, output)."""
    ref = copy.deepcopy(model).double().eval()
    params = [p for n, p in ref.named_parameters() if p.requires_grad and (names is None or n in names)]
    y = ref(x).reshape(x.shape[0], -1)
    rows = []
    for i in range(y.shape[0]):
        for o in range(y.shape[1]):
            gs = torch.autograd.grad(y[i, o], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(gs, params)]))
    return torch.stack(rows).detach()


def expected(J1: torch.Tensor, J2: torch.Tensor, n1: int, n2: int, kind: str) -> np.ndarray:
    full = (J1 @ J2.T).numpy()
    O = J1.shape[0] // n1
    axes = full.reshape(n1, O, n2, O)
    return {"full": full, "trace": np.einsum("iaja->ij", axes),
            "diagonal": np.einsum("iaja->aij", axes)}[kind]


def assert_kernel(actual: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> None:
    assert actual.shape == want.shape
    assert actual.dtype == np.float64
    np.testing.assert_allclose(actual, want, rtol=0, atol=rtol * np.abs(want).max())


@pytest.fixture(scope="module")
def cases():
    out = {}
    for name in MODELS:
        model = make_model(name)
        x1, x2 = make_inputs(name, 6, 1), make_inputs(name, 4, 2)
        out[name] = (model, x1, x2, reference_jacobian(model, x1), reference_jacobian(model, x2))
    return out


def snapshot(model: nn.Module):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            {n: p.dtype for n, p in model.named_parameters()})


def assert_unchanged(model: nn.Module, snap) -> None:
    params, buffers, flags, modes, dtypes = snapshot(model)
    for n, p in snap[0].items():
        assert torch.equal(params[n], p), f"parameter {n} changed"
    for n, b in snap[1].items():
        assert torch.equal(buffers[n], b), f"buffer {n} changed"
    assert flags == snap[2] and modes == snap[3] and dtypes == snap[4]


# ------------------------------------------------------------------------------------------------
# Kernels against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "gated", "seq"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("square", [True, False], ids=["x1x1", "x1x2"])
def test_kernel_matches_reference(cases, name, kind, method, square):
    model, x1, x2, J1, J2 = cases[name]
    snap = snapshot(model)
    res = empirical_ntk(model, x1, None if square else x2, kind=kind, method=method,
                        dtype=torch.float64)
    n2 = x1.shape[0] if square else x2.shape[0]
    assert_kernel(res.kernel, expected(J1, J1 if square else J2, x1.shape[0], n2, kind))
    assert res.kind == kind and res.n1 == 6 and res.n2 == n2 and res.symmetric == square
    assert res.n_params == J1.shape[1] and res.n_outputs == J1.shape[0] // 6
    assert method == "auto" or res.method == method
    assert res.dtype == "float64"
    assert res.bn_mode == ("eval" if name == "bn_cnn" else "none")
    assert any("train mode" in note for note in res.notes)
    assert_unchanged(model, snap)          # incl. still in train mode, same running stats


def test_layerwise_uses_gram_identity_for_few_positions(cases):
    model, x1, _, J1, _ = cases["seq"]
    res = empirical_ntk(model, x1, kind="trace", method="layerwise", dtype=torch.float64)
    assert "2 structured layers (2 by Gram)" in res.schedule     # T=2 mix layer and T=1 head
    assert_kernel(res.kernel, expected(J1, J1, 6, 6, "trace"))


def test_layerwise_selfcheck_catches_parameter_used_outside_its_module(cases):
    model, x1, x2, J1, J2 = cases["tricky"]
    for kind in KINDS:
        res = empirical_ntk(model, x1, x2, kind=kind, method="layerwise", dtype=torch.float64)
        assert_kernel(res.kernel, expected(J1, J2, 6, 4, kind))
    assert any("failed the closed-form check" in note for note in res.notes)


def test_full_kernel_axis_convention(cases):
    model, x1, _, J1, _ = cases["mlp"]
    res = empirical_ntk(model, x1, kind="full", dtype=torch.float64)
    axes = res.full_axes()                                       # (N1, O, N2, O)
    i, a, j, b = 4, 2, 1, 0
    # row i*O + a is (sample i, output a): the reference row for d f_a(x_i) / d theta
    assert axes[i, a, j, b] == pytest.approx(float(J1[i * 3 + a] @ J1[j * 3 + b]), rel=RTOL)
    trace = empirical_ntk(model, x1, kind="trace", dtype=torch.float64).kernel
    assert_kernel(trace, np.einsum("iaja->ij", axes))


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "layerwise"])
def test_param_filter_restricts_the_kernel(cases, method):
    model, x1, x2, _, _ = cases["gated"]
    names = [n for n, _ in model.named_parameters() if n.startswith(("b.", "head.", "gain"))]
    J1 = reference_jacobian(model, x1, names)
    J2 = reference_jacobian(model, x2, names)
    res = empirical_ntk(model, x1, x2, kind=NtkKind.FULL, method=NtkMethod(method),
                        dtype=torch.float64, param_filter=[r"b\.", "head", "gain"])
    assert res.n_params == J1.shape[1]
    assert_kernel(res.kernel, expected(J1, J2, 6, 4, "full"))


def test_float32_model_close_to_float64(cases):
    model, x1, _, J1, _ = cases["bn_cnn"]
    m32 = copy.deepcopy(model).float()
    res = empirical_ntk(m32, x1.float(), kind="trace")
    assert res.dtype == "float32"
    # float32 Jacobians (eps 6e-8) summed over ~1200 parameters: rounding ~sqrt(P) * eps ~ 2e-6
    # of the largest entry; 1e-4 leaves a 50x margin and is still far below a modelling error.
    assert_kernel(res.kernel, expected(J1, J1, 6, 6, "trace"), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Blocking under a memory budget
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "layerwise"])
@pytest.mark.parametrize("kind", ["full", "trace"])
def test_tiny_budget_forces_blocks_same_result(cases, method, kind):
    model, x1, x2, J1, J2 = cases["bn_cnn"]
    big = empirical_ntk(model, x1, x2, kind=kind, method=method, dtype=torch.float64)
    schedules, blocks = set(), []
    budget = big.peak_memory_bytes
    while True:                        # shrink the budget until the method no longer fits
        budget = int(budget * 0.6)
        try:
            res = empirical_ntk(model, x1, x2, kind=kind, method=method, dtype=torch.float64,
                                memory_budget_bytes=budget)
        except UserError as exc:
            assert "memory_budget_bytes" in str(exc)
            break
        assert res.peak_memory_bytes <= budget
        assert_kernel(res.kernel, expected(J1, J2, 6, 4, kind))
        schedules.add(res.schedule)
        blocks.append(res.n_blocks)
    assert max(blocks) > max(big.n_blocks, 1) and len(schedules) >= 2
    # forced block size: symmetric case computes only blocks j >= i and mirrors them
    res = empirical_ntk(model, x1, kind=kind, method=method, dtype=torch.float64, block_size=2)
    assert_kernel(res.kernel, expected(J1, J1, 6, 6, kind))
    if method != "ntvp":
        assert res.n_blocks == 6                               # 3 row blocks: 3 + 2 + 1 pairs
    if kind == "trace":
        assert np.array_equal(res.kernel, res.kernel.T)        # symmetrised exactly


def test_jacobian_parameter_groups_when_one_sample_does_not_fit(cases):
    model, x1, x2, J1, J2 = cases["mlp"]
    seen = []
    budget = 2 ** 24
    while budget > 1000:
        budget //= 2
        try:
            res = empirical_ntk(model, x1, x2, kind="trace", method="jacobian", dtype=torch.float64,
                                memory_budget_bytes=budget)
        except UserError:
            break
        assert_kernel(res.kernel, expected(J1, J2, 6, 4, "trace"))
        seen.append(res.schedule)
    assert any(s.startswith("resident") for s in seen)
    assert any(s.startswith("blocks of") and "groups" not in s for s in seen)
    assert any("parameter groups" in s for s in seen)


# ------------------------------------------------------------------------------------------------
# Matrix-free top-k
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "gated"])
@pytest.mark.parametrize("kind", ["trace", "full"])
def test_lanczos_topk_matches_dense(cases, name, kind):
    model, x1, _, J1, _ = cases[name]
    snap = snapshot(model)
    K = expected(J1, J1, 6, 6, kind)
    dense = np.linalg.eigvalsh(K)[::-1]
    k = 4
    res = ntk_topk_lanczos(model, x1, k=k, kind=kind, dtype=torch.float64, block_size=4,
                           block_vectors=2, return_eigenvectors=True)
    # rtol 1e-8: Lanczos stops at Ritz residual <= 1e-10 * lambda_max (or spans the space), and
    # the eigenvalue error is at most the residual.
    np.testing.assert_allclose(res.eigenvalues, dense[:k], rtol=1e-8)
    assert res.converged and res.n_matvecs >= k
    Y = res.eigenvectors
    np.testing.assert_allclose(K @ Y, Y * res.eigenvalues, atol=1e-7 * dense[0])
    assert_unchanged(model, snap)


def test_lanczos_finds_repeated_eigenvalues_with_a_block(cases):
    # Only the head's weight: K_full = kron(H H^T, I_3), every eigenvalue three times. A block
    # of 3 vectors resolves multiplicity 3 (single-vector Lanczos would see each value once).
    model, x1, _, _, _ = cases["mlp"]
    J = reference_jacobian(model, x1, ["head.weight"])
    dense = np.linalg.eigvalsh((J @ J.T).numpy())[::-1]
    res = ntk_topk_lanczos(model, x1, k=6, kind="full", dtype=torch.float64,
                           param_filter=r"head\.weight", block_vectors=3)
    np.testing.assert_allclose(res.eigenvalues, dense[:6], rtol=1e-8)
    np.testing.assert_allclose(res.eigenvalues[:3], res.eigenvalues[0], rtol=1e-8)


def test_lanczos_trace_operator_is_sum_of_per_output_products(cases):
    # K_trace v = sum_o J_o (J_o^T v), not (sum_o J_o)(sum_o J_o)^T v: both differ here.
    model, x1, _, J1, _ = cases["gated"]
    fm = functionalize(model, dtype=torch.float64)
    op = ntk_mod._NtkOperator(fm, fm.prepare(x1), NtkKind.TRACE, 2, block=4)
    V = np.random.default_rng(0).standard_normal((6, 2))
    K = expected(J1, J1, 6, 6, "trace")
    np.testing.assert_allclose(op.matmat(V), K @ V, rtol=0, atol=RTOL * np.abs(K @ V).max())
    Jsum = J1.reshape(6, 2, -1).sum(1).numpy()
    assert np.abs(Jsum @ Jsum.T @ V - K @ V).max() > 1e-3 * np.abs(K @ V).max()


# ------------------------------------------------------------------------------------------------
# The model is never modified; user errors
# ------------------------------------------------------------------------------------------------


def test_model_unchanged_by_every_probe():
    model = make_model("bn_cnn")
    model.c1.bias.requires_grad_(False)          # a frozen parameter
    model.bn2.eval()                             # mixed train/eval flags must come back as they were
    x = make_inputs("bn_cnn", 5, 3)
    snap = snapshot(model)
    for kind in KINDS:
        for method in METHODS:
            empirical_ntk(model, x, kind=kind, method=method, dtype=torch.float64)
            assert_unchanged(model, snap)
    ntk_topk_lanczos(model, x, k=2, dtype=torch.float64)
    ntk_topk_lanczos(model, x, k=2)                                  # own dtype (float64 here)
    assert_unchanged(model, snap)
    assert model.training and not model.bn2.training
    res = empirical_ntk(model, x, dtype=torch.float64)
    assert res.n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_non_finite_outputs_are_a_user_error():
    model = make_model("mlp")
    snap = snapshot(model)
    x = make_inputs("mlp", 4, 0)
    x[2, 1] = float("nan")
    for fn in (lambda: empirical_ntk(model, x, dtype=torch.float64),
               lambda: ntk_topk_lanczos(model, x, k=2, dtype=torch.float64)):
        with pytest.raises(UserError, match="model outputs are not finite on the probe inputs"):
            fn()
    assert_unchanged(model, snap)


def test_impossible_budget_raises_before_allocating(monkeypatch):
    model = make_model("bn_cnn")
    x = make_inputs("bn_cnn", 8, 0)

    def boom(*args, **kwargs):
        raise AssertionError("an engine ran although the budget cannot hold the work")
    for name, method in KERNEL_METHODS.items():   # every kernel method's runner
        monkeypatch.setitem(KERNEL_METHODS, name, dataclasses.replace(method, run=boom))
    # the kernel itself does not fit: 8*8*3*3 float64 = 4.6 kB
    with pytest.raises(UserError, match=r"alone needs .*at most N1=\d+ samples fit"):
        empirical_ntk(model, x, kind="full", memory_budget_bytes=2000, dtype=torch.float64)
    # the kernel fits, no method's smallest working set does
    with pytest.raises(UserError, match=r"no NTK method fits .*memory_budget_bytes >= "):
        empirical_ntk(model, x, kind="trace", memory_budget_bytes=8 * 64 + 600, dtype=torch.float64)
    with pytest.raises(UserError, match="memory_budget_bytes"):
        ntk_topk_lanczos(model, x, k=2, memory_budget_bytes=1000, dtype=torch.float64)
    assert model.training


def test_bad_arguments_are_user_errors():
    model = make_model("mlp")
    x = make_inputs("mlp", 3, 0)
    with pytest.raises(UserError, match="unknown NTK kind"):
        empirical_ntk(model, x, kind="diag")
    with pytest.raises(UserError, match="unknown NTK method"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(UserError, match="selects no trainable parameter"):
        empirical_ntk(model, x, param_filter="nope")
    with pytest.raises(UserError, match="sample shape"):
        empirical_ntk(model, x, torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(UserError, match="k must be between"):
        ntk_topk_lanczos(model, x, k=4)
    with pytest.raises(UserError, match="diagonal"):
        ntk_spectrum(empirical_ntk(model, x, kind="diagonal"))


# ------------------------------------------------------------------------------------------------
# Spectrum on kernels with closed-form answers
# ------------------------------------------------------------------------------------------------


def test_spectrum_of_a_diagonal_kernel():
    s = ntk_spectrum(np.diag([1.0, 4.0, 2.0, 1.0]))
    np.testing.assert_allclose(s.eigenvalues, [4, 2, 1, 1], rtol=1e-14)   # eigvalsh of a diagonal
    assert s.condition_number == pytest.approx(4.0, rel=1e-14)
    # p = (1/2, 1/4, 1/8, 1/8): entropy = (1/2 + 2/4 + 2*3/8) ln 2 = 1.75 ln 2
    assert s.effective_rank == pytest.approx(2 ** 1.75, rel=1e-12)
    assert s.participation_ratio == pytest.approx(64 / 22, rel=1e-14)
    assert s.trace == pytest.approx(8.0) and s.n_below_floor == 0 and not s.notes


def test_spectrum_summaries_are_scale_free_up_to_huge_eigenvalues():
    # an untrained multiplicative net's kernel reaches 1e160 and more; lambda^2 overflows there
    base = np.diag([1.0, 4.0, 2.0, 1.0])
    for scale in (1e-150, 1e160, 1e300):
        s = ntk_spectrum(scale * base, y=np.array([0, 1, 0, 1]))
        assert s.participation_ratio == pytest.approx(64 / 22, rel=1e-13)
        assert s.effective_rank == pytest.approx(2 ** 1.75, rel=1e-12)
        assert s.condition_number == pytest.approx(4.0, rel=1e-13)
        assert s.alignment == pytest.approx(ntk_spectrum(base, y=np.array([0, 1, 0, 1])).alignment, rel=1e-12)


def test_spectrum_of_a_rank_one_kernel_and_alignment():
    u = np.array([1.0, -2.0, 0.5, 3.0])
    s = ntk_spectrum(np.outer(u, u), y=u)
    assert s.eigenvalues[0] == pytest.approx(u @ u, rel=1e-13)
    assert s.effective_rank == pytest.approx(1.0, rel=1e-10)      # rounding-level eigenvalues
    assert s.participation_ratio == pytest.approx(1.0, rel=1e-10)
    assert s.n_below_floor == 3 and s.condition_number == pytest.approx(1.0)
    assert any("near-singular" in n for n in s.notes)
    assert s.alignment == pytest.approx(1.0, rel=1e-14)           # K = y y^T is ideal
    # labels [0, 0, 1, 1] -> centred one-hot rows +-(1/2, -1/2): <I, YY^T> = ||Y||^2 = 2,
    # ||I||_F = 2, ||YY^T||_F = ||Y^T Y||_F = 2  ->  alignment 1/2 = 1/sqrt(n)
    s = ntk_spectrum(torch.eye(4, dtype=torch.float64), y=torch.tensor([0, 0, 1, 1]))
    assert s.alignment == pytest.approx(0.5, rel=1e-14)
    assert s.condition_number == pytest.approx(1.0) and s.effective_rank == pytest.approx(4.0)


def test_spectrum_of_an_ntk_result_and_full_kernel_targets(cases):
    model, x1, _, J1, _ = cases["mlp"]
    res = empirical_ntk(model, x1, kind="full", dtype=torch.float64)
    Y = np.random.default_rng(1).standard_normal((6, 3))
    s = ntk_spectrum(res, y=Y)
    K = expected(J1, J1, 6, 6, "full")
    np.testing.assert_allclose(s.eigenvalues, np.linalg.eigvalsh(K)[::-1], rtol=0,
                               atol=1e-12 * np.abs(K).max())
    y = Y.reshape(-1)                                               # sample-major flattening
    want = y @ K @ y / (np.linalg.norm(K) * (y @ y))
    assert s.alignment == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Results and the functional helper
# ------------------------------------------------------------------------------------------------


def test_result_round_trip_and_summary_is_json(cases):
    model, x1, _, _, _ = cases["bn_cnn"]
    res = empirical_ntk(model, x1, kind="diagonal", dtype=torch.float64, progress=lambda *a: None)
    summary = json.loads(json.dumps(res.summary()))
    back = NtkResult.from_store(summary, res.to_arrays())
    assert np.array_equal(back.kernel, res.kernel)
    assert (back.kind, back.method, back.n_outputs, back.schedule, back.notes) == (
        res.kind, res.method, res.n_outputs, res.schedule, res.notes)
    sp = ntk_spectrum(res.kernel[0])
    back = SpectrumResult.from_store(json.loads(json.dumps(sp.summary())), sp.to_arrays())
    assert back.condition_number == sp.condition_number
    lz = ntk_topk_lanczos(model, x1, k=2, dtype=torch.float64)
    assert json.dumps(lz.summary()) and set(lz.to_arrays()) == {"eigenvalues", "residuals"}


def test_functional_model_helpers():
    model = make_model("bn_cnn")
    snap = snapshot(model)
    fm = functionalize(model, param_filter=["c1", r"bn\d\.weight"], dtype=torch.float32)
    assert list(fm.params) == ["c1.weight", "c1.bias", "bn1.weight", "bn2.weight"]
    assert all(p.dtype == torch.float32 for p in fm.params.values())
    assert fm.buffers["bn1.num_batches_tracked"].dtype == torch.int64
    v = flatten_params(fm.params)
    assert v.shape == (fm.n_params,)
    back = unflatten_like(v * 2, fm.params)
    assert all(torch.equal(back[n], 2 * p) for n, p in fm.params.items())
    with pytest.raises(ValueError):
        unflatten_like(v[:-1], fm.params)
    x = make_inputs("bn_cnn", 3, 0).float()
    y = fm(fm.params, x)
    with torch.no_grad(), eval_mode(model):
        want = model(x.double()).float()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)       # float32 vs float64 forward
    torch.testing.assert_close(fm.batched(fm.params, x), y.reshape(3, -1))
    assert select_param_names(["a.w", "b.w"], lambda n: n.startswith("b")) == ["b.w"]
    # an exception inside the call still restores the modes
    with pytest.raises(RuntimeError):
        fm(fm.params, torch.randn(2, 5))
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------
# The parameter-space (gram) Lanczos operator
# ------------------------------------------------------------------------------------------------


def _gram_operator(model, x, kind, block=4, chunk=2):
    fm = functionalize(model, dtype=torch.float64)
    with eval_mode(model):
        x = fm.prepare(x)
        layers = ntk_mod._find_layers(fm)
        stats = ntk_mod._measure(fm, x[:1].clone(), layers)
        c = ntk_mod._Ctx(fm, NtkKind(kind), x, x, True, stats, 8, 2 ** 30)
        good, fallback, _ = ntk_mod._checked_layers(c, layers)
    op = ntk_mod._GramOperator(fm, x, NtkKind(kind), stats.n_outputs, good, fallback, block, chunk)
    return fm, op, fallback


def _stacked_jacobian(fm, J, n, kind):
    """The reference J (N*O, P) in the operator's layout: trace -> (N, O*P) with, per parameter
    tensor, its O output blocks side by side; full -> J itself."""
    if kind == "full":
        return J
    O = J.shape[0] // n
    J3 = J.reshape(n, O, -1)
    parts, off = [], 0
    for p in fm.params.values():
        parts.append(J3[:, :, off:off + p.numel()].reshape(n, -1))
        off += p.numel()
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("name", ["mlp", "bn_cnn", "gated"])
@pytest.mark.parametrize("kind", ["trace", "full"])
def test_gram_operator_is_jt_j_and_its_rows(cases, name, kind):
    # mlp: a module called twice (generic rows); bn_cnn: BatchNorm, grouped and asymmetric-padding
    # convolutions; gated: GroupNorm and a free scalar through vmap(jacrev). Blocks of 4 samples,
    # generic rows 2 at a time. Exact identities in float64: tolerance RTOL as for the kernels.
    model, x1, _, J1, _ = cases[name]
    snap = snapshot(model)
    fm, op, fallback = _gram_operator(model, x1, kind)
    assert (name == "gated") == bool(fallback)
    Js = _stacked_jacobian(fm, J1, x1.shape[0], kind)
    assert op.F == Js.shape[1] and op.n_units == Js.shape[0]
    P = torch.randn(3, op.F, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with eval_mode(model):
        MP, JP = op.matmat(P.T).T, op.rows_times(P.T)             # operator interface: (F, s) columns
    want = (P @ Js.T) @ Js                                           # rows of (J^T J P^T)^T
    np.testing.assert_allclose(MP.numpy(), want.numpy(), rtol=0, atol=RTOL * float(want.abs().max()))
    np.testing.assert_allclose(JP.numpy(), (Js @ P.T).numpy(), rtol=0,
                               atol=RTOL * float((Js @ P.T).abs().max()))
    assert op.sweeps == 1 and op.matvecs == 3
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["gram", "ntvp"])
def test_lanczos_methods_agree_with_dense_and_report_their_passes(cases, method):
    model, x1, _, J1, _ = cases["bn_cnn"]
    K = expected(J1, J1, 6, 6, "trace")
    dense = np.linalg.eigvalsh(K)[::-1]
    res = ntk_topk_lanczos(model, x1, k=3, method=method, dtype=torch.float64, block_vectors=2)
    np.testing.assert_allclose(res.eigenvalues, dense[:3], rtol=1e-8)   # see the dense test above
    assert res.method == method and res.summary()["method"] == method
    # gram: one pass over the data per block; ntvp: a VJP pass and a JVP pass per block
    assert res.n_passes == (res.n_matvecs // 2 if method == "gram" else res.n_matvecs)


def test_lanczos_auto_picks_gram_also_with_batch_statistics_fixed():
    """BatchNorm without running statistics: its statistics are fixed at those of the probe
    inputs, so gram applies, and both operators agree with the dense kernel of that model."""
    model = make_model("bn_cnn")
    x = make_inputs("bn_cnn", 6, 0)
    assert ntk_topk_lanczos(model, x, k=2, dtype=torch.float64).method == "gram"
    coupled = make_model("bn_cnn")
    coupled.bn1 = nn.BatchNorm2d(16, track_running_stats=False)   # batch statistics in eval mode
    dense = ntk_spectrum(empirical_ntk(coupled, x, dtype=torch.float64)).eigenvalues[:2]
    for method in ("auto", "ntvp"):
        res = ntk_topk_lanczos(coupled, x, k=2, method=method, dtype=torch.float64)
        assert res.method == ("gram" if method == "auto" else "ntvp")
        assert any("held fixed" in n for n in res.notes)
        np.testing.assert_allclose(res.eigenvalues, dense, rtol=1e-8)


def test_gram_budget_shrinks_the_block_or_refuses_before_running(monkeypatch):
    model = make_model("bn_cnn")
    x = make_inputs("bn_cnn", 8, 0)
    P = sum(p.numel() for p in model.parameters())
    F = 3 * P                                                    # trace layout, O = 3
    # room for ~30 float64 parameter-space vectors: the default block of min(k, 20) = 4 fits
    # no longer with a 100-vector Krylov cap, a smaller cap does
    budget = 30 * F * 8 + 2 ** 20
    res = ntk_topk_lanczos(model, x, k=4, dtype=torch.float64, memory_budget_bytes=budget)
    assert res.method == "gram" and res.subspace_dim * F * 8 < budget
    np.testing.assert_allclose(res.eigenvalues, ntk_topk_lanczos(model, x, k=4, dtype=torch.float64,
                                                                method="ntvp").eigenvalues, rtol=1e-7)

    def boom(*args, **kwargs):
        raise AssertionError("the gram operator ran although its basis cannot fit")
    monkeypatch.setattr(ntk_mod._GramOperator, "matmat", boom)
    with pytest.raises(UserError, match=r"method='gram' cannot run: the parameter-space basis needs"):
        ntk_topk_lanczos(model, x, k=4, method="gram", dtype=torch.float64,
                         memory_budget_bytes=4 * F * 8)
    res = ntk_topk_lanczos(model, x, k=4, dtype=torch.float64, memory_budget_bytes=4 * F * 8)
    assert res.method == "ntvp" and any("gram operator not used" in n for n in res.notes)


def test_gram_lanczos_in_float32_over_long_vectors_matches_float64():
    # 272k parameters x 10 outputs: inner products over 2.7M float32 elements. A float32 QR or
    # float32 dot products there lose ~1e-3 of orthogonality (the top Ritz value then came out
    # 7e-5 too high, above lambda_max); with float64 accumulation and SVQB the float32 result
    # agrees with a float64 dense kernel to float32 rounding of the model itself (rtol 1e-5).
    from models import create_model
    torch.manual_seed(0)
    model = create_model("resnet20_add", in_chans=1)
    model.eval()
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    dense = np.linalg.eigvalsh(empirical_ntk(model, x, dtype=torch.float64).kernel)[::-1]
    res = ntk_topk_lanczos(model, x, k=4, method="gram", memory_budget_bytes=2 ** 31)
    assert res.dtype == "float32" and res.converged
    np.testing.assert_allclose(res.eigenvalues, dense[:4], rtol=1e-5)
    assert res.eigenvalues[0] <= dense[0] * (1 + 1e-6)          # a Ritz value never exceeds it


def test_gram_lanczos_in_float32_survives_a_huge_kernel_scale():
    # A multiplicative net's kernel reaches 1e28: its Krylov vectors then have norms beyond
    # float32's sqrt(max) ~ 1.8e19. A float32 norm there is inf and made every new block look
    # degenerate (top eigenvalue 1e4 too small, never converged). Scaling the head by 1e13
    # multiplies the kernel by ~1e26 exactly; float32 agrees with the float64 dense kernel to
    # float32 rounding of the model (rtol 1e-4, the tolerance of the float32 tests above).
    model = make_model("bn_cnn")
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(1e13)
        head.bias.mul_(1e13)
    x = make_inputs("bn_cnn", 8, 0)
    dense = np.linalg.eigvalsh(empirical_ntk(model, x, dtype=torch.float64).kernel)[::-1]
    assert dense[0] > 1e24
    res = ntk_topk_lanczos(model, x, k=3, method="gram", dtype=torch.float32)
    assert res.converged and res.method == "gram"
    np.testing.assert_allclose(res.eigenvalues, dense[:3], rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# The registry's own models: fusion modules, pinned BatchNorm values, attention, gates
# ------------------------------------------------------------------------------------------------

ZOO = {
    # multiplicative mean-1 fusion bn(r) * bn_s(s), both BN biases init 1
    "tiny_mul": ("tiny_mul", {}),
    # sig(bn[b fixed 0](r)) * bn[b fixed 1](s): BN biases re-imposed in forward, not parameters
    "fmm08": ("cifar_resnet", {"depth": 8, "width": 4, "fusion": "fmm08"}),
    # Triplet attention (pooling, conv, sigmoid Gate) on every residual branch
    "tiny_triplet": ("tiny_triplet", {}),
}


@pytest.fixture(scope="module")
def zoo_cases():
    from models import create_model
    from probe.functional import calibrate_batchnorm
    out = {}
    for key, (name, kw) in ZOO.items():
        torch.manual_seed(0)
        model = create_model(name, in_chans=1, num_classes=3, **kw).double()
        model = calibrate_batchnorm(model, torch.randn(32, 1, 8, 8, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(5)))
        x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        out[key] = (model.train(), x, reference_jacobian(model, x))
    return out


@pytest.mark.parametrize("key", list(ZOO))
@pytest.mark.parametrize("method", METHODS)
def test_registry_models_kernels_match_reference(zoo_cases, key, method):
    model, x, J = zoo_cases[key]
    snap = snapshot(model)
    full = expected(J, J, 5, 5, "full")
    res = empirical_ntk(model, x, kind="full", method=method, dtype=torch.float64)
    assert_kernel(res.kernel, full)
    res = empirical_ntk(model, x, kind="trace", method=method, dtype=torch.float64)
    assert_kernel(res.kernel, expected(J, J, 5, 5, "trace"))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("key", list(ZOO))
@pytest.mark.parametrize("method", ["gram", "ntvp"])
def test_registry_models_lanczos_matches_dense(zoo_cases, key, method):
    model, x, J = zoo_cases[key]
    dense = np.linalg.eigvalsh(expected(J, J, 5, 5, "trace"))[::-1]
    res = ntk_topk_lanczos(model, x, k=3, method=method, dtype=torch.float64, block_vectors=3)
    assert res.converged and res.method == method
    np.testing.assert_allclose(res.eigenvalues, dense[:3], rtol=1e-8)   # tol 1e-8 * lambda_max


def _scaled_head_model(scale: float) -> nn.Module:
    model = make_model("bn_cnn").float()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.mul_(scale)
    return model


@pytest.mark.parametrize("method", ["auto", "jacobian", "ntvp", "layerwise"])
def test_kernel_beyond_float32_range_is_computed_in_float64_or_refused(method):
    # outputs of 1e20: the kernel (~1e40) is beyond float32's 3.4e38. Left to choose, the probe
    # computes in float64 and says so; asked for float32, it refuses instead of returning inf.
    model = _scaled_head_model(1e20)
    x = make_inputs("bn_cnn", 4, 0).float()
    ref = empirical_ntk(model, x, method=method, dtype=torch.float64)
    assert np.isfinite(ref.kernel).all() and np.abs(ref.kernel).max() > 1e39
    res = empirical_ntk(model, x, method=method)
    assert res.dtype == "float64" and any("overflow float32" in n for n in res.notes)
    np.testing.assert_allclose(res.kernel, ref.kernel, rtol=1e-12)     # the same float64 computation
    with pytest.raises(UserError, match="kernel overflowed float32 .*pass dtype=torch.float64"):
        empirical_ntk(model, x, method=method, dtype=torch.float32)


@pytest.mark.parametrize("method", ["gram", "ntvp"])
def test_lanczos_beyond_float32_range_is_computed_in_float64_or_refused(method):
    model = _scaled_head_model(1e20)
    x = make_inputs("bn_cnn", 6, 0).float()
    dense = np.linalg.eigvalsh(empirical_ntk(model, x, dtype=torch.float64).kernel)[::-1]
    res = ntk_topk_lanczos(model, x, k=2, method=method, block_vectors=2)
    assert res.dtype == "float64" and any("overflow float32" in n for n in res.notes)
    np.testing.assert_allclose(res.eigenvalues, dense[:2], rtol=1e-8)
    with pytest.raises(UserError, match="overflowed float32 .*pass dtype=torch.float64"):
        ntk_topk_lanczos(model, x, k=2, method=method, dtype=torch.float32)


@pytest.mark.parametrize("method", ["gram", "ntvp"])
def test_lanczos_says_which_eigenvalues_a_loose_tolerance_leaves_unresolved(cases, method):
    model, x1, _, J1, _ = cases["bn_cnn"]
    loose = ntk_topk_lanczos(model, x1, k=4, method=method, dtype=torch.float64, tol=0.3,
                             block_vectors=1)
    weak = loose.residuals > 1e-2 * loose.eigenvalues
    assert weak.any()                     # tol 0.3 * lambda_max leaves the smaller ones loose
    note = [n for n in loose.notes if "not resolved" in n]
    assert len(note) == 1 and note[0].startswith(f"{int(weak.sum())} of the top 4 eigenvalues")
    tight = ntk_topk_lanczos(model, x1, k=4, method=method, dtype=torch.float64, block_vectors=1)
    assert not any("not resolved" in n for n in tight.notes)
