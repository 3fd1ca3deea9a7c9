"""probe.probes.ntk on model classes from torch.nn (attention, transformer encoders, recurrent
layers), on models whose output is not a plain tensor, and on models whose eval-mode forward
couples the samples of a batch.

Reference: the float64 per-sample Jacobian J (N, O, P), one ``torch.autograd.grad`` call per
(sample, output) on an eval-mode deep copy of the model with each sample as its own batch of one;
K_full = J1 J2^T, K_trace = sum_o J1_o J2_o^T, K_diag[o] = J1_o J2_o^T. As in tests/probes/test_ntk.py
every method computes the same sums in another order, so in float64 they agree to rounding
(P <= ~1300 here): we assert 1e-10 relative to the largest entry.

BatchNorm without running statistics (``track_running_stats=False``) normalises every batch by
its own statistics, so its per-sample kernel is defined with those statistics held fixed at the
batch statistics of the probe inputs x1 (mean and biased variance of each such BatchNorm's input
over x1, what the eval-mode forward of the full batch x1 uses), not differentiated. Its reference
is the per-sample Jacobian of a copy whose BatchNorms carry those statistics as running statistics.
Any other coupling of the samples (``x - x.mean(0)``) has no per-sample kernel: a UserError.
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from probe.errors import UserError
from probe.probes.ntk import empirical_ntk, ntk_topk_lanczos

RTOL = 1e-10          # exact identity in float64 (see the module docstring)
LANCZOS_RTOL = 1e-8   # Ritz residual <= 1e-8 * lambda_max bounds the eigenvalue error
N1, N2, K_TOP = 6, 4, 5
METHODS = ["auto", "jacobian", "layerwise", "ntvp"]
LANCZOS_METHODS = ["auto", "gram", "ntvp"]

pytestmark = [
    # torch's forward-AD decompositions are loaded through torch.jit.script on first use
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    # nn.TransformerEncoder / MultiheadAttention notes about nested tensors and the fast path
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny float64 problems: one thread (see conftest.one_thread)."""


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Two TransformerEncoderLayers and a linear head on the mean over tokens. Without grad in
    eval mode each layer takes the fused fast path (no forward-mode AD)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True,
                                           dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention self-attention; a linear head on the flattened tokens."""

    def __init__(self, tokens: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8 * tokens, 3)

    def forward(self, x):
        a, _ = self.attn(x, x, x)
        return self.head(a.flatten(1))


class Recurrent(nn.Module):
    """LSTM / GRU (optionally bidirectional), hidden 5, a linear head on the last time step or on
    the final hidden state."""

    def __init__(self, cell: str, bidirectional: bool = False, on_state: bool = False):
        super().__init__()
        self.rnn = getattr(nn, cell)(3, 5, batch_first=True, bidirectional=bidirectional)
        self.on_state = on_state
        self.head = nn.Linear(10 if bidirectional else 5, 2)

    def forward(self, x):
        out, state = self.rnn(x)
        if self.on_state:
            h = state[0] if isinstance(state, tuple) else state      # (layers*dirs, N, H)
            return self.head(h[-1])
        return self.head(out[:, -1])


class ModelOutput(OrderedDict):
    """A HuggingFace-style ``ModelOutput``: an ordered mapping whose entries are also attributes
    (``None`` fields are left out, as there)."""

    def __init__(self, **fields):
        super().__init__((k, v) for k, v in fields.items() if v is not None)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ClassifierOutput(ModelOutput):
    """Fields of a sequence-classification output (loss, logits, hidden_states)."""

    def __init__(self, loss=None, logits=None, hidden_states=None):
        super().__init__(loss=loss, logits=logits, hidden_states=hidden_states)


class MultiOut(nn.Module):
    """A tanh MLP whose forward returns its logits together with the hidden layer, as
    ``style``: "dict" {"hidden", "logits"}, "model_output" (ClassifierOutput), "tuple"
    (logits, hidden), "no_logits" {"hidden", "scores"} (two tensors, no logits entry) or
    "one_tensor" {"scores", "name"} (one tensor entry and a string)."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.l1, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        y = self.head(h)
        if self.style == "dict":
            return {"hidden": h, "logits": y}          # logits not first: selected by name
        if self.style == "model_output":
            return ClassifierOutput(logits=y, hidden_states=h)
        if self.style == "tuple":
            return y, h
        if self.style == "no_logits":
            return {"hidden": h, "scores": y}
        if self.style == "one_tensor":
            return {"name": "multi-out", "scores": y}
        raise AssertionError(self.style)


class Centered(nn.Module):
    """head(x - x.mean(0)): the batch mean couples the samples (no BatchNorm involved)."""

    def __init__(self):
        super().__init__()
        self.l1, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.l1(x - x.mean(0, keepdim=True))))


class BatchStatMLP(nn.Module):
    """Linear -> BatchNorm1d(track_running_stats=False) -> ReLU -> Linear."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6, track_running_stats=False)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.bn(self.l1(x))))


class _DetachedGradSoftplus(torch.autograd.Function):
    """softplus with a custom backward that detaches its incoming gradient: first-order
    gradients (and vmap(jacrev)) are right, there is no forward-mode AD, and a VJP of the VJP
    would silently be wrong."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return g.detach() * torch.sigmoid(x)


class DetachedGrad(nn.Module):
    """Linear -> custom softplus (see :class:`_DetachedGradSoftplus`) -> Linear: no ntvp."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(_DetachedGradSoftplus.apply(self.a(x)))


def _tensor(out):
    assert isinstance(out, torch.Tensor)
    return out


# name: (constructor, sample shape, the tensor of the output the kernel is of by default)
MODELS = {
    "encoder": (Encoder, (5, 8), _tensor),
    "mha": (SelfAttention, (4, 8), _tensor),
    "lstm": (lambda: Recurrent("LSTM"), (4, 3), _tensor),
    "gru": (lambda: Recurrent("GRU", on_state=True), (4, 3), _tensor),
    "bilstm": (lambda: Recurrent("LSTM", bidirectional=True), (4, 3), _tensor),
    "dict": (lambda: MultiOut("dict"), (4,), lambda out: out["logits"]),
    "model_output": (lambda: MultiOut("model_output"), (4,), lambda out: out.logits),
    "tuple": (lambda: MultiOut("tuple"), (4,), lambda out: out[0]),
    "one_tensor": (lambda: MultiOut("one_tensor"), (4,), lambda out: out["scores"]),
    "batchstat": (BatchStatMLP, (4,), _tensor),
    "detached": (DetachedGrad, (4,), _tensor),
}
# models whose forward takes torch's fused attention fast path when no gradient is recorded:
# forward-mode AD (method="ntvp") may be refused there, with a UserError
FAST_PATH = {"encoder", "mha"}
RECURRENT = ["lstm", "gru", "bilstm"]


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)       # affine parameters away from (1, 0)
                m.bias.uniform_(-0.3, 0.3)
    model.train()                                 # probes must cope with (and restore) train mode
    return model


def make_inputs(name: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + MODELS[name][1], generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------


def reference_jacobian(model: nn.Module, x: torch.Tensor, select=_tensor) -> torch.Tensor:
    """(N, O, P) float64 Jacobian of ``select(model(x_i))``, each sample its own batch of one,
    one autograd.grad call per (sample, output), on an eval-mode copy of the model."""
    ref = copy.deepcopy(model).double().eval()
    params = [p for p in ref.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        y = select(ref(x[i:i + 1])).reshape(-1)
        rows = []
        for o in range(y.shape[0]):
            gs = torch.autograd.grad(y[o], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(gs, params)]))
        out.append(torch.stack(rows))
    return torch.stack(out).detach()


def expected(J1: torch.Tensor, J2: torch.Tensor, kind: str) -> np.ndarray:
    """The kernel of ``kind`` from per-sample Jacobians (N1, O, P) and (N2, O, P)."""
    n1, O, _ = J1.shape
    n2 = J2.shape[0]
    axes = torch.einsum("iap,jbp->iajb", J1, J2).numpy()
    return {"full": axes.reshape(n1 * O, n2 * O), "trace": np.einsum("iaja->ij", axes),
            "diagonal": np.einsum("iaja->aij", axes)}[kind]


def top_eigenvalues(J: torch.Tensor, k: int = K_TOP) -> np.ndarray:
    return np.linalg.eigvalsh(expected(J, J, "trace"))[::-1][:k]


def assert_kernel(actual: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> None:
    assert actual.shape == want.shape
    assert actual.dtype == np.float64
    np.testing.assert_allclose(actual, want, rtol=0, atol=rtol * np.abs(want).max())


def batch_stat_reference_model(model: nn.Module, x1: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in which every BatchNorm without running statistics is replaced by one
    with running statistics: the mean and biased variance of its input over the full batch
    ``x1`` (recorded by forward hooks on the eval-mode forward of x1), same affine parameters."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    norms = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats}
    assert norms

    def hook(name):
        def record(mod, inputs, output):
            a = inputs[0].detach()
            dims = [d for d in range(a.dim()) if d != 1]
            stats[name] = (a.mean(dims), a.var(dims, unbiased=False))
        return record

    flags = {n: m.training for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook(n)) for n, m in norms.items()]
    try:
        model.eval()
        with torch.no_grad():
            model(x1)
    finally:
        for h in handles:
            h.remove()
        for n, m in model.named_modules():
            m.training = flags[n]
    ref = copy.deepcopy(model).double().eval()
    for name, old in norms.items():
        new = nn.BatchNorm1d(old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
                             track_running_stats=True).double()
        with torch.no_grad():
            new.running_mean.copy_(stats[name][0])
            new.running_var.copy_(stats[name][1])
            if old.affine:
                new.weight.copy_(old.weight)
                new.bias.copy_(old.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent_name) if parent_name else ref, child, new.eval())
    return ref


# ------------------------------------------------------------------------------------------------
# The model is never modified
# ------------------------------------------------------------------------------------------------


def snapshot(model: nn.Module):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            {n: (p.dtype, p.device) for n, p in model.named_parameters()},
            {n: (m.track_running_stats, m.running_mean is None) for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)},
            {n: (type(m), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for n, m in model.named_modules()})


def assert_unchanged(model: nn.Module, snap) -> None:
    now = snapshot(model)
    assert now[0].keys() == snap[0].keys() and now[1].keys() == snap[1].keys()
    for n, p in snap[0].items():
        assert torch.equal(now[0][n], p), f"parameter {n} changed"
    for n, b in snap[1].items():
        assert torch.equal(now[1][n], b), f"buffer {n} changed"
    assert now[2:] == snap[2:], "flags, modes, dtypes, BatchNorm settings, modules or hooks changed"


# ------------------------------------------------------------------------------------------------
# Cases (built once per module, on first use)
# ------------------------------------------------------------------------------------------------


class Case:
    def __init__(self, name: str):
        self.name = name
        self.model = make_model(name)
        self.x1, self.x2 = make_inputs(name, N1, 1), make_inputs(name, N2, 2)
        select = MODELS[name][2]
        ref = batch_stat_reference_model(self.model, self.x1) if name == "batchstat" else self.model
        self.reference_model = ref
        self.J1 = reference_jacobian(ref, self.x1, select)
        self.J2 = reference_jacobian(ref, self.x2, select)


@pytest.fixture(scope="module")
def cases():
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = Case(name)
        return built[name]
    return get


def check_ntk(case: Case, method: str, kind: str, square: bool, **kw):
    """empirical_ntk on the case against the reference; returns the result."""
    snap = snapshot(case.model)
    res = empirical_ntk(case.model, case.x1, None if square else case.x2, kind=kind, method=method,
                        dtype=torch.float64, **kw)
    assert_kernel(res.kernel, expected(case.J1, case.J1 if square else case.J2, kind))
    assert method == "auto" or res.method == method
    assert res.n_params == case.J1.shape[2] and res.n_outputs == case.J1.shape[1]
    assert_unchanged(case.model, snap)
    return res


# ------------------------------------------------------------------------------------------------
# torch.nn model classes against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["encoder", "mha", *RECURRENT])
@pytest.mark.parametrize("method", METHODS)
def test_kernel_matches_reference(cases, name, method):
    case = cases(name)
    # the fused fast paths have no forward-mode AD: ntvp takes J t as a VJP of the VJP there
    check_ntk(case, method, "full", square=False)
    check_ntk(case, method, "diagonal", square=False)
    res = check_ntk(case, method, "trace", square=True)
    assert res.symmetric and np.array_equal(res.kernel, res.kernel.T)


@pytest.mark.parametrize("name", ["encoder", "mha", *RECURRENT])
@pytest.mark.parametrize("method", LANCZOS_METHODS)
def test_lanczos_matches_dense_reference(cases, name, method):
    case = cases(name)
    snap = snapshot(case.model)

    def run():
        return ntk_topk_lanczos(case.model, case.x1, k=K_TOP, method=method, dtype=torch.float64)
    res = run()
    if res.method == "ntvp" and name in FAST_PATH:
        assert any("VJP of the VJP" in n for n in res.notes), res.notes
    np.testing.assert_allclose(res.eigenvalues, top_eigenvalues(case.J1), rtol=LANCZOS_RTOL)
    assert res.converged
    assert method == "auto" or res.method == method
    assert_unchanged(case.model, snap)


def _ntvp_failed(notes) -> bool:
    return any("ntvp" in n and "fail" in n for n in notes)


def test_ntvp_refuses_a_model_whose_backward_cannot_be_differentiated(cases):
    """No forward-mode AD and a backward that detaches its gradient: the VJP-of-VJP route is
    checked (<Jt, c> = <t, J^T c>) and refused in words, never a silently wrong kernel."""
    case = cases("detached")
    for fn in (lambda: empirical_ntk(case.model, case.x1, method="ntvp", dtype=torch.float64),
               lambda: ntk_topk_lanczos(case.model, case.x1, k=K_TOP, method="ntvp",
                                        dtype=torch.float64)):
        with pytest.raises(UserError, match="ntvp.*not differentiable in the incoming gradient"):
            fn()


def test_auto_moves_on_when_a_method_fails_on_the_model(cases, monkeypatch):
    """The chain itself: the cheapest plan (layerwise) raising as a model without support for an
    operation would makes auto record it and give the next method's (right) kernel; asked for
    by name, the failing method is a UserError."""
    import dataclasses

    from probe.probes.ntk import KERNEL_METHODS

    case = cases("detached")
    snap = snapshot(case.model)

    def unsupported(*args, **kwargs):
        raise NotImplementedError("an operation without a batching rule")
    monkeypatch.setitem(KERNEL_METHODS, "layerwise", dataclasses.replace(KERNEL_METHODS["layerwise"], run=unsupported))
    res = empirical_ntk(case.model, case.x1, kind="trace", dtype=torch.float64)
    assert res.method == "jacobian"
    assert any("layerwise failed on this model" in n and "batching rule" in n for n in res.notes)
    assert_kernel(res.kernel, expected(case.J1, case.J1, "trace"))
    with pytest.raises(UserError, match="method='layerwise' does not work on this model"):
        empirical_ntk(case.model, case.x1, kind="trace", method="layerwise", dtype=torch.float64)
    assert_unchanged(case.model, snap)


def test_no_method_works_is_one_clear_error(cases):
    """At a budget where only ntvp fits, on a model where ntvp cannot work: one error naming the
    failure and why the others were not tried."""
    case = cases("detached")
    budget = 1 << 20
    while True:
        budget = int(budget * 0.8)
        assert budget > 100, "no budget found at which ntvp alone fits"
        try:
            empirical_ntk(case.model, case.x1, method="jacobian", dtype=torch.float64,
                          memory_budget_bytes=budget)
            continue
        except UserError:
            pass
        try:
            empirical_ntk(case.model, case.x1, method="layerwise", dtype=torch.float64,
                          memory_budget_bytes=budget)
        except UserError:
            break
    with pytest.raises(UserError) as err:
        empirical_ntk(case.model, case.x1, dtype=torch.float64, memory_budget_bytes=budget)
    msg = str(err.value)
    assert "ntvp failed" in msg or "no NTK method fits" in msg
    if "ntvp failed" in msg:
        assert "jacobian:" in msg and "layerwise:" in msg


def test_encoder_lanczos_auto_and_ntvp_match(cases):
    case = cases("encoder")
    snap = snapshot(case.model)
    for method in ("auto", "ntvp"):
        res = ntk_topk_lanczos(case.model, case.x1, k=K_TOP, method=method, dtype=torch.float64)
        np.testing.assert_allclose(res.eigenvalues, top_eigenvalues(case.J1), rtol=LANCZOS_RTOL)
        assert res.converged
    assert_unchanged(case.model, snap)


def test_lanczos_auto_when_gram_does_not_fit_and_ntvp_fails(cases):
    """gram refused by the budget and ntvp failing on the model: a clear error naming both."""
    case = cases("detached")
    budget = 1 << 24
    while True:
        budget //= 2
        assert budget > 1000, "no budget found at which gram does not fit"
        try:
            ntk_topk_lanczos(case.model, case.x1, k=K_TOP, method="gram", dtype=torch.float64,
                             memory_budget_bytes=budget)
        except UserError:
            break
    with pytest.raises(UserError, match="ntvp.*(gram|basis)"):
        ntk_topk_lanczos(case.model, case.x1, k=K_TOP, dtype=torch.float64, memory_budget_bytes=budget)


# ------------------------------------------------------------------------------------------------
# Outputs that are not a plain tensor: output=
# ------------------------------------------------------------------------------------------------

OUTPUTS = {
    # id: (model, output=, the reference's selection)
    "dict-default": ("dict", None, lambda out: out["logits"]),
    "dict-key": ("dict", "hidden", lambda out: out["hidden"]),
    "dict-callable": ("dict", lambda out: out["hidden"], lambda out: out["hidden"]),
    "model_output-default": ("model_output", None, lambda out: out.logits),
    "model_output-key": ("model_output", "hidden_states", lambda out: out.hidden_states),
    "model_output-callable": ("model_output", lambda out: out.hidden_states,
                              lambda out: out.hidden_states),
    "tuple-default": ("tuple", None, lambda out: out[0]),
    "tuple-callable": ("tuple", lambda out: out[1], lambda out: out[1]),
    "one_tensor-default": ("one_tensor", None, lambda out: out["scores"]),
    "one_tensor-key": ("one_tensor", "scores", lambda out: out["scores"]),
}


@pytest.fixture(scope="module")
def output_refs(cases):
    built = {}

    def get(key: str):
        if key not in built:
            name, _, select = OUTPUTS[key]
            case = cases(name)
            built[key] = (reference_jacobian(case.model, case.x1, select),
                          reference_jacobian(case.model, case.x2, select))
        return built[key]
    return get


@pytest.mark.parametrize("key", list(OUTPUTS))
def test_output_selects_the_tensor(cases, output_refs, key):
    name, output, _ = OUTPUTS[key]
    case = cases(name)
    J1, J2 = output_refs(key)
    snap = snapshot(case.model)
    for method in METHODS:
        res = empirical_ntk(case.model, case.x1, case.x2, kind="full", method=method, output=output,
                            dtype=torch.float64)
        assert_kernel(res.kernel, expected(J1, J2, "full"))
        assert res.n_outputs == J1.shape[1]
    for method in LANCZOS_METHODS:
        res = ntk_topk_lanczos(case.model, case.x1, k=K_TOP, method=method, output=output,
                               dtype=torch.float64)
        np.testing.assert_allclose(res.eigenvalues, top_eigenvalues(J1), rtol=LANCZOS_RTOL)
    assert_unchanged(case.model, snap)


@pytest.mark.parametrize("name", ["dict", "model_output", "one_tensor"])
def test_output_unknown_key_is_a_user_error(cases, name):
    case = cases(name)
    keys = list(case.model(case.x1[:1]).keys())
    snap = snapshot(case.model)
    for fn in (lambda: empirical_ntk(case.model, case.x1, output="nope", dtype=torch.float64),
               lambda: ntk_topk_lanczos(case.model, case.x1, k=2, output="nope", dtype=torch.float64)):
        with pytest.raises(UserError, match="nope") as err:
            fn()
        for k in keys:
            assert k in str(err.value), f"available key {k!r} not named: {err.value}"
    assert_unchanged(case.model, snap)


def test_output_key_on_a_tuple_is_a_user_error(cases):
    case = cases("tuple")
    with pytest.raises(UserError, match="hidden"):
        empirical_ntk(case.model, case.x1, output="hidden", dtype=torch.float64)


def test_output_mapping_without_logits_is_ambiguous():
    torch.manual_seed(0)
    model = MultiOut("no_logits").double()
    x = make_inputs("dict", 4, 0)
    snap = snapshot(model)
    for fn in (lambda: empirical_ntk(model, x, dtype=torch.float64),
               lambda: ntk_topk_lanczos(model, x, k=2, dtype=torch.float64)):
        with pytest.raises(UserError, match=re.escape("output=")) as err:
            fn()
        assert "hidden" in str(err.value) and "scores" in str(err.value)
    assert_unchanged(model, snap)
    # either tensor can be chosen explicitly
    J = reference_jacobian(model, x, lambda out: out["scores"])
    res = empirical_ntk(model, x, output="scores", dtype=torch.float64)
    assert_kernel(res.kernel, expected(J, J, "trace"))


# ------------------------------------------------------------------------------------------------
# Samples coupled by the forward pass
# ------------------------------------------------------------------------------------------------

COUPLED_CALLS = {
    **{f"ntk-{m}": (lambda model, x, m=m: empirical_ntk(model, x, method=m, dtype=torch.float64))
       for m in METHODS},
    "ntk-x2": lambda model, x: empirical_ntk(model, x, x[:3] + 1, kind="full", dtype=torch.float64),
    **{f"lanczos-{m}": (lambda model, x, m=m: ntk_topk_lanczos(model, x, k=2, method=m,
                                                               dtype=torch.float64))
       for m in LANCZOS_METHODS},
}


@pytest.mark.parametrize("call", list(COUPLED_CALLS))
def test_coupled_samples_are_a_user_error(call):
    torch.manual_seed(0)
    model = Centered().double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    snap = snapshot(model)
    with pytest.raises(UserError, match="couples samples"):
        COUPLED_CALLS[call](model, x)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------
# BatchNorm without running statistics: statistics fixed at those of x1
# ------------------------------------------------------------------------------------------------


def _notes_fixed_statistics(notes) -> bool:
    return any("statistics" in n and "fixed" in n for n in notes)


def test_batch_statistics_reference_is_the_full_batch_forward(cases):
    # the reference copy reproduces the original's eval-mode outputs on the full batch x1
    case = cases("batchstat")
    original = copy.deepcopy(case.model).eval()
    with torch.no_grad():
        full = original(case.x1)
        per_sample = torch.cat([case.reference_model(case.x1[i:i + 1]) for i in range(N1)])
        batched = case.reference_model(case.x1)
        assert not torch.allclose(full[:2], original(case.x1[:2]))    # the original is batch-dependent
    torch.testing.assert_close(per_sample, full, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(batched, full, rtol=1e-13, atol=1e-13)


def test_batch_statistics_probe_outputs_equal_full_batch_outputs(cases):
    from probe.functional import fix_batch_statistics, functionalize
    case = cases("batchstat")
    snap = snapshot(case.model)
    fm = functionalize(case.model, dtype=torch.float64)
    fixed, note = fix_batch_statistics(fm, case.x1)
    assert note and _notes_fixed_statistics([note])
    with torch.no_grad():
        want = case.reference_model(case.x1)
        got = fixed(fixed.params, case.x1)
        one = torch.cat([fixed(fixed.params, case.x1[i:i + 1]) for i in range(N1)])
        chunked = fix_batch_statistics(fm, case.x1, chunk=4)[0]
        got_chunked = chunked(chunked.params, case.x1)
    for y in (got, one, got_chunked):
        torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-13)
    assert_unchanged(case.model, snap)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["full", "trace", "diagonal"])
@pytest.mark.parametrize("square", [True, False], ids=["x1x1", "x1x2"])
def test_batch_statistics_kernel_matches_reference(cases, method, kind, square):
    case = cases("batchstat")
    res = check_ntk(case, method, kind, square)     # x2: statistics of x1, not of x2
    assert _notes_fixed_statistics(res.notes), res.notes
    assert not case.model.bn.track_running_stats and case.model.bn.running_mean is None
    assert case.model.training and case.model.bn.training


@pytest.mark.parametrize("method", LANCZOS_METHODS)
@pytest.mark.parametrize("kind", ["trace", "full"])
def test_batch_statistics_lanczos_matches_reference(cases, method, kind):
    case = cases("batchstat")
    snap = snapshot(case.model)
    K = expected(case.J1, case.J1, kind)
    dense = np.linalg.eigvalsh(K)[::-1][:K_TOP]
    res = ntk_topk_lanczos(case.model, case.x1, k=K_TOP, kind=kind, method=method,
                           dtype=torch.float64, block_vectors=2, return_eigenvectors=True)
    np.testing.assert_allclose(res.eigenvalues, dense, rtol=LANCZOS_RTOL)
    assert method == "auto" or res.method == method
    Y = res.eigenvectors
    np.testing.assert_allclose(K @ Y, Y * res.eigenvalues, atol=1e-7 * dense[0])
    assert _notes_fixed_statistics(res.notes), res.notes
    assert_unchanged(case.model, snap)


# ------------------------------------------------------------------------------------------------
# auto under shrinking budgets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_auto_under_tight_budgets_matches_reference(cases, name):
    # Halve the budget from the unconstrained plan's peak until nothing fits: every budget that
    # runs gives the reference kernel (whichever method auto picks, including when one fails on
    # the model), within the budget, and leaves the model as it was.
    case = cases(name)
    snap = snapshot(case.model)
    want = expected(case.J1, case.J2, "trace")
    res = empirical_ntk(case.model, case.x1, case.x2, kind="trace", dtype=torch.float64)
    assert_kernel(res.kernel, want)
    budget, seen = res.peak_memory_bytes, {res.method}
    runs = 1
    while budget > 1000:
        budget //= 2
        try:
            res = empirical_ntk(case.model, case.x1, case.x2, kind="trace", dtype=torch.float64,
                                memory_budget_bytes=budget)
        except UserError as exc:
            # nothing fits, or only a method that fails on the model (ntvp on the encoder)
            assert "memory_budget_bytes" in str(exc) or "no NTK method" in str(exc), str(exc)
            break
        finally:
            assert_unchanged(case.model, snap)
        assert_kernel(res.kernel, want)
        assert res.peak_memory_bytes <= budget
        seen.add(res.method)
        runs += 1
    assert runs >= 2, f"no smaller budget ran (methods seen: {seen})"
