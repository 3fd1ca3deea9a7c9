"""The input-space interpolation probe (``probe interp``): exact answers on models whose paths are
known in closed form (affine: degree 1, deviation 0; a quadratic: degree 2 and its deviation
formula), the pair and triple sampling, the planes, bad input, and the runner / CLI path."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from probe.errors import UserError
from probe.probes.interp import InterpResult, interpolation_paths
from probe.probes.interp.api import _fit_errors, _select_pairs


class Quadratic(nn.Module):
    """f_k(x) = (w_k . x)^2, k = 1..C."""

    def __init__(self, d: int, c: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(c, d, generator=g, dtype=torch.float64))

    def forward(self, x):
        return (x.reshape(x.shape[0], -1) @ self.w.T) ** 2


def _data(n=40, d=6, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.arange(n) % c
    return x, y


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_affine_model_paths_are_exactly_linear():
    """An affine map sends straight input paths to straight output paths: degree 1 on every path,
    deviation from the chord 0 (float64: within 1e-12), and the model is unchanged."""
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    before = _state(model)
    x, y = _data()
    r = interpolation_paths(model, x, y, pairs=20, steps=17, max_degree=6, triples=2, plane_resolution=7)
    assert r.n_pairs == 20 and r.logits.shape == (20, 17, 4)
    np.testing.assert_array_equal(r.degree, np.ones(20, dtype=np.int64))
    assert np.nanmax(r.deviation) < 1e-12
    assert np.nanmax(r.deviation_max) < 1e-12 and np.nanmax(r.deviation_mean) < 1e-12
    # err_1 = 0 (up to rounding) for an affine path; err_0 = 1 by definition
    np.testing.assert_allclose(r.fit_error[:, 0], 1.0, rtol=1e-12)
    assert r.fit_error[:, 1].max() < 1e-12
    # the path ends are the model's outputs on the samples
    with torch.no_grad():
        ends = model(x[torch.as_tensor(r.pair_index[:, 0])]).numpy()
    np.testing.assert_allclose(r.logits[:, 0, :], ends, rtol=0, atol=1e-13)
    s = r.summary()
    assert s["all"]["degree_mean"] == 1.0 and s["all"]["deviation_max_mean"] < 1e-12
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)


def test_quadratic_paths_have_degree_two_and_the_closed_form_deviation():
    """For f_k(x) = (w_k . x)^2 the logits along a path are quadratic in t: degree 2 (err_1 > tol,
    err_2 ~ 0), and dev(t) = t (1 - t) ||beta^2|| / ||2 alpha beta + beta^2||, alpha_k = w_k . x_a,
    beta_k = w_k . (x_b - x_a) (within 1e-10)."""
    model = Quadratic(6, 4)
    x, y = _data()
    r = interpolation_paths(model, x, y, pairs=16, steps=21, max_degree=8, triples=0)
    np.testing.assert_array_equal(r.degree, np.full(16, 2, dtype=np.int64))
    assert r.fit_error[:, 2].max() < 1e-12 and r.fit_error[:, 1].min() > 0.01
    w = model.w.detach().numpy()
    xa, xb = x.numpy()[r.pair_index[:, 0]], x.numpy()[r.pair_index[:, 1]]
    alpha, beta = xa @ w.T, (xb - xa) @ w.T                       # (P, C)
    t = r.t[None, :]
    want = t * (1 - t) * np.linalg.norm(beta ** 2, axis=1, keepdims=True) / \
        np.linalg.norm(2 * alpha * beta + beta ** 2, axis=1, keepdims=True)
    np.testing.assert_allclose(r.deviation, want, rtol=1e-10, atol=1e-14)
    # the trapezoidal mean of t (1 - t) on 21 points is 1/6 - 1/(6 * 20^2); the max is at t = 1/2
    scale = want.max(axis=1) * 4
    np.testing.assert_allclose(r.deviation_mean, scale * (1 / 6 - 1 / (6 * 20 ** 2)), rtol=1e-10)
    np.testing.assert_allclose(r.deviation_max, scale / 4, rtol=1e-10)


def test_fit_errors_find_the_degree_of_known_polynomials():
    """Chebyshev least squares: a path that is a degree-d polynomial in t is fitted exactly at
    degree d and not before."""
    t = np.linspace(0, 1, 25)
    paths = np.stack([np.stack([t ** d, 2 - t ** d], 1) for d in range(6)])   # (6, T, 2)
    err = _fit_errors(paths, 10, np.finfo(np.float64).eps)
    for d in range(1, 6):
        assert err[d, d] < 1e-10 and err[d, d - 1] > 1e-4
    assert np.all(err[0] == 0.0)                                 # constant path: no variation


def test_pairs_are_distinct_seeded_and_split_by_class():
    y = np.repeat(np.arange(5), 8)
    idx, same = _select_pairs(y, 30, 0.4, seed=3)
    assert idx.shape == (30, 2) and same.sum() == 12
    assert np.all(idx[:, 0] < idx[:, 1])
    assert len({tuple(p) for p in idx.tolist()}) == 30
    assert np.all((y[idx[:, 0]] == y[idx[:, 1]]) == same)
    again, _ = _select_pairs(y, 30, 0.4, seed=3)
    np.testing.assert_array_equal(idx, again)
    other, _ = _select_pairs(y, 30, 0.4, seed=4)
    assert not np.array_equal(idx, other)
    # asking for every pair there is works (enumeration branch)
    small = np.array([0, 0, 1, 1])
    idx, same = _select_pairs(small, 6, 2 / 6, seed=0)
    assert sorted(map(tuple, idx.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_planes_hold_the_three_samples_at_their_corners():
    """The plane grid x_a + u (x_b - x_a) + v (x_c - x_a): with margin 0.5 and 5 points per axis
    u, v run over -0.5, 0, 0.5, 1, 1.5, so grid (v=0, u=0) is x_a, (0, 1) x_b and (1, 0) x_c; the
    predicted class there is the model's prediction on the sample."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x, y = _data()
    r = interpolation_paths(model, x, y, pairs=4, steps=5, max_degree=2, triples=3, plane_resolution=5,
                            plane_margin=0.5)
    assert r.plane_pred.shape == (3, 5, 5)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    for k, (a, b, c) in enumerate(r.plane_index):
        assert len({int(y[a]), int(y[b]), int(y[c])}) == 3            # three different labels
        assert r.plane_pred[k, 1, 1] == pred[a]
        assert r.plane_pred[k, 1, 3] == pred[b]
        assert r.plane_pred[k, 3, 1] == pred[c]
    assert np.all((r.plane_maxprob > 0.25 - 1e-12) & (r.plane_maxprob <= 1.0 + 1e-12))


def test_batch_size_does_not_change_the_result_and_the_result_round_trips():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    x, y = _data()
    a = interpolation_paths(model, x, y, pairs=10, steps=9, max_degree=4, triples=1, plane_resolution=5,
                            batch_size=7)
    b = interpolation_paths(model, x, y, pairs=10, steps=9, max_degree=4, triples=1, plane_resolution=5,
                            batch_size=1000)
    np.testing.assert_allclose(a.logits, b.logits, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(a.degree, b.degree)
    back = InterpResult.from_store(a.summary(), a.arrays())
    assert back == a and not back.differences(a)


def test_batchnorm_model_in_train_mode_is_probed_in_eval_mode_and_left_as_it_was():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    x, y = _data()
    model.train()
    with torch.no_grad():
        model(x)                                            # some running statistics
    before = _state(model)
    r = interpolation_paths(model, x, y, pairs=6, steps=9, max_degree=4, triples=0)
    assert model.training
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        ends = ref(x[torch.as_tensor(r.pair_index[:, 1])]).numpy()
    np.testing.assert_allclose(r.logits[:, -1, :], ends, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"pairs": 0}, "pairs"),
    ({"steps": 1}, "steps"),
    ({"max_degree": 9, "steps": 10}, "max_degree"),
    ({"same_class_fraction": 1.5}, "same_class_fraction"),
    ({"pairs": 10_000}, "hold only"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    x, y = _data(n=12)
    with pytest.raises(UserError, match=match):
        interpolation_paths(nn.Linear(6, 4).double(), x, y, **kwargs)


def test_bad_data_and_outputs_are_clear_errors():
    x, y = _data(n=12)
    model = nn.Linear(6, 4).double()
    with pytest.raises(UserError, match="labels must be class indices"):
        interpolation_paths(model, x, y + 10, pairs=4, triples=0)
    with pytest.raises(UserError, match="integer labels"):
        interpolation_paths(model, x, y.double(), pairs=4, triples=0)

    class Bad(nn.Module):
        def forward(self, x):
            return x.sum() * torch.ones(1, dtype=x.dtype)

    with pytest.raises(UserError, match="class logits"):
        interpolation_paths(Bad(), x, y, pairs=4, triples=0)

    class Inf(nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("inf")

    with pytest.raises(UserError, match="not finite"):
        interpolation_paths(Inf(6, 4).double(), x, y, pairs=4, triples=0)


def test_probe_interp_through_the_cli_and_the_store(tmp_path, capsys):
    from probe.store import RunStore
    from tests.probes.test_registry import cli

    code, out, err = cli(capsys, "interp", "--model", "tiny_add", "--n", "24", "--pairs", "8", "--steps", "9",
                         "--max-degree", "4", "--triples", "1", "--plane-resolution", "5", "--runs", tmp_path,
                         "--json", "--quiet")
    assert code == 0, err
    import json

    doc = json.loads(out)
    store = RunStore(tmp_path)
    rows = store.list_probes(kind="interp")
    assert len(rows) == 1 and rows[0]["status"] == "finished"
    from probe.jobs import load_result

    _, res = load_result(store, rows[0]["probe_id"])
    assert isinstance(res, InterpResult) and res.n_pairs == 8 and res.logits.shape[:2] == (8, 9)
    assert res.summary()["all"]["n"] == 8
    assert json.dumps(doc)                                       # strict JSON on stdout


def test_figures_draw_the_stored_numbers():
    """Every figure builds from the stored form; the paths figure's mean deviation curve is the
    mean over the group's paths; across training has one point per checkpoint."""
    from probe.figures.interp import (interp_across_training, interp_degree_figure, interp_paths_figure,
                                      interp_planes_figure)

    model = Quadratic(6, 4)
    x, y = _data()
    r = interpolation_paths(model, x, y, pairs=8, steps=9, max_degree=4, triples=2, plane_resolution=5)
    stored = InterpResult.from_store(r.summary(), r.arrays())
    entries = [({"model": "quad", "run_id": "R", "epoch": e}, stored) for e in (1, 2)]
    fig = interp_paths_figure(entries[:1])
    mean_same = r.deviation[r.pair_same].mean(axis=0)
    assert any(np.allclose(np.asarray(tr.y, dtype=float), mean_same, rtol=1e-12)
               for tr in fig.data if tr.y is not None and len(tr.y) == r.steps)
    assert len(interp_planes_figure(entries[:1]).data) >= 2
    assert len(interp_degree_figure(entries).data) >= 1
    across = interp_across_training(entries)
    xs = [list(tr.x) for tr in across.data if tr.x is not None and len(tr.x)]
    assert xs and all(v == [1, 2] for v in xs)
