"""The probe framework: registry, one target runner, generic CLI subcommands, ``--html``; and the
registry-wide test that every registered probe runs, stores and loads back equal."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from probe.cli import main
from probe.errors import UserError
from probe.jobs import load_result, run_probe
from probe.probes import registry
from probe.probes.registry import (Figure, Measure, Probe, StoredResult, get_probe, list_probes,
                                   summary_number)
from probe.store import RunStore, to_jsonable
from probe.training import TrainConfig, lr_at, train


def cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# --- a toy probe, registered for these tests only -----------------------------------------------

SEEN: list[dict] = []


@dataclass(frozen=True)
class ToyParams:
    scale: float = field(default=1.0, metadata={"help": "multiplies the logits"})
    square: bool = field(default=False, metadata={"help": "square the mean logits"})
    centre: bool = field(default=True, metadata={"help": "subtract the mean"})
    fail_at: int = field(default=-1, metadata={"help": "raise a user error at this epoch"})
    mode: str = field(default="mean", metadata={"help": "statistic", "choices": ("mean", "max")})

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise UserError(f"scale must be finite, got {self.scale!r}")


@dataclass(frozen=True, eq=False)
class ToyResult:
    values: np.ndarray
    label: str

    def summary(self):
        return {"label": self.label, "first": float(self.values[0])}

    def arrays(self):
        return {"values": self.values}

    @classmethod
    def from_store(cls, summary, arrays):
        return cls(np.asarray(arrays["values"]), summary["label"])

    def text(self):
        return f"{self.label}: {self.values.round(3).tolist()}"

    def __eq__(self, other):
        return self.label == other.label and np.array_equal(self.values, other.values)


def _toy_compute(ctx, p: ToyParams) -> ToyResult:
    bn = [m for m in ctx.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    SEEN.append({"epoch": ctx.epoch, "lr": ctx.lr, "n": int(ctx.x.shape[0]), "x0": ctx.x[0].clone(),
                 "bn_var": bn[0].running_var.clone(),
                 "rebuild": ctx.rebuild, "params": p})
    if ctx.epoch == p.fail_at:
        raise UserError(f"toy refuses epoch {ctx.epoch}")
    with torch.no_grad():
        z = ctx.model(ctx.x) * p.scale
    v = (z.mean(0) if p.mode == "mean" else z.max(0).values).double()
    if p.centre:
        v = v - v.mean()
    if p.square:
        v = v ** 2
    return ToyResult(v.numpy(), f"{ctx.model_name}:{ctx.epoch}")


def _toy_figure(entries):
    import plotly.graph_objects as go

    return go.Figure([go.Bar(y=r.values, name=info["model"]) for info, r in entries])


@pytest.fixture
def toy():
    spec = registry.register(Probe(name="toy", help="a toy probe", params=ToyParams, result=ToyResult,
                                   compute=_toy_compute, figure=_toy_figure, default_n=12))
    SEEN.clear()
    yield spec
    registry.unregister("toy")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    res = train(TrainConfig(model="tiny_add", epochs=2, limit_train=64, limit_test=32, lr=0.05,
                            schedule="step:1:0.5"), RunStore(root))
    return root, res.run_id


def test_registered_probe_gets_a_subcommand_with_its_flags(toy, capsys):
    code, out, err = cli(capsys, "toy", "--help")
    assert code == 0
    for text in ("--scale SCALE", "multiplies the logits (default: 1.0)", "--square", "--no-centre",
                 "--mode MODE", "statistic (one of mean, max; default: mean)", "--checkpoint", "--html", "--n N", "(default: 12)", "--data-root"):
        assert text in out, text
    code, out, err = cli(capsys, "toy", "--model", "tiny_add", "--mode", "median")
    assert code == 2 and err.strip() == "probe toy: error: mode must be one of mean, max, got 'median'"


def test_runner_stores_and_loads_back_equal(toy, tmp_path, capsys):
    code, out, err = cli(capsys, "toy", "--model", "tiny_add", "--scale", "2", "--square", "--no-centre",
                         "--runs", tmp_path, "--json", "--quiet")
    assert code == 0, err
    entry = json.loads(out)["results"][0]
    assert entry["model"] == "tiny_add" and entry["n"] == 12 and entry["label"] == "tiny_add:None"
    p = SEEN[-1]["params"]
    assert (p.scale, p.square, p.centre) == (2.0, True, False)
    store = RunStore(tmp_path)
    row, result = load_result(store, entry["probe_id"])
    assert row["kind"] == "toy" and row["params"]["scale"] == 2.0 and row["params"]["n"] == 12
    direct = run_probe(store, "toy", ToyParams(scale=2.0, square=True, centre=False), model="tiny_add",
                       save=False)[0].result
    assert result == direct


def test_checkpoint_sweep_loads_data_once_and_keeps_going(toy, tiny_run, capsys, monkeypatch):
    import probe.jobs.runner as runner

    root, run_id = tiny_run
    calls = []
    real = runner.probe_inputs
    monkeypatch.setattr(runner, "probe_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = cli(capsys, "toy", "--run", run_id, "--checkpoint", "all", "--fail-at", "1",
                         "--runs", root, "--json", "--quiet")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["epoch"] for r in results] == [0, 1, 2]
    assert results[1]["error"] == "toy refuses epoch 1" and "label" not in results[1]
    assert "error" not in results[0] and "error" not in results[2]
    assert len(calls) == 1  # the data of a sweep is loaded once
    config = TrainConfig.from_dict(RunStore(root).get_run(run_id)["config"])
    assert [s["lr"] for s in SEEN] == [lr_at(config, 0), lr_at(config, 1), lr_at(config, 1)]
    # BN statistics estimated on the probe data at init only; a checkpoint keeps its own
    from probe.functional import calibrate_batchnorm
    from probe.training import load_run_model

    init, _, _ = load_run_model(RunStore(root), run_id, "init")
    bn_key = next(k for k in init.state_dict() if k.endswith("running_var"))
    calibrated = calibrate_batchnorm(init, real(RunStore(root).get_run(run_id)["data"], 12)[0])
    torch.testing.assert_close(SEEN[0]["bn_var"], calibrated.state_dict()[bn_key])
    assert torch.equal(SEEN[2]["bn_var"], RunStore(root).load_checkpoint(run_id, 2)["model"][bn_key])
    assert all(torch.equal(s["x0"], SEEN[0]["x0"]) for s in SEEN)
    # every target failing: one line, exit 2
    code, out, err = cli(capsys, "toy", "--run", run_id, "--checkpoint", "1", "--fail-at", "1", "--runs", root,
                         "--quiet")
    assert code == 2 and err.strip() == "probe toy: error: toy refuses epoch 1"


def test_rebuild_gives_fresh_inits(toy, tiny_run):
    root, run_id = tiny_run
    run_probe(RunStore(root), "toy", run=run_id, checkpoint="init", save=False)
    rebuild = SEEN[-1]["rebuild"]
    a, b, c = rebuild(1), rebuild(1), rebuild(2)
    wa, wb, wc = (next(m.parameters()).detach() for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_html_page_is_standalone(toy, tmp_path, capsys):
    page = tmp_path / "fig" / "toy.html"
    code, out, err = cli(capsys, "toy", "--model", "tiny_add", "--runs", tmp_path / "runs", "--html", page,
                         "--html-js", "inline", "--json", "--quiet")
    assert code == 0, err
    html = page.read_text()
    import re

    assert json.loads(out)["html"] == str(page) and "plotly" in html.lower()
    assert not re.search(r"<script[^>]*src=", html)  # nothing fetched: plotly.js is inline
    assert len(html) > 1_000_000  # plotly.js itself is embedded


def test_bad_probe_options_are_one_line(toy, tmp_path, capsys):
    code, out, err = cli(capsys, "toy", "--model", "tiny_add", "--scale", "inf", "--runs", tmp_path, "--quiet")
    assert code == 2 and err.strip() == "probe toy: error: scale must be finite, got inf"
    with pytest.raises(UserError, match="unknown option"):
        run_probe(RunStore(tmp_path), "toy", {"nosuch": 1}, model="tiny_add")
    with pytest.raises(UserError, match="unknown probe"):
        get_probe("nosuch")


# --- every registered probe ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list_probes())
def test_every_registered_probe_runs_stores_and_loads_back_equal(name, tiny_run, tmp_path, capsys):
    spec = get_probe(name)
    root, run_id = tiny_run
    store = RunStore(tmp_path)
    outcomes = run_probe(store, name, spec.smoke, model="tiny_mul", n=16)  # the probe's small settings
    assert len(outcomes) == 1 and outcomes[0].error is None
    result = outcomes[0].result
    json.dumps(to_jsonable(result.summary()), allow_nan=False)  # the catalog can hold it
    row, loaded = load_result(store, outcomes[0].info["probe_id"])
    assert row["kind"] == name and loaded == result
    assert isinstance(result.text(), str) and result.text()
    if spec.figure is not None:
        fig = spec.figure([(outcomes[0].info, result), (dict(outcomes[0].info, model="again"), loaded)])
        assert len(fig.data) >= 1
    # through the CLI, on every checkpoint of a run
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in spec.smoke.items()]
    code, out, err = cli(capsys, name, "--run", run_id, "--checkpoint", "all", "--n", "16", *flags,
                         "--runs", root, "--json", "--quiet")
    assert code == 0, err
    assert [r["epoch"] for r in json.loads(out)["results"]] == [0, 1, 2]


def test_public_api_names_resolve_to_what_they_say():
    import probe
    import probe.training.loop  # noqa: F401  (importing the training modules must not shadow the function)

    assert callable(probe.train) and probe.train.__name__ == "train"
    for name in probe.__all__:
        assert getattr(probe, name) is not None, name
    assert probe.run_probe is run_probe and probe.RunStore is RunStore


# --- a new probe is one package: registered from the tests alone, it is everywhere ----------------

@dataclass(frozen=True)
class ThrowawayParams:
    power: float = field(default=2.0, metadata={"help": "power of the absolute logits averaged"})


class ThrowawayResult(StoredResult):
    def text(self) -> str:
        return f"mean |logit|^p = {self.data['value']:.4g} over {self.data['n']} inputs"


def _throwaway_compute(ctx, p: ThrowawayParams) -> ThrowawayResult:
    from probe.functional import eval_mode

    with eval_mode(ctx.model), torch.no_grad():
        z = ctx.model(ctx.x).double()
    return ThrowawayResult({"value": float(z.abs().pow(p.power).mean()), "n": int(z.shape[0])},
                           {"logits": z.numpy()})


def _throwaway_figure(entries):
    import plotly.graph_objects as go

    return go.Figure([go.Bar(y=[r.data["value"] for _, r in entries], x=[info["model"] for info, _ in entries])])


def _throwaway_series(entries):
    import plotly.graph_objects as go

    return go.Figure([go.Scatter(x=[info.get("epoch") or 0 for info, _ in entries],
                                 y=[r.data["value"] for _, r in entries])])


@pytest.fixture
def throwaway():
    spec = registry.register(Probe(
        name="throwaway", help="a probe registered from the tests alone", params=ThrowawayParams,
        result=ThrowawayResult, compute=_throwaway_compute, figure=_throwaway_figure,
        extra_figures=(Figure("value across training", _throwaway_series, series=True),), default_n=8,
        quick=({"power": 1.0}, 8), smoke={"power": 1.0},
        measures=(Measure("throwaway_value", "throwaway value", "generalisation", summary_number("value"),
                          "mean |logit|^power"),)))
    yield spec
    registry.unregister("throwaway")
    assert "throwaway" not in list_probes()


def test_a_probe_registered_from_the_tests_alone_is_in_the_cli_catalog_headline_and_explorer(
        throwaway, tmp_path, capsys, monkeypatch):
    from probe.cli import build_parser
    from probe.headline import MEASURES, PROBES, headline, probe_settings

    # the CLI: its subcommand, with its own flags and default n
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["throwaway", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for text in ("a probe registered from the tests alone", "--power POWER", "power of the absolute logits",
                 "(default: 8)", "--checkpoint", "--runs"):
        assert text in out, text
    # run by name on a tiny model into a runs root
    root = tmp_path / "runs"
    code, out, err = cli(capsys, "throwaway", "--model", "tiny_add", "--runs", root, "--json", "--quiet")
    assert code == 0, err
    entry = json.loads(out)["results"][0]
    assert entry["n"] == 8 and entry["model"] == "tiny_add"
    # the catalog: a stored row of its kind, loading back as its result
    store = RunStore(root)
    rows = store.list_probes(kind="throwaway")
    assert [r["probe_id"] for r in rows] == [entry["probe_id"]]
    row, result = load_result(store, entry["probe_id"])
    assert isinstance(result, ThrowawayResult) and result.data["value"] == pytest.approx(entry["value"])
    # the headline table: its measure, read from the stored row
    assert "throwaway" in PROBES and [m.probe for m in MEASURES if m.key == "throwaway_value"] == ["throwaway"]
    assert probe_settings(quick=True)["throwaway"] == ({"power": 1.0}, 8)
    assert headline(store, {"throwaway": entry["probe_id"]})["throwaway_value"] == pytest.approx(entry["value"])
    # the explorer: its page, with its stored result selected and its two figures drawn
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("PROBE_RUNS", str(root))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[2] / "apps" / "explorer.py"), default_timeout=60)
    at.run()
    assert "throwaway" in at.sidebar.radio(key="page").options
    at.sidebar.radio(key="page").set_value("throwaway").run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert [h.value for h in at.header] == ["throwaway"]
    assert len(at.multiselect(key="throwaway-pick").value) == 1
    assert len(at.get("plotly_chart")) == 2 and [s.value for s in at.subheader] == ["value across training"]
