"""The Hessian probe through the framework: CLI, storage of eigenvectors, per-block rows, the
across-training figure with the run's own 2/lr, and bad input as one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probe.errors import UserError
from probe.jobs import load_result, run_probe
from probe.store import RunStore
from probe.training import TrainConfig, train
from tests.probes.test_registry import cli

FAST = {"k": 2, "trace_matvecs": 6, "density_probes": 1, "density_steps": 6}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    res = train(TrainConfig(model="tiny_mul", epochs=2, limit_train=64, limit_test=32, lr=0.05,
                            schedule="step:1:0.5"), RunStore(root))
    return root, res.run_id


def test_eigenvectors_are_stored_and_are_eigenvectors(tmp_path):
    """The stored top-k vectors satisfy H v = lambda v (float64 products, residual relative to
    lambda_max below 1e-6) and come back from the store bit for bit."""
    from probe.probes.hessian import curvature_operator

    store = RunStore(tmp_path)
    out = run_probe(store, "hessian", {**FAST, "k": 3, "dtype": "float64", "trace": "none", "density": False},
                    model="tiny_mul", n=24)
    assert out[0].error is None
    res = out[0].result
    row, loaded = load_result(store, out[0].info["probe_id"])
    assert loaded == res
    V, ev = loaded.eigenvectors, loaded.eigenvalues
    assert V.dtype == np.float32 and V.shape[1] == 3 and V.shape[0] == res.summary()["n_params"]
    assert np.all(np.diff(ev) <= 0)
    # rebuild the same target as the runner does and apply the Hessian to the stored vectors
    from probe.functional import calibrate_batchnorm
    from probe.jobs.targets import iter_targets, probe_inputs

    target = next(iter(iter_targets(store, model="tiny_mul", seed=0)))
    x, y, _ = probe_inputs(target.data_spec or target.data, 24, split="train", seed=0)
    model = calibrate_batchnorm(target.model, x)
    op = curvature_operator(model, x, y, dtype=torch.float64)
    W = op.matmat(torch.as_tensor(V, dtype=torch.float64))
    resid = (W - torch.as_tensor(V, dtype=torch.float64) * torch.as_tensor(ev)).norm(dim=0)
    # float32 storage of the vectors bounds the residual at ~1e-7 relative
    assert float(resid.max()) <= 1e-5 * abs(ev[0]), (resid, ev)


def test_checkpoint_sweep_and_the_edge_of_stability_line(run, capsys):
    root, run_id = run
    code, out, err = cli(capsys, "hessian", "--run", run_id, "--checkpoint", "all", "--n", "16",
                         *[f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()], "--runs", root, "--json",
                         "--quiet")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["epoch"] for r in results] == [0, 1, 2]
    lrs = [r["lr"] for r in results]
    assert all(lr and lr > 0 for lr in lrs)
    from probe.figures.hessian import hessian_across_training
    from probe.probes.hessian import HessianProbeResult

    entries = [({"run_id": run_id, "epoch": r["epoch"], "model": "tiny_mul"},
                HessianProbeResult(r, {})) for r in results]
    fig = hessian_across_training(entries)
    edge = [t for t in fig.data if t.name.startswith("2/lr")]
    assert len(edge) == 1 and np.allclose(edge[0].y, [2.0 / lr for lr in lrs])
    sharp = [t for t in fig.data if t.name == "tiny_mul" or t.name.startswith("tiny_mul (")]
    assert np.allclose(sharp[0].y, [r["lambda_max"] for r in results])


def test_blocks_are_rows_of_the_summary_and_a_bad_pattern_lists_the_names(tmp_path, capsys):
    store = RunStore(tmp_path)
    out = run_probe(store, "hessian", {**FAST, "blocks": "stage"}, model="tiny_add", n=16)
    blocks = out[0].result.summary()["blocks"]
    assert len(blocks) >= 2 and sum(b["n_params"] for b in blocks) == out[0].result.summary()["n_params"]
    assert "per block:" in out[0].result.text()
    names = [b["name"] for b in blocks]
    code, _, err = cli(capsys, "hessian", "--model", "tiny_add", "--n", "16", "--blocks", "nosuchlayer*",
                       "--runs", tmp_path, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "nosuchlayer*" in err and "conv1" in err and "fc" in err   # the layer names a pattern can match
    assert names[0] == "stem" and "layer1" in names


def test_k_larger_than_the_parameters_is_refused_and_nothing_is_stored(tmp_path):
    store = RunStore(tmp_path)
    with pytest.raises(UserError, match="k"):
        run_probe(store, "hessian", {**FAST, "k": 9999}, model="tiny_add", n=16)
    assert store.list_probes() == []
