"""The loss-surface probe: centre loss, filter normalisation, vmapped chunks against a point-by-point
float64 reference, resuming an interrupted grid (an exception, and a real SIGKILL), the model left
unchanged, non-finite points as NaN, and the direction sources (hessian, pca, towards) with their
errors."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from probe.errors import UserError
from probe.functional import calibrate_batchnorm
from probe.jobs import load_result, run_probe
from probe.jobs.targets import probe_inputs
from probe.probes.surface import (SurfaceParams, excluded_names, loss_surface, parse_grid, pca_directions,
                                  random_directions)
from probe.store import RunStore, to_jsonable
from probe.training import TrainConfig, load_run_model, train

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
GRID = "-1:1:5"
_TIMING = ("wall_time_s", "resumed_chunks", "notes")      # bookkeeping that differs between attempts


@pytest.fixture(scope="module")
def data():
    x, y, _ = probe_inputs("digits", 24)
    return x, y


def _model(name: str, x, dtype=torch.float32):
    torch.manual_seed(0)
    m = models.create_model(name, num_classes=10, in_chans=1).to(dtype).eval()
    return calibrate_batchnorm(m, x.to(dtype))       # running statistics that describe the data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One store with a 3-epoch tiny_add run, a 2-epoch tiny_add run and a 1-epoch tiny_mul run."""
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    ids = {}
    for key, model, epochs in (("add3", "tiny_add", 3), ("add2", "tiny_add", 2), ("mul", "tiny_mul", 1)):
        ids[key] = train(TrainConfig(model=model, epochs=epochs, limit_train=64, limit_test=32, lr=0.05), store).run_id
    return root, ids


def _reference(model, theta: torch.Tensor, x, y) -> tuple[float, float]:
    """The slow obvious loss at theta: a float64 copy of the model with theta loaded, eval mode."""
    m = copy.deepcopy(model).double().eval()
    torch.nn.utils.vector_to_parameters(theta, [p for p in m.parameters() if p.requires_grad])
    with torch.no_grad():
        out = m(x.double())
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def _strip(summary: dict) -> dict:
    return {k: v for k, v in to_jsonable(summary).items() if k not in _TIMING}


# --- the centre, the directions -----------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_centre_is_the_models_own_loss(data, dtype, tol):
    """float64: the same sum in another order (1e-12); float32: torch's mean of float32 CE terms vs
    our float64 sum of the float32 logits' CE (1e-6 relative)."""
    x, y = data
    model = _model("tiny_add", x, dtype)
    res = loss_surface(model, x, y, random_directions(model, 2), GRID, dtype=dtype)
    with torch.no_grad():
        out = model(x.to(dtype))
    want = float(F.cross_entropy(out, y))
    assert res.centre_loss == pytest.approx(want, rel=tol)
    assert res.centre_accuracy == float((out.argmax(1) == y).double().mean())
    assert res.grid_centre_loss == pytest.approx(res.centre_loss, rel=tol)       # the point (0, 0) of the grid
    assert res.loss.shape == (5, 5) and res.summary()["centre_loss"] == res.centre_loss


def test_filter_normalisation_holds_per_filter(data):
    """Every filter (dim-0 slice) of a direction has the norm of the same filter of the weights
    (float64: 1e-9 relative, one division and a norm in another order); biases and BN parameters
    are zero unless included, then per element |d| = |w|; layer norm per tensor."""
    x, _ = data
    model = _model("tiny_add", x)
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    skip = excluded_names(model)
    assert any("bn" in n or "norm" in n for n in skip) and all(params[n].dim() <= 1 for n in skip)

    def split(v):
        out, i = {}, 0
        for n, p in params.items():
            out[n] = v[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        return out

    d = random_directions(model, 2)
    for vec in d.vectors:
        parts = split(vec)
        for n, w in params.items():
            if n in skip:
                assert float(parts[n].abs().max()) == 0.0, n
            else:
                dn = parts[n].reshape(w.shape[0], -1).norm(dim=1)
                wn = w.reshape(w.shape[0], -1).norm(dim=1)
                torch.testing.assert_close(dn, wn, rtol=1e-9, atol=1e-12)
    assert not torch.equal(d.vectors[0], d.vectors[1])
    torch.testing.assert_close(random_directions(model, 2).vectors[0], d.vectors[0], rtol=0, atol=0)  # seeded
    inc = split(random_directions(model, 1, include_bn=True).vectors[0])
    for n in skip:
        torch.testing.assert_close(inc[n].abs(), params[n].abs(), rtol=1e-9, atol=1e-12)
    lay = split(random_directions(model, 1, norm="layer").vectors[0])
    for n, w in params.items():
        if n not in skip:
            assert float(lay[n].norm()) == pytest.approx(float(w.norm()), rel=1e-9)


@pytest.mark.parametrize("name", ["tiny_add", "tiny_mlp"])
def test_vmap_and_loop_equal_a_point_by_point_float64_reference(data, name):
    """Every grid point of both evaluators (chunks of 7 points: rows split unevenly; odd rows
    included) equals loading theta0 + a d1 + b d2 into a float64 copy: 1e-10 (float64, the same
    arithmetic in another order)."""
    x, y = data
    model = _model(name, x, torch.float64)
    d = random_directions(model, 2)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = parse_grid("-1:1:5,-0.5:0.5:3")
    ref_loss, ref_acc = np.empty(g.shape), np.empty(g.shape)
    for i, a in enumerate(g.alpha):
        for j, b in enumerate(g.beta):
            ref_loss[i, j], ref_acc[i, j] = _reference(model, theta0 + a * d.vectors[0] + b * d.vectors[1], x, y)
    for mode in ("vmap", "loop"):
        res = loss_surface(model, x, y, d, g, vectorize=mode, chunk=7, dtype=torch.float64)
        assert res.summary()["vectorize"] == mode and res.n_chunks == 3
        np.testing.assert_allclose(res.loss, ref_loss, rtol=1e-10, atol=0)
        np.testing.assert_array_equal(res.accuracy, ref_acc)
    one = loss_surface(model, x, y, d.vectors[0], "-1:1:5", dtype=torch.float64, vectorize="vmap")   # 1D
    np.testing.assert_allclose(one.loss, ref_loss[:, 1], rtol=1e-10, atol=0)


def test_bn_recalibrate_reestimates_running_statistics(data):
    """At the centre, re-estimated statistics equal calibrate_batchnorm's (float64, 1e-10: the same
    averages, ours accumulated in float64)."""
    x, y = data
    model = _model("tiny_add", x, torch.float64)
    with torch.no_grad():
        skewed = copy.deepcopy(model)
        for m in skewed.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.mul_(3.0)                                   # statistics that are off
    res = loss_surface(skewed, x, y, random_directions(skewed, 1), "-1:1:3", bn="recalibrate", dtype=torch.float64)
    with torch.no_grad():
        want = float(F.cross_entropy(calibrate_batchnorm(skewed, x.double())(x.double()), y))
    assert res.loss[1] == pytest.approx(want, rel=1e-10)
    assert res.centre_loss != pytest.approx(want, rel=1e-3)            # the model's own loss differs
    assert res.summary()["vectorize"] == "loop"
    with pytest.raises(UserError, match="point by point"):
        loss_surface(skewed, x, y, random_directions(skewed, 1), "-1:1:3", bn="recalibrate", vectorize="vmap")


def test_the_model_is_never_left_changed(data):
    x, y = data
    model = _model("tiny_add", x)
    model.layer1.train()                                   # mixed flags, a frozen parameter
    model.fc.bias.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(n, m.training) for n, m in model.named_modules()]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    d = random_directions(model, 2)
    for kw in ({"vectorize": "vmap"}, {"vectorize": "loop"}, {"bn": "recalibrate"}):
        res = loss_surface(model, x, y, d, "-1:1:3", **kw)
        assert np.isfinite(res.loss).all()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert res.n_params == sum(p.numel() for p in model.parameters()) - model.fc.bias.numel()


def test_non_finite_points_are_stored_as_nan_and_drawn_as_gaps(tmp_path, data):
    """A huge step overflows the float32 forward pass: those points are NaN (loss and accuracy),
    in the store too, and gaps in the figures; the summary stays strict JSON."""
    from probe.figures.surface import surface_curves

    store = RunStore(tmp_path)
    out = run_probe(store, "surface", {"dims": 1, "grid": "-3e38:3e38:3"}, model="tiny_mlp", n=16)[0]
    assert out.error is None
    _, res = load_result(store, out.info["probe_id"])
    assert np.isnan(res.loss[[0, 2]]).all() and np.isfinite(res.loss[1]) and np.isnan(res.accuracy[[0, 2]]).all()
    s = res.summary()
    assert s["loss_scale"]["finite_fraction"] == pytest.approx(1 / 3) and s["loss_scale"]["min"] == res.loss[1]
    json.dumps(to_jsonable(s), allow_nan=False)
    assert any("not finite at 2 of 3" in n for n in s["notes"])
    fig = surface_curves([(out.info, res)])
    y = np.asarray(fig.data[0].y, dtype=float)
    assert np.isnan(y[[0, 2]]).all() and y[1] == res.loss[1]       # gaps, never zeros


def test_grid_spec_errors_quote_the_spec(capsys, tmp_path):
    from probe.cli import main

    for bad, why in (("1:-1:5", "smaller"), ("-1:1", "START:STOP:COUNT"), ("-1:1:1", "COUNT"),
                     ("a:b:3", "START:STOP:COUNT"), ("-1:1:3,0:1:3,0:1:3", "two axes"), ("inf:1:3", "START:STOP")):
        with pytest.raises(UserError) as e:
            SurfaceParams(grid=bad)
        assert repr(bad) in str(e.value) and why in str(e.value), (bad, str(e.value))
    with pytest.raises(UserError, match="1D"):
        parse_grid("-1:1:3,-1:1:3", dims=1)
    g = parse_grid("-1:1:51")
    assert g.shape == (51, 51) and g.alpha[25] == 0.0 and np.array_equal(g.alpha, g.beta)
    assert np.array_equal(g.coords(51, 53), [[g.alpha[1], g.beta[0]], [g.alpha[1], g.beta[1]]])   # rows not shifted
    try:
        code = main(["surface", "--model", "tiny_mlp", "--grid=2:1:3", "--runs", str(tmp_path)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "probe surface: error: grid '2:1:3': START must be smaller than STOP (got 2 and 1)"
    # a value that starts with '-' is taken for its option, with or without '='
    from probe.cli import join_negative_values

    assert join_negative_values(["surface", "--grid", "-1:1:3", "--n", "8"]) == ["surface", "--grid=-1:1:3", "--n", "8"]
    assert join_negative_values(["--grid", "-.5:1:3,-1:1:3"]) == ["--grid=-.5:1:3,-1:1:3"]
    assert join_negative_values(["--grid=-1:1:3", "--quiet"]) == ["--grid=-1:1:3", "--quiet"]
    code = main(["surface", "--model", "tiny_mlp", "--n", "8", "--grid", "-1:1:3", "--runs", str(tmp_path),
                 "--json", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["results"][0]["grid"]["alpha"] == [-1.0, 1.0, 3]


# --- resuming ------------------------------------------------------------------------------------


def test_interrupted_grid_resumes_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    import probe.probes.surface.api as api

    params = {"grid": "-1:1:7", "chunk": 5, "vectorize": "loop"}
    clean = run_probe(RunStore(tmp_path / "a"), "surface", params, model="tiny_add", n=16)[0].result
    store = RunStore(tmp_path / "b")
    real, calls = api.evaluate_points, []

    def dies_after_three(*a, **k):
        if len(calls) == 3:
            raise RuntimeError("killed")
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(api, "evaluate_points", dies_after_three)
    with pytest.raises(RuntimeError, match="killed"):
        run_probe(store, "surface", params, model="tiny_add", n=16)
    assert store.list_probes(kind="surface") == []
    assert len(list((tmp_path / "b" / "partial").glob("*/chunk-*.npz"))) == 3
    monkeypatch.setattr(api, "evaluate_points", real)
    resumed = run_probe(store, "surface", params, model="tiny_add", n=16)[0].result
    s = resumed.summary()
    assert s["resumed_chunks"] == 3 and s["n_chunks"] == 10
    assert resumed.arrays().keys() == clean.arrays().keys()
    assert all(np.array_equal(resumed.arrays()[k], clean.arrays()[k]) for k in clean.arrays())
    assert _strip(s) == _strip(clean.summary())
    assert not list((tmp_path / "b" / "partial").glob("*/chunk-*.npz"))          # cleared once stored


def _cli(root: Path) -> list[str]:
    return [sys.executable, "-m", "probe.cli", "surface", "--model", "tiny_add", "--n", "32", "--grid=-1:1:41",
            "--chunk", "8", "--vectorize", "loop", "--runs", str(root), "--json", "--quiet"]


@pytest.mark.slow
def test_a_grid_killed_by_sigkill_resumes_equal(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    clean = json.loads(subprocess.run(_cli(tmp_path / "a"), capture_output=True, text=True, env=env, check=True,
                                      cwd=REPO).stdout)["results"][0]
    root = tmp_path / "b"
    proc = subprocess.Popen(_cli(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while len(list(root.glob("partial/*/chunk-*.npz"))) < 20 and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the grid finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert RunStore(root).list_probes(kind="surface") == []
    again = json.loads(subprocess.run(_cli(root), capture_output=True, text=True, env=env, check=True,
                                      cwd=REPO).stdout)["results"][0]
    assert 20 <= again["resumed_chunks"] < again["n_chunks"]
    store_a, store_b = RunStore(tmp_path / "a"), RunStore(root)
    _, ra = load_result(store_a, clean["probe_id"])
    _, rb = load_result(store_b, again["probe_id"])
    assert all(np.array_equal(ra.arrays()[k], rb.arrays()[k]) for k in ra.arrays())
    assert _strip(ra.summary()) == _strip(rb.summary())


# --- direction sources ---------------------------------------------------------------------------


def test_pca_needs_three_checkpoints(runs):
    root, ids = runs
    with pytest.raises(UserError, match=f"run {ids['add2']} has 2"):
        run_probe(RunStore(root), "surface", {"directions": "pca", "grid": "-1:1:3"}, run=ids["add2"], n=16,
                  save=False)
    with pytest.raises(UserError, match="need a run's checkpoint trajectory"):
        run_probe(RunStore(root), "surface", {"directions": "pca", "grid": "-1:1:3"}, model="tiny_add", n=16,
                  save=False)


def test_pca_plane_holds_the_trajectory(runs):
    """Three checkpoints span exactly the pca plane: each masked difference to the final point is
    reconstructed from its stored coordinates (float64, 1e-9 relative); the final point (the
    target) sits at the origin."""
    root, ids = runs
    store = RunStore(root)
    out = run_probe(store, "surface", {"directions": "pca", "grid": "-1:1:3"}, run=ids["add3"], n=16)[0]
    assert out.error is None
    _, res = load_result(store, out.info["probe_id"])
    t = res.trajectory
    assert t.shape == (3, 2) and res.arrays()["trajectory_epochs"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(t[-1], 0.0, atol=1e-12)
    info = res.summary()["direction_info"]
    assert info["checkpoints"] == 3 and sum(info["explained_variance"]) == pytest.approx(1.0)
    model = load_run_model(store, ids["add3"])[0]
    thetas = [torch.cat([store.load_checkpoint(ids["add3"], e)["model"][n].reshape(-1).double()
                         for n, _ in model.named_parameters()]) for e in (1, 2, 3)]
    skip = excluded_names(model)
    mask = torch.cat([torch.full((p.numel(),), float(n not in skip), dtype=torch.float64)
                      for n, p in model.named_parameters()])
    d = pca_directions(thetas[-1], thetas, [1, 2, 3], mask=mask)
    np.testing.assert_allclose(d.trajectory, t, rtol=0, atol=0)
    D = torch.stack(d.vectors)
    torch.testing.assert_close(D @ D.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    for th, c in zip(thetas, t):
        diff = (th - thetas[-1]) * mask
        assert float((diff - torch.as_tensor(c) @ D).norm()) <= 1e-9 * max(float(diff.norm()), 1e-30)


def test_towards_another_checkpoint_and_a_different_architecture(runs):
    root, ids = runs
    store = RunStore(root)
    base = {"directions": "towards", "dims": 1, "grid": "0:1:3"}
    with pytest.raises(UserError, match="'tiny_mul' and this target a 'tiny_add'"):
        run_probe(store, "surface", {**base, "to_run": ids["mul"]}, run=ids["add3"], n=16, save=False)
    res = run_probe(store, "surface", {**base, "to": "init"}, run=ids["add3"], n=16, save=False)[0].result
    s = res.summary()
    model = load_run_model(store, ids["add3"])[0]
    init = load_run_model(store, ids["add3"], "init")[0]
    dist = float(torch.cat([(p1.detach().double() - p0.detach().double()).reshape(-1)
                            for p0, p1 in zip(model.parameters(), init.parameters())]).norm())
    assert s["direction_norms"][0] == pytest.approx(dist, rel=1e-12)         # float64 differences, one norm
    assert s["direction_info"]["to"] == f"run {ids['add3']} at init"
    other = run_probe(store, "surface", {**base, "to_run": ids["add2"]}, run=ids["add3"], n=16, save=False)[0]
    assert other.error is None and other.result.summary()["direction_info"]["to"] == f"run {ids['add2']} at epoch 2"
    with pytest.raises(UserError, match="use dims 1"):
        SurfaceParams(directions="towards", to="init")
    with pytest.raises(UserError, match="towards directions"):
        SurfaceParams(to="init")


def test_hessian_directions_use_a_stored_row_else_compute_them(tmp_path):
    store = RunStore(tmp_path)
    p = {"directions": "hessian", "grid": "-1:1:3"}
    first = run_probe(store, "surface", p, model="tiny_mlp", n=16)[0].result.summary()
    assert first["direction_info"]["source"] == "computed" and any("computed here" in n for n in first["notes"])
    h = run_probe(store, "hessian", {"k": 2, "trace": "none", "density": False}, model="tiny_mlp", n=16)[0]
    again = run_probe(store, "surface", p, model="tiny_mlp", n=16)[0].result.summary()
    assert again["direction_info"] == {"source": "stored", "probe_id": h.info["probe_id"],
                                       "eigenvalues": h.result.summary()["top_eigenvalues"][:2]}
    assert again["direction_norms"] == pytest.approx([1.0, 1.0], abs=1e-5) and abs(again["cosine"]) < 1e-5
    other_seed = run_probe(store, "surface", p, model="tiny_mlp", n=16, seed=1)[0].result.summary()
    assert other_seed["direction_info"]["source"] == "computed"            # another init: not that row


def test_figures_carry_the_diagnostics(data):
    from probe.figures.surface import surface_3d, surface_figure, surface_trajectory
    from probe.probes.surface import SurfaceProbeResult

    x, y = data
    model = _model("tiny_mlp", x)
    res = loss_surface(model, x, y, random_directions(model, 2), GRID)
    r = SurfaceProbeResult(res.summary(), res.arrays())
    info = {"model": "tiny_mlp", "run_id": None, "epoch": None}
    fig = surface_figure([(info, r)])
    title = fig.layout.annotations[0].text
    assert f"centre loss {res.centre_loss:.4g}" in title and "|d1|" in title and "cos" in title
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), res.loss.T)
    assert len(surface_3d([(info, r), (info, r)]).data) == 2
    assert "no pca surface" in surface_trajectory([(info, r)]).layout.title.text


class _ItemNet(torch.nn.Module):
    """A forward that reads a Python number from a tensor: it cannot run under vmap."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        z = self.fc(x.flatten(1))
        return z * 2.0 if z.sum().item() > 1e30 else z


def test_a_model_that_vmap_cannot_run_falls_back_to_the_loop(data):
    x, y = data
    torch.manual_seed(0)
    model = _ItemNet()
    res = loss_surface(model, x, y, random_directions(model, 1), "-1:1:3", vectorize="auto")
    assert res.summary()["vectorize"] == "loop" and any("vmap failed" in n for n in res.notes)
    assert res.loss[1] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-6)
    with pytest.raises(UserError, match="cannot be evaluated under vmap"):
        loss_surface(model, x, y, random_directions(model, 1), "-1:1:3", vectorize="vmap")
