"""`probe ntk`: by model name at init, by run and checkpoint, stored in the catalog."""
from __future__ import annotations

import json

import numpy as np
import pytest

from probe.cli import main
from probe.store import RunStore
from probe.train import TrainConfig, train


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ntk_by_model_name_stores_kernel_and_prediction(tmp_path, capsys):
    code, out, err = cli(capsys, "ntk", "--model", "tiny_mul", "--n", "24", "--runs", str(tmp_path), "--json", "--quiet")
    assert code == 0, err
    res = json.loads(out)["results"][0]
    assert res["model"] == "tiny_mul" and res["kind"] == "trace" and res["n"] == 24
    ev = res["top_eigenvalues"]
    assert ev == sorted(ev, reverse=True) and ev[0] > 0
    assert res["spectrum"]["condition_number"] >= 1 and 1 <= res["spectrum"]["effective_rank"] <= 24
    rows = res["eigenlearning"]["rows"]
    assert [r["n"] for r in rows] == [3, 6, 12]
    assert all(r["predicted_test_mse"] > 0 and r["measured_test_mse"] > 0 for r in rows)
    store = RunStore(tmp_path)
    probe = store.list_probes(kind="ntk")[0]
    arrays = store.load_probe_arrays(probe["probe_id"])
    K = arrays["kernel"]
    assert K.shape == (24, 24) and np.allclose(K, K.T)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(K))[::-1][:len(ev)], ev, rtol=1e-8)


def test_ntk_across_checkpoints_of_a_run(tmp_path, capsys):
    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_add", epochs=2, limit_train=128, limit_test=50), store, quiet=True)
    code, out, err = cli(capsys, "ntk", "--run", res.run_id, "--checkpoint", "all", "--n", "16",
                         "--runs", str(tmp_path), "--json", "--quiet", "--no-eigenlearning")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["epoch"] for r in results] == [0, 1, 2]
    assert len(store.list_probes(run_id=res.run_id, kind="ntk")) == 3
    # training moves the kernel
    assert results[0]["top_eigenvalues"][0] != pytest.approx(results[2]["top_eigenvalues"][0], rel=1e-6)


@pytest.mark.parametrize("argv,needle", [
    (["ntk"], "--model NAME or --run RUN"),
    (["ntk", "--model", "nosuch"], "unknown model"),
    (["ntk", "--model", "tiny_add", "--checkpoint", "3"], "--checkpoint needs --run"),
    (["ntk", "--model", "tiny_add", "--n", "1"], "--n must be at least 2"),
    (["ntk", "--model", "tiny_add", "--method", "magic"], "magic"),
])
def test_ntk_bad_input(tmp_path, capsys, argv, needle):
    code, out, err = cli(capsys, *argv, "--runs", str(tmp_path), "--quiet")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
