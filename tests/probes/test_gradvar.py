"""The gradient-variance probe (probe.probes.gradvar) against closed forms and slow references.

Tolerances. Identities that only reorder float64 sums (vmap vs a per-sample ``autograd.grad``
loop, streamed moments vs the materialised per-sample gradients, the library's mini-batch moments
vs a direct computation over the same batches, relative update by hand) are asserted to 1e-10
relative: rounding is ~1e-15 here and any real mistake (a wrong BN mode, a missing sample or
parameter, divisor K instead of K-1) moves them by O(1e-2) or more. Statistical statements (the
closed form of least squares, unbiasedness over seeds) are asserted within 5 standard errors,
estimated from the same samples (fixed seeds, so the tests are deterministic).
"""
from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from models import create_model
from probe.errors import UserError
from probe.probes import gradvar as gv
from probe.functional import calibrate_batchnorm
from probe.probes.gradvar import (GradVarParams, GradVarResult, find_blocks, gradient_variance,
                                  minibatch_gradient_stats, minibatch_indices, per_sample_gradients,
                                  per_sample_variance, signal_propagation)
from probe.probes.registry import ProbeContext, get_probe, make_params, param_fields

RTOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny float64 problems: one thread (see conftest.one_thread)."""


def half_sq(out, y):
    """Per-sample least-squares loss 0.5 (f(x) - y)^2: (B,)."""
    return 0.5 * (out.reshape(-1) - y) ** 2


def close(a, b, rtol=RTOL):
    """|a - b| <= rtol * max|b| over the finite entries; non-finite entries must match exactly."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    fin = np.isfinite(b)
    if a.shape != b.shape or not np.array_equal(a[~fin], b[~fin], equal_nan=True) or not np.isfinite(a[fin]).all():
        return False
    if not fin.any():
        return True
    scale = max(float(np.abs(b[fin]).max()), 1e-300)
    return float(np.abs(a[fin] - b[fin]).max()) <= rtol * scale


def rebuilder(name, **kw):
    def rebuild(seed):
        torch.manual_seed(seed)
        return create_model(name, **kw)
    return rebuild


def tiny(name="tiny_add", seed=0, **kw):
    """A float64 tiny model with non-trivial BatchNorm running statistics and affine values."""
    torch.manual_seed(seed)
    m = create_model(name, **kw).double()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                if mod.weight is not None:
                    mod.weight.uniform_(0.5, 1.5)
                if mod.bias is not None:
                    mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


def image_data(n=24, seed=1, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def linear_problem(n, d=5, sigma=0.7, seed=0):
    """nn.Linear(d, 1) at (w, b) and data x ~ N(0, I_d), y = w* . x + sigma eps."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w_star + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_((w_star + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)).reshape(1, d))
        model.bias.fill_(0.4)
    return model, x, y, w_star, sigma


# ------------------------------------------------------------------------------------------------
# parameters and registration
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("batches", 1), ("batches", True), ("batch_size", 0), ("lr", 0.0),
                                         ("lr", float("nan")), ("per_sample", 1), ("chunk", 0), ("seeds", 0),
                                         ("signal", "yes"), ("dtype", "float16"), ("bn", "batch")])
def test_params_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(UserError, match=rf"^{field} "):
        GradVarParams(**{field: value})


def test_registered_probe_contract():
    p = get_probe("gradvar")
    assert p.params is GradVarParams and p.result is GradVarResult and p.default_n == 512
    assert p.figure is not None and p.compute is gv.compute
    fields = {f.name: f for f in param_fields(GradVarParams)}
    assert set(fields) == {"batches", "batch_size", "lr", "per_sample", "chunk", "seeds", "signal", "dtype", "bn"}
    assert fields["dtype"].metadata["choices"] == ("float32", "float64")
    assert fields["bn"].metadata["choices"] == ("eval", "train")
    with pytest.raises(UserError, match="bn must be one of"):
        make_params(GradVarParams, {"bn": "frozen"})
    assert make_params(GradVarParams, {"batches": 4}).batches == 4


# ------------------------------------------------------------------------------------------------
# 1. mini-batch statistics
# ------------------------------------------------------------------------------------------------

def test_kb_greater_than_n_refused():
    model, x, y, *_ = linear_problem(100)
    with pytest.raises(UserError, match=r"8 \* 32 = 256 exceeds the 100 samples"):
        gradient_variance(model, x, y, GradVarParams(), loss=half_sq)
    with pytest.raises(UserError, match="batches"):
        minibatch_indices(10, 3, 4)
    idx = minibatch_indices(12, 3, 4, seed=5)
    assert idx.shape == (3, 4) and len(set(idx.reshape(-1).tolist())) == 12          # all distinct


def direct_batch_grads(model, x, y, idx, loss):
    """g_k (K, P) with autograd on an eval-mode copy."""
    m = copy.deepcopy(model).eval()
    rows = []
    for b in idx:
        m.zero_grad()
        loss(m(x[b]), y[b]).mean().backward()
        rows.append([p.grad.detach().reshape(-1).clone() for p in m.parameters()])
    return rows, [p.detach().reshape(-1) for p in m.parameters()]


@pytest.mark.parametrize("case", ["linear", "tiny_add"])
def test_minibatch_moments_equal_direct_computation(case):
    if case == "linear":
        model, x, y, *_ = linear_problem(60)
        loss = half_sq
    else:
        model, (x, y), loss = tiny("tiny_add"), image_data(60), gv.cross_entropy_per_sample
    K, B, seed, lr = 6, 10, 3, 0.05
    mb = minibatch_gradient_stats(model, x, y, batches=K, batch_size=B, seed=seed, loss=loss)
    idx = minibatch_indices(x.shape[0], K, B, seed)
    assert np.array_equal(mb.indices, idx.numpy())
    rows, weights = direct_batch_grads(model, x, y, idx, loss)
    res = gradient_variance(model, x, y, GradVarParams(batches=K, batch_size=B, lr=lr, per_sample=False,
                                                       signal=False, dtype="float64"), seed=seed, loss=loss)
    for j, name in enumerate(mb.names):
        g = torch.stack([r[j] for r in rows])                                  # (K, numel)
        G = g.mean(0)
        tc = float(((g - G) ** 2).sum() / (K - 1))
        rms = float((g ** 2).sum(1).mean().sqrt())
        assert close(mb.grad_norm[j], G.norm()), name
        assert close(mb.trace_cov[j], tc), name
        assert close(mb.batch_grad_rms[j], rms), name
        assert close(res.snr[j], float(G.norm()) ** 2 / tc), name
        assert close(res.noise_scale[j], B * tc / float(G.norm()) ** 2), name
        # relative update size by hand: lr * rms_k |g_k| / |w|
        assert close(res.rel_update[j], lr * rms / float(weights[j].norm())), name
    agg = res.aggregates()
    g_all = torch.stack([torch.cat(r) for r in rows])
    G_all = g_all.mean(0)
    tc_all = float(((g_all - G_all) ** 2).sum() / (K - 1))
    assert close(agg["trace_cov"], tc_all) and close(agg["grad_norm"], G_all.norm())
    assert close(agg["noise_scale"], B * tc_all / float(G_all.norm()) ** 2)


def test_minibatch_covariance_is_unbiased_for_the_per_sample_covariance():
    """Disjoint batches of B out of N: E[tr(Sigma_B) estimate] = tr(S) / B exactly (S: per-sample
    covariance of the N samples, divisor N-1). Mean over R seeds within 5 standard errors."""
    model, x, y, *_ = linear_problem(120, d=3)
    K, B, R = 4, 10, 300
    ps = per_sample_variance(model, x, y, loss=half_sq, chunk=64)
    est = np.array([minibatch_gradient_stats(model, x, y, batches=K, batch_size=B, seed=s, loss=half_sq).trace_cov
                    for s in range(R)]) * B                                     # (R, L)
    mean, se = est.mean(0), est.std(0, ddof=1) / math.sqrt(R)
    assert np.all(np.abs(mean - ps.variance) < 5 * se), (mean, ps.variance, se)
    # and it is not trivially satisfied: the divisor K instead of K-1 is far off
    assert np.all(np.abs(mean * (K - 1) / K - ps.variance) > 1.5 * se)


# ------------------------------------------------------------------------------------------------
# 2. per-sample gradients
# ------------------------------------------------------------------------------------------------

def test_per_sample_covariance_trace_matches_least_squares_closed_form():
    """l = (w.x + b - y)^2 / 2, x ~ N(0, I_d), y = w*.x + sigma eps; with delta = w - w*, r = delta.x + b
    - sigma eps: g_w = r x, g_b = r, so tr Cov(g_w) = (d+1)|delta|^2 + d (b^2 + sigma^2) (Gaussian fourth
    moments E[x_i x_j |x|^2] = (d+2) delta_ij) and Var(g_b) = |delta|^2 + sigma^2. Estimated on N = 20000
    samples; tolerance 5 standard errors of the sample variance (from the same samples)."""
    n, d = 20000, 5
    model, x, y, w_star, sigma = linear_problem(n, d=d)
    ps = per_sample_variance(model, x, y, loss=half_sq, chunk=4096, dtype=torch.float64)
    assert ps.names == ("weight", "bias") and ps.samples_used == n and ps.nonfinite_samples == 0
    w, b = model.weight.detach().reshape(-1), float(model.bias.detach())
    delta2 = float(((w - w_star) ** 2).sum())
    closed = np.array([(d + 1) * delta2 + d * (b ** 2 + sigma ** 2), delta2 + sigma ** 2])
    r = x @ w + b - y                                                           # (n,) residuals
    g = {"weight": r[:, None] * x, "bias": r[:, None]}                           # explicit per-sample gradients
    for j, name in enumerate(ps.names):
        dev = ((g[name] - g[name].mean(0)) ** 2).sum(1)                          # (n,) |g_i - gbar|^2
        sample_var, se = float(dev.sum() / (n - 1)), float(dev.std() / math.sqrt(n))
        assert close(ps.variance[j], sample_var), name                           # the same sum, to rounding
        assert abs(ps.variance[j] - closed[j]) < 5 * se, (name, ps.variance[j], closed[j], se)
        assert se < 0.05 * closed[j]                                             # the tolerance is meaningful


def loop_per_sample(model, x, y, loss):
    m = copy.deepcopy(model).eval()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    out = {n: [] for n in names}
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(loss(m(x[i:i + 1]), y[i:i + 1]).sum(), [dict(m.named_parameters())[n] for n in names])
        for n, gi in zip(names, gs):
            out[n].append(gi)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("method", ["vmap", "auto"])
@pytest.mark.parametrize("name", ["tiny_add", "tiny_mul", "tiny_wrn", "tiny_triplet"])
def test_per_sample_gradients_equal_autograd_loop(name, method):
    """vmap(grad) and the closed form of probe.autodiff (auto) against a per-sample loop."""
    model, (x, y) = tiny(name), image_data(11)
    ref = loop_per_sample(model, x, y, gv.cross_entropy_per_sample)
    got = per_sample_gradients(model, x, y, chunk=4, method=method)              # uneven chunks 4 + 4 + 3
    assert list(got) == list(ref)
    for n in ref:
        assert close(got[n], ref[n]), n
    # streamed moments equal those of the materialised gradients, for any chunk size
    for chunk in (3, 64):
        ps = per_sample_variance(model, x, y, chunk=chunk, method=method)
        for j, n in enumerate(ps.names):
            g = ref[n].reshape(x.shape[0], -1)
            assert close(ps.variance[j], ((g - g.mean(0)) ** 2).sum() / (x.shape[0] - 1)), (n, chunk)
            assert close(ps.mean_grad_norm[j], g.mean(0).norm()), (n, chunk)
            assert close(ps.mean_sq_norm[j], (g ** 2).sum(1).mean(), rtol=1e-9), (n, chunk)
    if method == "vmap":
        assert ps.closed_form == ()
    else:
        structured = [n for n, _ in model.named_parameters()
                      if n.rsplit(".", 1)[0] in {k for k, m in model.named_modules()
                                                 if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}]
        assert set(ps.closed_form) == set(structured) and ps.failed_check == ()


def test_closed_form_mixed_with_vmap_for_other_parameters():
    """A model with a parameter outside the structured layers: closed form for the rest, vmap for it."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.alpha = nn.Parameter(torch.tensor([0.7, 1.3, -0.4]))            # used outside any layer
            self.fc = nn.Linear(3 * 64, 10)

        def forward(self, x):
            h = torch.tanh(self.bn(self.conv(x))) * self.alpha.view(1, 3, 1, 1)
            return self.fc(h.flatten(1))

    torch.manual_seed(0)
    model = Scaled().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    x, y = image_data(9)
    ref = loop_per_sample(model, x, y, gv.cross_entropy_per_sample)
    got = per_sample_gradients(model, x, y, chunk=4)
    for n in ref:
        assert close(got[n], ref[n]), n
    ps = per_sample_variance(model, x, y, chunk=4)
    assert "alpha" not in ps.closed_form and set(ps.closed_form) == set(ref) - {"alpha"}
    vm = per_sample_variance(model, x, y, chunk=4, method="vmap")
    assert close(ps.variance, vm.variance)


def test_train_mode_per_sample_gradients_are_loss_terms_through_group_statistics():
    model, (x, y) = tiny("tiny_add"), image_data(13)
    B, seed = 4, 2
    got = per_sample_gradients(model, x, y, bn="train", batch_size=B, seed=seed, chunk=3)
    groups = gv._groups(x.shape[0], B, seed)
    m = copy.deepcopy(model).train()                                             # batch statistics
    params = [p for p in m.parameters()]
    covered = set()
    for gidx in groups:
        losses = gv.cross_entropy_per_sample(m(x[gidx]), y[gidx])
        for r, i in enumerate(gidx.tolist()):
            ref = torch.autograd.grad(losses[r], params, retain_graph=True)
            for (n, _), gi in zip(model.named_parameters(), ref):
                assert close(got[n][i], gi), (n, i)
            covered.add(i)
    left_out = sorted(set(range(x.shape[0])) - covered)
    assert len(left_out) == 1 and torch.isnan(got["fc.weight"][left_out[0]]).all()


# ------------------------------------------------------------------------------------------------
# purity, non-finite values
# ------------------------------------------------------------------------------------------------

def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            [(n, getattr(m, "track_running_stats", None)) for n, m in model.named_modules()])


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_model_with_batchnorm_is_unchanged(bn):
    torch.manual_seed(0)
    model = create_model("tiny_wrn", dropout=0.3)                                # BatchNorm and dropout
    model.train()
    model.layer2[0].bn1.eval()                                                   # a mixed configuration
    model.conv1.bias.requires_grad_(False)                                       # a frozen parameter
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))                                          # non-trivial running stats
    before = snapshot(model)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    res = gradient_variance(model, x, y, GradVarParams(batches=4, batch_size=8, bn=bn, chunk=8))
    after = snapshot(model)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert "conv1.bias" not in res.names and len(res.names) == sum(p.requires_grad for p in model.parameters())
    assert np.isfinite(res.per_sample_var).all() and np.isfinite(res.trace_cov).all()


def test_nonfinite_gradients_counted_never_averaged():
    model, x, y, *_ = linear_problem(40, d=3)
    x = x.clone()
    x[7, 1] = float("nan")
    res = gradient_variance(model, x, y, GradVarParams(batches=4, batch_size=10, signal=False, dtype="float64"),
                            loss=half_sq)
    assert res.nonfinite_batches == 1 and res.batches_used == 3
    assert res.nonfinite_samples == 1 and res.samples_used == 39
    assert list(res.nonfinite) == [1, 1]
    for k in ("grad_norm", "trace_cov", "snr", "noise_scale", "per_sample_var", "rel_update"):
        assert np.isfinite(getattr(res, k)).all(), k
    assert any("non-finite" in n for n in res.notes) and "1 of 4 batches" in res.text()
    clean = np.delete(np.arange(40), 7)
    ref = per_sample_variance(model, x[clean], y[clean], loss=half_sq)
    assert close(res.per_sample_var, ref.variance)
    json.dumps(res.summary(), allow_nan=False)


# ------------------------------------------------------------------------------------------------
# 3. signal propagation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_add", "tiny_mul", "tiny_wrn"])
def test_depth_curves_one_point_per_block_averaged_over_different_inits(name):
    torch.manual_seed(0)
    model = create_model(name)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    seen = []
    base = rebuilder(name)

    def rebuild(s):
        seen.append(s)
        return base(s)

    state = torch.random.get_rng_state()
    res = gradient_variance(model, x, y, GradVarParams(batches=2, batch_size=8, per_sample=False, seeds=3),
                            seed=5, rebuild=rebuild)
    assert torch.equal(state, torch.random.get_rng_state())                     # global RNG untouched
    assert seen == [5, 6, 7] and res.signal_seeds == (5, 6, 7) and res.signal_source == "rebuild"
    assert res.block_names == ("layer1.0", "layer2.0", "layer3.0")
    assert list(res.block_depth) == [1, 2, 3]
    assert res.act_var_seeds.shape == (3, 3) and res.block_grad_seeds.shape == (3, 3)
    assert np.all(res.act_var_seeds > 0) and np.all(res.block_grad_seeds > 0)
    assert not np.allclose(res.act_var_seeds[0], res.act_var_seeds[1])          # different inits
    assert np.all(res.act_var_std > 0)
    assert close(res.act_var_mean, res.act_var_seeds.mean(0))


def test_signal_on_given_model_matches_hooks_reference():
    model, (x, y) = tiny("tiny_mul"), image_data(20)
    sig = signal_propagation(model, x, y, chunk=7)
    assert sig.seeds == () and sig.act_var.shape == (1, 3)
    m = copy.deepcopy(model).eval()
    outs = {}
    hooks = [blk.register_forward_hook(lambda _m, _i, o, k=k: outs.__setitem__(k, o))
             for k, (_, blk) in enumerate(find_blocks(m))]
    xr = x.clone().requires_grad_(True)
    total = gv.cross_entropy_per_sample(m(xr), y).sum()
    grads = torch.autograd.grad(total, [outs[k] for k in range(3)])
    for h in hooks:
        h.remove()
    for k in range(3):
        assert close(sig.act_var[0, k], outs[k].detach().var(unbiased=False))
        assert close(sig.grad_norm[0, k], (grads[k] ** 2).sum().div(x.shape[0]).sqrt())
    res = gradient_variance(model, x, y, GradVarParams(batches=2, batch_size=8, per_sample=False),
                            at_init=True)
    assert res.signal_source == "model" and res.act_var_seeds.shape == (1, 3)
    assert np.all(res.act_var_std == 0) and any("given model only" in n for n in res.notes)


def test_find_blocks_fallback_for_other_models():
    names = [n for n, _ in find_blocks(create_model("tiny_bottleneck"))]
    assert len(names) == 16 and names[0] == "layer1.0"
    mlp = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    assert [n for n, _ in find_blocks(mlp)] == ["0.0", "0.1", "0.2", "0.3"]


# ------------------------------------------------------------------------------------------------
# the result, the adapter, figures
# ------------------------------------------------------------------------------------------------

def _result(name="tiny_add", seeds=2, **kw):
    torch.manual_seed(0)
    model = create_model(name)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    params = GradVarParams(batches=3, batch_size=8, seeds=seeds, chunk=16, **kw)
    return gradient_variance(model, x, y, params, rebuild=rebuilder(name))


@pytest.mark.parametrize("kw", [{}, {"per_sample": False, "signal": False}, {"dtype": "float64", "bn": "train"}])
def test_result_round_trips_through_summary_and_arrays(kw):
    res = _result(**kw)
    summary = json.loads(json.dumps(res.summary(), allow_nan=False))
    buf = io.BytesIO()
    arrays = res.arrays()
    assert all(a.dtype != object for a in arrays.values())
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        loaded = {k: npz[k] for k in npz.files}
    back = GradVarResult.from_store(summary, loaded)
    assert back == res and back.text() == res.text()
    assert len(summary["layers"]) == len(res.names) and summary["layers"][0]["name"] == res.names[0]
    assert len(summary["depth"]) == len(res.block_names)
    assert summary["aggregates"]["numel"] == int(res.numel.sum())
    assert res != dataclass_replace(res, lr=res.lr * 2)


def dataclass_replace(r, **kw):
    import dataclasses
    return dataclasses.replace(r, **kw)


def test_compute_uses_ctx_lr_rebuild_and_progress(capsys):
    torch.manual_seed(0)
    model = create_model("tiny_add")
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    calls = []
    ctx = ProbeContext(model=model, x=x, y=y, num_classes=10, device=torch.device("cpu"), seed=1,
                       model_name="tiny_add", epoch=3, lr=0.3, progress=lambda *a: calls.append(a),
                       rebuild=rebuilder("tiny_add"))
    params = GradVarParams(batches=2, batch_size=8, seeds=2)
    res = get_probe("gradvar").compute(ctx, params)
    assert res.lr == 0.3 and res.lr_source == "run" and res.signal_seeds == (1, 2)
    assert any("not at this checkpoint" in n for n in res.notes)
    assert {c[0] for c in calls} == {"gradvar: mini-batch gradients", "gradvar: per-sample gradients",
                                     "gradvar: signal propagation"}
    assert all(c[1] <= c[2] for c in calls) and calls[-1][1] == calls[-1][2]
    res2 = gv.compute(dataclass_replace(ctx, lr=None, rebuild=None, progress=None), params)
    assert res2.lr == 0.1 and res2.lr_source == "params" and res2.signal_source == "model"
    assert close(res2.rel_update * 3, res.rel_update)
    assert capsys.readouterr() == ("", "")


def test_figure_builders_return_expected_traces():
    from probe.figures.gradvar import depth_curves, gradvar_figure

    add, mul = _result("tiny_add"), _result("tiny_mul")
    entries = [({"model": "tiny_add", "run_id": None, "epoch": None}, add),
               ({"model": "tiny_mul", "run_id": "r1", "epoch": 4}, mul)]
    fig = gradvar_figure(entries)
    assert len(fig.data) == 4 * 2 + 2 * 2
    assert [t.name for t in fig.data[:4]] == ["tiny_add (init)"] * 4
    assert fig.data[4].name == "tiny_mul run r1 @ epoch 4"
    ys = [add.per_sample_var, add.snr, add.noise_scale, add.rel_update]
    for t, v in zip(fig.data[:4], ys):
        expect = [float(a) if np.isfinite(a) and a > 0 else None for a in v]
        assert list(t.y) == expect and list(t.x) == list(add.names)    # layers named on the x axis
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis4.type == "log"
    assert len(gradvar_figure(entries, depth=False).data) == 8
    dc = depth_curves(entries)
    assert len(dc.data) == 4
    assert list(dc.data[0].x) == [1, 2, 3] and np.allclose(dc.data[0].y, add.act_var_mean)
    assert np.allclose(dc.data[1].y, add.block_grad_mean) and np.allclose(dc.data[2].y, mul.act_var_mean)
    assert np.allclose(dc.data[0].error_y.array, add.act_var_std)
    no_signal = _result(signal=False)
    assert len(depth_curves([({"model": "m"}, no_signal)]).data) == 0
    assert len(gradvar_figure([({"model": "m"}, no_signal)]).data) == 4


def test_signal_with_rebuild_calibrates_bn_on_float64_inputs():
    x, y = image_data(16)                                                        # float64 inputs
    sig = signal_propagation(create_model("tiny_add"), x, y, rebuild=rebuilder("tiny_add"), seeds=(0, 1),
                             dtype=torch.float64)
    assert sig.seeds == (0, 1) and sig.act_var.shape == (2, 3) and np.isfinite(sig.act_var).all()
    # calibrated on x: the first block sees normalised inputs, not the (0, 1) init statistics
    m = rebuilder("tiny_add")(0).double()
    m = calibrate_batchnorm(m, x)  # what the probe does for each rebuilt model
    assert close(signal_propagation(m, x, y, dtype=torch.float64).act_var[0], sig.act_var[0], rtol=1e-5)
