"""The saturation probe: exact statistics on constructed logits, streaming, gate discovery (modules,
functional calls, no double counting), purity, non-finite logits, the registry contract, figures,
and the zoo's gated models."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from probe.errors import UserError
from probe.figures.saturation import saturation_figure, saturation_histograms
from probe.probes.saturation import api as sat_module
from probe.probes.registry import ProbeContext, get_probe, make_params, param_fields
from probe.probes.saturation import (NO_GATES_NOTE, SaturationParams, SaturationResult, compute,
                                     saturation)
from probe.store import to_jsonable

pytestmark = pytest.mark.usefixtures("one_thread")

# Constructed logits, none on a bin edge of the 8-bin histogram over [-12, 12] (edges every 3).
Z = [-13.0, -5.0, -3.5, -2.5, -1.0, 0.2, 1.7, 2.95, 3.2, 12.5]
X = torch.tensor([Z, [-v for v in Z]], dtype=torch.float64)       # (2, 10): symmetric, mean 0


def _identity_gate(kind_module: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Identity(), kind_module).double()


def _roundtrip(r: SaturationResult) -> SaturationResult:
    """Through JSON (as the catalog stores it) and an .npz loaded without pickle."""
    summary = json.loads(json.dumps(to_jsonable(r.summary()), allow_nan=False))
    buf = io.BytesIO()
    np.savez_compressed(buf, **r.arrays())
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return SaturationResult.from_store(summary, arrays)


def _state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "flags": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["ids"] == before["ids"]
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    assert after["flags"] == before["flags"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    assert all(p.grad is None for p in model.parameters())
    assert torch._C._len_torch_function_stack() == 0


# --- parameters -----------------------------------------------------------------------------------


def test_params_have_help_defaults_and_named_errors():
    fields = {f.name: f for f in param_fields(SaturationParams)}
    assert {"batch_size", "bins", "threshold"} <= set(fields)
    p = SaturationParams()
    assert (p.batch_size, p.bins, p.threshold) == (128, 64, 3.0)
    for name, bad in [("batch_size", 0), ("batch_size", 2.5), ("batch_size", True), ("bins", 0),
                      ("threshold", 0.0), ("threshold", float("nan")), ("hist_max", -1.0)]:
        with pytest.raises(UserError, match=name) as err:
            make_params(SaturationParams, {name: bad})
        assert "--" not in str(err.value)
    with pytest.raises(UserError, match="batch_size"):
        saturation(nn.Sigmoid(), torch.zeros(2, 3), batch_size=-1)
    with pytest.raises(UserError, match="at least one sample"):
        saturation(nn.Sigmoid(), torch.zeros(0, 3))


# --- exact statistics on constructed logits ----------------------------------------------------------


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# kind, module, number of logits outside the band (of the 10 in one row; the rows mirror), gain g'(z)/g'(0)
KINDS = [
    ("sigmoid", nn.Sigmoid(), 6, lambda z: _sig(z) * _sig(-z) / 0.25),          # |z| > logit(0.95) = 2.944
    ("tanh", nn.Tanh(), 8, lambda z: 1.0 - math.tanh(z) ** 2),                  # |z| > atanh(0.9) = 1.472
    ("hard_sigmoid", nn.Hardsigmoid(), 6, lambda z: 1.0 if -3 < z < 3 else 0.0),  # |z| > 2.7
    ("hard_swish", nn.Hardswish(), 6, lambda z: 1.0 if -3 < z < 3 else 0.0),
]


@pytest.mark.parametrize("kind, module, n_out, gain", KINDS, ids=[k[0] for k in KINDS])
def test_constructed_logits_give_exact_numbers(kind, module, n_out, gain):
    r = saturation(_identity_gate(module), X, bins=8, hist_max=12.0, threshold=3.0)
    assert r.names.tolist() == ["1"] and r.kinds.tolist() == [kind]
    assert r.roles.tolist() == ["module"] and r.stages.tolist() == ["1"]
    assert r.count.tolist() == [20] and r.nonfinite.tolist() == [0]
    assert r.n_logit_sat.tolist() == [10]                     # -13, -5, -3.5, 3.2, 12.5 and mirrors
    assert r.n_output_sat.tolist() == [2 * n_out]
    assert r.frac_logit_sat[0] == 0.5 and r.frac_output_sat[0] == 2 * n_out / 20
    # float64 throughout: the mean gain is exact up to summation rounding
    assert r.gain[0] == pytest.approx(sum(gain(z) for z in Z) / 10, rel=1e-14, abs=1e-15)
    assert abs(r.mean[0]) < 1e-15                             # symmetric logits
    assert r.std[0] == pytest.approx(math.sqrt(sum(z * z for z in Z) / 10), rel=1e-14)
    # [under | [-12,-9) [-9,-6) [-6,-3) [-3,0) [0,3) [3,6) [6,9) [9,12] | over]
    assert r.hist.tolist() == [[2, 0, 0, 3, 5, 5, 3, 0, 0, 2]]
    assert np.array_equal(r.edges, np.arange(-12.0, 12.1, 3.0))
    v = X.numpy().ravel()
    inner, _ = np.histogram(v[(v >= -12) & (v < 12)], bins=r.edges)   # the same bins by numpy
    assert r.hist[0, 1:-1].tolist() == inner.tolist()
    m = r.model()
    assert (m["count"], m["n_output_sat"], m["n_gates"]) == (20, 2 * n_out, 1)


def test_threshold_and_range_are_parameters():
    r = saturation(_identity_gate(nn.Sigmoid()), X, bins=4, hist_max=4.0, threshold=1.5)
    assert r.n_logit_sat.tolist() == [16]                     # |z| > 1.5: all but -1, 0.2 and mirrors
    # [under | [-4,-2) [-2,0) [0,2) [2,4] | over]
    assert r.hist.tolist() == [[3, 4, 3, 3, 4, 3]]


# --- streaming --------------------------------------------------------------------------------------


def test_streaming_over_chunks_and_slices_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    model = models.create_model("tiny_triplet").double()
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64) * 3
    one = saturation(model, x, batch_size=12)
    many = saturation(model, x, batch_size=5)
    monkeypatch.setitem(sat_module._SLICE_ELEMENTS, "cpu", 7)   # many flat slices per gate tensor
    sliced = saturation(model, x, batch_size=1)
    for r in (many, sliced):
        assert r.names.tolist() == one.names.tolist()
        for k in ("count", "nonfinite", "n_logit_sat", "n_output_sat", "hist"):
            assert np.array_equal(getattr(r, k), getattr(one, k)), k
        # the means are shifted sums in a different order: float64 rounding only
        for k in ("gain", "mean", "std"):
            np.testing.assert_allclose(getattr(r, k), getattr(one, k), rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "hard_swish"])
def test_sums_of_parts_merge_to_the_one_pass_numbers(kind):
    """merge_states (what the ranks' sums go through under torchrun) of uneven parts, one of them
    empty and one all non-finite, against one accumulator over every logit: counts and histograms
    exact, mean / std / gain within float64 rounding (rtol 1e-12); logits far from 0 (mean ~ 40)."""
    torch.manual_seed(3)
    z = torch.randn(1000, dtype=torch.float64) * 2 + 40.0
    z[::97] = torch.randn(11, dtype=torch.float64) * 5                  # some inside the histogram range
    z[5], z[600] = math.nan, -math.inf
    opts = dict(threshold=3.0, bins=16, lo=-50.0, hi=50.0)
    bad = torch.tensor([math.nan, math.inf], dtype=torch.float64)      # a part without a finite logit
    parts = [z[:3], z[3:3], z[3:410], bad, z[410:]]
    whole = sat_module._Acc("g", kind, "", "module")
    whole.add(torch.cat(parts), **opts)
    want = whole.finish(16)
    states = []
    for part in parts:
        acc = sat_module._Acc("g", kind, "", "module")
        acc.add(part, **opts)
        states.append(acc.state(16))
    got = sat_module.merge_states(states)
    assert got["count"] == want["count"] == 998
    assert got["nonfinite"] == want["nonfinite"] == 4
    for k in ("n_logit_sat", "n_output_sat"):
        assert got[k] == want[k], k
    assert np.array_equal(got["hist"], want["hist"])
    for k in ("mean", "std", "gain"):
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    finite = z[torch.isfinite(z)]
    assert got["mean"] == pytest.approx(float(finite.mean()), rel=1e-14)
    assert got["std"] == pytest.approx(float(finite.std(unbiased=False)), rel=1e-12)


@pytest.mark.parametrize("model_name", ["tiny_triplet", None])
def test_the_device_held_sums_equal_the_compacting_path(monkeypatch, model_name):
    """The path that never reads the device per slice (used on a GPU), run on the CPU: the same
    counts and histograms, and the same moments within rounding, with non-finite logits in some
    slices (they are masked instead of compacted) and many slices per gate."""
    if model_name is None:
        class M(nn.Module):
            def forward(self, x):
                torch.tanh(x * math.inf * 0)                    # every logit NaN
                return torch.sigmoid(x) + F.hardsigmoid(x)

        model = M()
        x = torch.tensor([[math.nan, math.inf, -math.inf, 1.0, -2.0, 5.0, 0.3, 13.0, -20.0]], dtype=torch.float64)
    else:
        torch.manual_seed(0)
        model = models.create_model(model_name).double()
        x = torch.randn(12, 1, 8, 8, dtype=torch.float64) * 3
        x[3, 0, 2, 2], x[5, 0, 1, 1] = math.nan, math.inf
    for size in (1 << 18, 7):
        monkeypatch.setitem(sat_module._SLICE_ELEMENTS, "cpu", size)
        monkeypatch.setitem(sat_module._SYNC_FREE, "cpu", False)
        a = saturation(model, x, batch_size=5, bins=8)
        monkeypatch.setitem(sat_module._SYNC_FREE, "cpu", True)
        b = saturation(model, x, batch_size=5, bins=8)
        assert a.names.tolist() == b.names.tolist()
        assert a.nonfinite.sum() > 0
        for k in ("count", "nonfinite", "n_logit_sat", "n_output_sat", "hist"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), k
        for k in ("gain", "mean", "std"):
            np.testing.assert_allclose(getattr(b, k), getattr(a, k), rtol=1e-12, atol=1e-14, err_msg=k)


def test_non_contiguous_logits_are_read_in_row_groups(monkeypatch):
    class T(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x.transpose(1, 2))              # a non-contiguous view

    x = torch.randn(4, 6, 5, dtype=torch.float64)
    monkeypatch.setitem(sat_module._SLICE_ELEMENTS, "cpu", 11)
    r = saturation(T(), x)
    assert r.count.tolist() == [120]
    assert r.mean[0] == pytest.approx(x.mean().item(), rel=1e-12)
    assert r.std[0] == pytest.approx(x.std(unbiased=False).item(), rel=1e-12)


def test_progress_is_reported_per_chunk():
    calls = []
    saturation(_identity_gate(nn.Sigmoid()), torch.randn(5, 3, dtype=torch.float64), batch_size=2,
               progress=lambda desc, done, total: calls.append((desc, done, total)))
    assert calls == [("saturation", 2, 5), ("saturation", 4, 5), ("saturation", 5, 5)]


# --- which gates ------------------------------------------------------------------------------------


class _Inner(nn.Module):
    def forward(self, x):
        a = torch.sigmoid(x)
        b = x.tanh()
        c = torch.sigmoid(2 * x)
        return a + b + c


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        return F.hardsigmoid(self.inner(x)) + torch.tanh(x)


def test_functional_calls_are_found_attributed_and_named():
    x = torch.randn(3, 4, dtype=torch.float64)
    r = saturation(_Outer().double(), x, batch_size=1)        # k restarts on every call of a module
    assert r.names.tolist() == ["inner:sigmoid#0", "inner:Tensor.tanh#0", "inner:sigmoid#1",
                                ":hardsigmoid#0", ":tanh#0"]
    assert r.kinds.tolist() == ["sigmoid", "tanh", "sigmoid", "hard_sigmoid", "tanh"]
    assert set(r.roles.tolist()) == {"functional"} and set(r.sources.tolist()) == {"functional"}
    assert r.stages.tolist() == ["inner", "inner", "inner", "(root)", "(root)"]
    assert r.count.tolist() == [12] * 5
    assert r.mean[2] == pytest.approx(2 * x.mean().item(), rel=1e-12)     # the logits of sigmoid(2x)
    inner = torch.sigmoid(x) + x.tanh() + torch.sigmoid(2 * x)
    assert r.mean[3] == pytest.approx(inner.mean().item(), rel=1e-12)


def test_gate_modules_are_not_counted_twice():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = models.Gate("sigmoid", role="test.gate")   # calls torch.sigmoid inside
            self.act = models.HSwish()                              # a hard-sigmoid Gate inside
            self.sig = nn.Sigmoid()                                 # calls torch.sigmoid inside

        def forward(self, x):
            return self.sig(self.act(self.gate(x)))

    x = torch.randn(2, 5, dtype=torch.float64)
    r = saturation(M().double(), x)
    assert r.names.tolist() == ["gate", "act.gate", "sig"]
    assert r.kinds.tolist() == ["sigmoid", "hard_sigmoid", "sigmoid"]
    assert r.roles.tolist() == ["test.gate", "h_swish", "module"]
    assert r.groups.tolist() == ["test", "h_swish", "module"]
    assert r.count.tolist() == [10, 10, 10]


def test_in_place_gates_are_read_before_they_overwrite_their_input():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.hs = nn.Hardswish(inplace=True)

        def forward(self, x):
            y = x.clone().sigmoid_()
            return self.hs(x.clone() * 5) + y

    x = torch.linspace(-1, 1, 10, dtype=torch.float64).reshape(1, 10)
    r = saturation(M().double(), x)
    assert r.names.tolist() == [":Tensor.sigmoid_#0", "hs"]
    assert r.mean.tolist() == pytest.approx([0.0, 0.0], abs=1e-15)
    assert r.std[1] == pytest.approx(5 * x.std(unbiased=False).item(), rel=1e-12)


def test_unused_gate_modules_are_listed():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Sigmoid(), nn.Tanh()

        def forward(self, x):
            return self.used(x)

    r = saturation(M(), torch.randn(2, 3))
    assert r.names.tolist() == ["used"] and r.unused == ("spare",)
    assert r.summary()["unused"] == ["spare"]
    root = saturation(nn.Tanh(), torch.randn(2, 3))            # the model is itself a gate
    assert root.names.tolist() == ["(root)"] and root.stages.tolist() == ["(root)"]


def test_stage_is_the_block_inside_the_first_container():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse = nn.Sigmoid()

        def forward(self, x):
            return self.fuse(x)

    class NetworkBlock(nn.Module):                               # the WRN "block1.layer.0" layout
        def __init__(self):
            super().__init__()
            self.layer = nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.layer(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1, self.head = NetworkBlock(), nn.Tanh()

        def forward(self, x):
            return self.head(self.block1(x))

    r = saturation(Net(), torch.randn(2, 3))
    assert r.names.tolist() == ["block1.layer.0.fuse", "block1.layer.1.fuse", "head"]
    assert r.stages.tolist() == ["block1.layer.0", "block1.layer.1", "head"]
    assert [k for k, _ in r.by_stage()] == ["block1.layer.0", "block1.layer.1", "head"]


# --- purity -------------------------------------------------------------------------------------------


def test_model_unchanged_hooks_and_mode_removed():
    model = models.create_model("tiny_triplet")
    model.train()
    model.layer2.eval()                                         # a mixed configuration is restored as is
    model.register_forward_hook(lambda m, a, o: None)          # the user's own hook stays
    before = _state(model)
    r = saturation(model, torch.randn(6, 1, 8, 8), batch_size=4)
    assert r.n_gates == 9
    _assert_unchanged(model, before)


def test_model_unchanged_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            torch.tanh(x)
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Sequential(nn.BatchNorm1d(3), Boom()))
    model.train()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        saturation(model, torch.randn(4, 3))
    _assert_unchanged(model, before)
    # and nothing is left over for the next call
    model[2][1] = nn.Identity()
    r = saturation(model, torch.randn(4, 3))
    assert r.names.tolist() == ["1"] and r.count.tolist() == [12]


# --- non-finite logits ---------------------------------------------------------------------------------


def test_non_finite_logits_are_counted_and_excluded():
    class M(nn.Module):
        def forward(self, x):
            torch.tanh(x * math.inf * 0)                        # every logit NaN
            return torch.sigmoid(x)

    x = torch.tensor([[math.nan, math.inf, -math.inf, 1.0, -2.0, 5.0]], dtype=torch.float64)
    r = saturation(M(), x, bins=8)
    tanh_, sig = 0, 1
    assert r.names.tolist() == [":tanh#0", ":sigmoid#0"]
    assert r.nonfinite.tolist() == [6, 3] and r.count.tolist() == [0, 3]
    assert r.mean[sig] == pytest.approx(4 / 3, rel=1e-15)
    assert r.std[sig] == pytest.approx(np.std([1.0, -2.0, 5.0]), rel=1e-14)
    assert r.frac_logit_sat[sig] == pytest.approx(1 / 3) and r.frac_output_sat[sig] == pytest.approx(1 / 3)
    assert r.gain[sig] == pytest.approx(sum(_sig(z) * _sig(-z) * 4 for z in (1.0, -2.0, 5.0)) / 3, rel=1e-14)
    assert r.hist.sum(axis=1).tolist() == [0, 3]
    assert all(math.isnan(v) for v in (r.mean[tanh_], r.std[tanh_], r.gain[tanh_], r.frac_output_sat[tanh_]))
    m = r.model()                                               # aggregates never average in a NaN
    assert (m["count"], m["nonfinite"]) == (3, 9)
    assert m["mean"] == pytest.approx(4 / 3) and math.isfinite(m["std"]) and math.isfinite(m["gain"])
    s = r.summary()
    json.dumps(s, allow_nan=False)
    assert s["gates"][tanh_]["mean"] is None and s["gates"][tanh_]["nonfinite"] == 6
    assert "non-finite" in r.text()
    assert _roundtrip(r) == r


# --- no gates -----------------------------------------------------------------------------------------


def test_model_without_gates_gets_a_note():
    r = saturation(models.create_model("tiny_add"), torch.randn(4, 1, 8, 8))
    assert r.n_gates == 0 and r.hist.shape == (0, 66) and r.note == NO_GATES_NOTE
    s = r.summary()
    assert s["n_gates"] == 0 and s["note"] == NO_GATES_NOTE and s["gates"] == []
    assert s["model"]["count"] == 0 and s["model"]["mean"] is None
    assert "models.Gate" in r.text() and "torch.sigmoid" in r.text()
    assert _roundtrip(r) == r
    assert all(a.dtype != object for a in r.arrays().values())


# --- the registered probe ---------------------------------------------------------------------------


def test_registered_probe_computes_and_round_trips():
    spec = get_probe("saturation")
    assert spec.params is SaturationParams and spec.result is SaturationResult
    assert spec.compute is compute and spec.figure is saturation_figure and spec.default_n == 256
    torch.manual_seed(0)
    ctx = ProbeContext(model=models.create_model("tiny_bottleneck"), x=torch.randn(6, 1, 8, 8),
                       y=torch.zeros(6, dtype=torch.int64), num_classes=10, device=torch.device("cpu"),
                       seed=0, model_name="tiny_bottleneck")
    seen = []
    ctx = ProbeContext(**{**ctx.__dict__, "progress": lambda *a: seen.append(a)})
    r = spec.compute(ctx, SaturationParams(batch_size=4, bins=16))
    assert seen[-1] == ("saturation", 6, 6)
    assert r.hist.shape == (r.n_gates, 18) and r.n_samples == 6
    arrays = r.arrays()
    assert all(a.dtype.kind in "Uif" for a in arrays.values())
    back = _roundtrip(r)
    assert back == r and not back.differences(r)
    changed = SaturationResult.from_store(r.summary(), {**arrays, "hist": arrays["hist"] + 1})
    assert changed != r and changed.differences(r) == ["hist"]     # the comparison can fail
    assert SaturationResult.from_store({**r.summary(), "threshold": 2.0}, arrays) != r
    s = r.summary()
    assert len(s["gates"]) == r.n_gates and {"stage", "kind", "role", "frac_output_sat"} <= set(s["gates"][0])
    assert [g["group"] for g in s["by_group"]] == ["triplet", "ca"]
    assert sum(g["count"] for g in s["by_stage"]) == s["model"]["count"] == int(r.count.sum())


# --- figures ------------------------------------------------------------------------------------------


def _info(model="m", run_id=None, epoch=None):
    return {"model": model, "run_id": run_id, "epoch": epoch}


def test_figure_for_one_entry_has_bars_and_top_histograms():
    torch.manual_seed(0)
    r = saturation(models.create_model("tiny_triplet"), torch.randn(4, 1, 8, 8) * 4)
    fig = saturation_figure([(_info("tiny_triplet"), r)])
    kinds = [t.type for t in fig.data]
    assert kinds == ["bar"] * (2 + 4)                           # 2 bar series + 4 histograms
    assert list(fig.data[0].x) == r.names.tolist()
    assert fig.data[0].y == pytest.approx(r.frac_output_sat.tolist())
    top = int(np.nanargmax(r.frac_output_sat))
    assert fig.data[2].y == pytest.approx((r.hist[top, 1:-1] / r.count[top]).tolist())
    hist = saturation_histograms(r)
    assert len(hist.data) == r.n_gates and len(hist.data[0].x) == r.bins + 2
    one = saturation_histograms(r, [r.names[3], 0])
    assert [t.name for t in one.data] == [r.names[3], r.names[0]]
    with pytest.raises(ValueError, match="no gate"):
        saturation_histograms(r, ["nosuch"])


def test_figure_for_several_entries_is_a_gate_by_entry_heatmap():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    r1 = saturation(models.create_model("tiny_triplet"), x)
    r2 = saturation(models.create_model("tiny_wrn", fusion="fmm08"), x)
    entries = [(_info("tiny_triplet", "run1", 0), r1), (_info("tiny_triplet", "run1", 3), r1),
               (_info("tiny_wrn"), r2)]
    fig = saturation_figure(entries)
    assert [t.type for t in fig.data] == ["heatmap"]
    z = np.array(fig.data[0].z, dtype=float)
    assert z.shape == (r1.n_gates + r2.n_gates, 3)
    assert list(fig.data[0].y) == r1.names.tolist() + r2.names.tolist()
    assert np.isnan(z[: r1.n_gates, 2]).all() and np.isnan(z[r1.n_gates:, :2]).all()
    np.testing.assert_allclose(z[: r1.n_gates, 0], r1.frac_output_sat)
    assert len(set(fig.data[0].x)) == 3


def test_figures_of_models_without_gates_say_so():
    r = saturation(models.create_model("tiny_add"), torch.randn(2, 1, 8, 8))
    for fig in (saturation_figure([(_info(), r)]), saturation_figure([(_info(), r), (_info("b"), r)])):
        assert len(fig.data) == 1 and "no gates found" in fig.layout.annotations[0].text
    assert len(saturation_figure([]).data) == 0


# --- the zoo ---------------------------------------------------------------------------------------------


def test_zoo_models_with_gates():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    tri = saturation(models.create_model("tiny_triplet"), x)
    assert tri.n_gates == 9 and set(tri.groups.tolist()) == {"triplet"}
    assert tri.stages.tolist() == [f"layer{i}.0" for i in (1, 2, 3) for _ in range(3)]
    assert tri.roles.tolist()[:3] == ["triplet.cw", "triplet.hc", "triplet.hw"]

    assert saturation(models.create_model("tiny_mul"), x).n_gates == 0    # mean-1 BN product: no sigmoid

    wrn = saturation(models.create_model("tiny_wrn", fusion="fmm08"), x)   # sig(bn r) * bn_s(s)
    assert wrn.names.tolist() == [f"layer{i}.0.fusion.r.act" for i in (1, 2, 3)]
    assert set(wrn.roles.tolist()) == {"fusion.r"} and wrn.stages.tolist() == ["layer1.0", "layer2.0", "layer3.0"]
    assert wrn.count.tolist() == [4 * 16 * 64, 4 * 32 * 16, 4 * 64 * 4]     # (N, C, H, W) per stage

    wide = saturation(models.create_model("wrn", depth=10, widen=1, in_chans=1, fusion="fmm08"), x)
    assert wide.names.tolist() == wrn.names.tolist()

    ca = saturation(models.create_model("resnet4", depth=50, width=4, attention="ca", in_chans=1), x)
    assert ca.n_gates == 16 * 3 and set(ca.groups.tolist()) == {"ca"}
    assert ca.roles.tolist()[:3] == ["ca.h_swish", "ca.h", "ca.w"]
    assert ca.kinds.tolist()[:3] == ["hard_sigmoid", "sigmoid", "sigmoid"]
    kinds = dict(ca.by_kind())
    assert kinds["hard_sigmoid"]["n_gates"] == 16 and kinds["sigmoid"]["n_gates"] == 32
    assert ca.stages.tolist()[:3] == ["layer1.0"] * 3 and ca.stages.tolist()[-1] == "layer4.2"
    bottleneck = saturation(models.create_model("tiny_bottleneck"), x)
    assert set(bottleneck.groups.tolist()) == {"triplet", "ca"} and bottleneck.n_gates == 16 * 5


def test_attention_gates_have_their_family_role():
    x = torch.randn(2, 8, 4, 4)
    for name, roles in [("se", ["se.channel"]), ("cbam", ["cbam.channel", "cbam.spatial"]), ("nam", ["nam"])]:
        r = saturation(_att(name), x)
        assert r.roles.tolist() == roles and set(r.groups.tolist()) == {name}
    # a triplet branch with a plain sigmoid activation before its gate: reported, in the triplet family
    r = saturation(_att("triplet", activation="sigmoid"), x)
    assert r.roles.tolist()[:2] == ["triplet.module", "triplet.cw"]


def _att(name, **kw):
    from models.attention import create_attention

    return create_attention(name, 8, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_cuda_device_equals_cpu_and_leaves_the_model_on_cpu():
    torch.manual_seed(0)
    model = models.create_model("tiny_bottleneck").double()
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    before = _state(model)
    cpu = saturation(model, x, batch_size=3)
    gpu = saturation(model, x, batch_size=3, device="cuda")
    _assert_unchanged(model, before)
    assert next(model.parameters()).device.type == "cpu"
    for k in ("count", "n_logit_sat", "n_output_sat", "hist"):
        assert np.array_equal(getattr(gpu, k), getattr(cpu, k)), k
    for k in ("gain", "mean", "std"):                           # float64, different kernels: rounding only
        np.testing.assert_allclose(getattr(gpu, k), getattr(cpu, k), rtol=1e-9, atol=1e-12)


def test_bin_edges_are_left_closed_and_float64_logits_are_not_written():
    z = torch.tensor([[-12.0, -9.0, -0.0, 0.0, 3.0, 11.999, 12.0, -12.001]], dtype=torch.float64)
    keep = z.clone()
    r = saturation(_identity_gate(nn.Sigmoid()), z, bins=8, hist_max=12.0)   # the gate reads z itself
    assert torch.equal(z, keep)
    # [under | [-12,-9) [-9,-6) [-6,-3) [-3,0) [0,3) [3,6) [6,9) [9,12) | over (>= 12)]
    assert r.hist.tolist() == [[1, 1, 1, 0, 0, 2, 1, 0, 1, 1]]
