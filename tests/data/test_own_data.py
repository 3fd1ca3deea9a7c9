"""Data of one's own: ``npz:FILE`` through the data registry (bounded, never unpickled), and every
probe function taking a DataLoader in place of tensors with the same result."""
from __future__ import annotations

import io
import json
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from probe.data import load_data
from probe.errors import DataError, UserError


def _table(path, n=60, d=5, **extra):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    np.savez(path, x=x, y=y, **extra)
    return x, y


def test_npz_table_with_a_stated_split(tmp_path):
    x, y = _table(tmp_path / "t.npz")
    d = load_data(f"npz:{tmp_path / 't.npz'}")
    assert d.num_classes == 3 and d.x_train.shape[1:] == (5,) and d.in_channels == 5
    assert d.x_train.shape[0] + d.x_test.shape[0] == 60 and d.x_test.shape[0] == 12     # test_fraction 0.2
    assert "stratified split test_fraction=0.2 split_seed=42" in d.source
    # the samples are the file's, as stored: every train row is one of x with its label
    rows = {tuple(r): int(c) for r, c in zip(np.round(x, 6).tolist(), y)}
    for r, c in zip(np.round(d.x_train.numpy(), 6).tolist(), d.y_train.tolist()):
        assert rows[tuple(r)] == c
    assert load_data("npz", tmp_path / "t.npz").x_train.equal(d.x_train)     # the file given as root


def test_npz_own_test_split_and_images(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, size=(20, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "i.npz", x=x, y=np.arange(20) % 4, x_test=x[:8], y_test=np.arange(8) % 4,
             class_names=np.array(["a", "b", "c", "d"]))
    d = load_data(f"npz:{tmp_path / 'i.npz'}")
    assert d.x_train.shape == (20, 1, 6, 6) and d.x_test.shape == (8, 1, 6, 6) and d.image_size == (6, 6)
    assert d.class_names == ("a", "b", "c", "d") and torch.equal(d.x_train[:, 0], torch.from_numpy(x).float())


def _zip_member(name: str, header_shape: tuple, payload: bytes) -> bytes:
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": header_shape})
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name + ".npy", buf.getvalue() + payload)
    return out.getvalue()


@pytest.mark.parametrize("case,needle", [
    ("pickle", "Python objects"),
    ("header", "declares a"),
    ("garbage", "not a readable .npz"),
    ("no_y", "no array 'y'"),
    ("labels", "integer class labels"),
    ("nan", "NaN"),
])
def test_hostile_or_wrong_npz_files_are_refused(tmp_path, case, needle):
    path = tmp_path / "bad.npz"
    if case == "pickle":
        np.savez(path, x=np.array([{"a": 1}, {"b": 2}], dtype=object), y=np.array([0, 1]))
    elif case == "header":     # a header declaring 10^12 floats over a few bytes: refused before allocating
        path.write_bytes(_zip_member("x", (10 ** 6, 10 ** 6), b"\0" * 64))
    elif case == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "no_y":
        np.savez(path, x=np.zeros((4, 2), np.float32))
    elif case == "labels":
        np.savez(path, x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.float32))
    elif case == "nan":
        np.savez(path, x=np.full((4, 2), np.nan, np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=needle) as e:
        load_data(f"npz:{path}")
    assert "\n" not in str(e.value)


def test_npz_file_size_limit(tmp_path, monkeypatch):
    import probe.data.npz as npz_mod

    _table(tmp_path / "t.npz")
    monkeypatch.setattr(npz_mod, "MAX_NPZ_BYTES", 100)
    monkeypatch.setattr(npz_mod.read_npz, "__defaults__", (100,))
    with pytest.raises(DataError, match="above the 100-byte limit"):
        load_data(f"npz:{tmp_path / 't.npz'}")


def test_npz_needs_its_file():
    with pytest.raises(UserError, match="npz:FILE"):
        load_data("npz")


# --- the CLI on a model and data of one's own ---------------------------------------------------------


def test_probe_a_user_model_on_npz_data_from_the_cli(tmp_path, capsys, monkeypatch):
    pkg = tmp_path / "mine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch.nn as nn\n"
        "def mlp(num_classes=10, in_chans=1):\n"
        "    return nn.Sequential(nn.Linear(in_chans, 16), nn.Tanh(), nn.Linear(16, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _table(tmp_path / "t.npz")
    from probe.cli import main

    code = main(["hessian", "--model", "mine.nets:mlp", "--data", f"npz:{tmp_path / 't.npz'}", "--n", "40",
                 "--k", "2", "--no-density", "--trace-matvecs", "6", "--json", "--runs", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)["results"][0]
    assert res["data"] == f"npz:{tmp_path / 't.npz'}" and len(res["top_eigenvalues"]) == 2
    sys.modules.pop("mine.nets", None)
    sys.modules.pop("mine", None)


# --- DataLoader input ---------------------------------------------------------------------------------


class DictNet(nn.Module):
    """A model returning a dict (as HuggingFace models do)."""

    def __init__(self, d=5, k=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k))

    def forward(self, x):
        return {"logits": self.body(x), "hidden": x}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)
    return net, x, y, loader


def test_dataloader_equals_tensors_for_every_probe(tiny):
    import probe

    net, x, y, loader = tiny
    h_t = probe.hessian_spectrum(net, x, y, k=3, density=False, trace_matvecs=10, n_samples=None)
    h_l = probe.hessian_spectrum(net, loader, k=3, density=False, trace_matvecs=10, n_samples=None)
    np.testing.assert_allclose(h_l.eigenvalues, h_t.eigenvalues, rtol=1e-10, atol=1e-12)
    assert h_l.trace_estimate == pytest.approx(h_t.trace_estimate, rel=1e-10)
    assert h_l.notes[0] == "data: 40 samples read from a DataLoader (6 batches)" and h_l.n_samples == 40

    k_t = probe.empirical_ntk(net, x, kind="full")
    k_l = probe.empirical_ntk(net, loader, kind="full")
    torch.testing.assert_close(k_l.kernel, k_t.kernel, rtol=1e-12, atol=1e-12)
    k_x2 = probe.empirical_ntk(net, x[:5], loader, kind="trace")
    torch.testing.assert_close(k_x2.kernel, probe.empirical_ntk(net, x[:5], x, kind="trace").kernel)

    l_t = probe.ntk_topk_lanczos(net, x, 3)
    l_l = probe.ntk_topk_lanczos(net, loader, 3)
    np.testing.assert_allclose(l_l.eigenvalues, l_t.eigenvalues, rtol=1e-8)

    d = probe.random_directions(net, seed=0)
    s_t = probe.loss_surface(net, x, y, d, "-1:1:3")
    s_l = probe.loss_surface(net, loader, d, "-1:1:3")       # directions move up one place
    np.testing.assert_allclose(s_l.loss, s_t.loss, rtol=1e-12)

    from probe.probes.gradvar import GradVarParams

    gp = GradVarParams(batches=4, batch_size=8, chunk=8, seeds=1)
    g_t = probe.gradient_variance(net, x, y, gp)
    g_l = probe.gradient_variance(net, loader, gp)                # params move up one place
    np.testing.assert_allclose(g_l.grad_norm, g_t.grad_norm, rtol=1e-10)
    np.testing.assert_allclose(g_l.per_sample_var, g_t.per_sample_var, rtol=1e-10)

    kw = dict(pairs=4, steps=9, max_degree=3, triples=1, plane_resolution=5)
    i_t = probe.interpolation_paths(net, x, y, **kw).summary()
    i_l = probe.interpolation_paths(net, loader, **kw)
    got = i_l.summary()
    for s in (got, i_t):
        s.pop("wall_time_s", None)
    got["notes"] = got["notes"][1:]                               # the loader's note
    assert got == i_t
    assert i_l.n_samples == 40


def test_a_loader_of_inputs_only_and_misuse(tiny):
    import probe

    net, x, y, loader = tiny
    with pytest.raises(UserError, match="leave y out"):
        probe.hessian_spectrum(net, loader, y)
    with pytest.raises(UserError, match="no labels"):
        probe.hessian_spectrum(net, DataLoader(TensorDataset(x), batch_size=8))
    with pytest.raises(UserError, match="give y"):
        probe.hessian_spectrum(net, x)
    sat = probe.saturation(net.float(), DataLoader(x.float(), batch_size=8))
    assert sat.n_samples == 40
    net.double()


def test_hessian_says_how_many_samples_it_used(tiny):
    import probe

    net, x, y, _ = tiny
    r = probe.hessian_spectrum(net, x, y, k=1, density=False, trace=None, n_samples=16)
    assert r.n_samples == 16
    assert any("used 16 of the 40 samples given" in n for n in r.notes)


def test_gradient_variance_takes_output_for_a_dict_model():
    import probe

    torch.manual_seed(0)
    net = DictNet()
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    from probe.probes.gradvar import GradVarParams

    gp = GradVarParams(batches=3, batch_size=8, chunk=8, seeds=1)
    a = probe.gradient_variance(net, x, y, gp, output="logits")
    b = probe.gradient_variance(net.body, x, y, gp)           # the same network without the dict
    assert np.isfinite(b.grad_norm).all()
    np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=1e-6)
    c = probe.gradient_variance(net, x, y, gp, output=lambda out: out["logits"])
    np.testing.assert_allclose(c.grad_norm, b.grad_norm, rtol=1e-6)
