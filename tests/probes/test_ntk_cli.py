"""`probe ntk`: by model name at init, by run and checkpoint, stored in the catalog."""
from __future__ import annotations

import json

import numpy as np
import pytest

from probe.store import RunStore
from probe.training import TrainConfig, train
from tests.probes.test_registry import cli


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
    res = train(TrainConfig(model="tiny_add", epochs=2, limit_train=128, limit_test=50), store)
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
    (["ntk", "--model", "tiny_add", "--n", "1"], "n must be an integer in [2,"),
    (["ntk", "--model", "tiny_add", "--method", "magic"], "magic"),
])
def test_ntk_bad_input(tmp_path, capsys, argv, needle):
    code, out, err = cli(capsys, *argv, "--runs", str(tmp_path), "--quiet")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    import models

    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=20), store)
    other = models.create_model("tiny_wrn", in_chans=1)
    store.save_checkpoint(res.run_id, 9, {"model": other.state_dict(), "epoch": 9})
    code, out, err = cli(capsys, "ntk", "--run", res.run_id, "--checkpoint", "9", "--n", "8",
                         "--runs", str(tmp_path), "--quiet")
    assert code == 2 and "does not fit model 'tiny_add'" in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_ntk_model_in_train_mode_is_left_unchanged(tmp_path):
    """The job probes an eval-mode (BN-calibrated) copy; the trained model object is not touched."""
    import torch
    from probe.functional import calibrate_batchnorm
    import models

    model = models.create_model("tiny_mul").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrated = calibrate_batchnorm(model, torch.randn(32, 1, 8, 8))
    assert calibrated is not model and model.training and not calibrated.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bn = next(m for m in calibrated.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))  # statistics came from data


def test_checkpoint_sweep_reports_a_diverged_checkpoint_and_keeps_the_others(tmp_path, capsys):
    import torch
    import models

    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=20), store)
    blown = models.create_model("tiny_add", in_chans=1)
    head = [n for n, m in blown.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    state = blown.state_dict()
    state[f"{head}.weight"] = state[f"{head}.weight"] * 1e200     # float32: inf, as a diverged run
    store.save_checkpoint(res.run_id, 2, {"model": state, "epoch": 2})
    code, out, err = cli(capsys, "ntk", "--run", res.run_id, "--checkpoint", "all", "--n", "8",
                         "--runs", str(tmp_path), "--json", "--quiet", "--no-eigenlearning")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["epoch"] for r in results] == [0, 1, 2]
    assert "error" not in results[0] and "error" not in results[1]
    assert "outputs are not finite" in results[2]["error"] and "top_eigenvalues" not in results[2]
    assert sorted(p["checkpoint_epoch"] for p in store.list_probes(run_id=res.run_id, kind="ntk")) == [0, 1]
    # the diverged checkpoint alone: every target failed, a one-line error and exit 2
    code, out, err = cli(capsys, "ntk", "--run", res.run_id, "--checkpoint", "2", "--n", "8",
                         "--runs", str(tmp_path), "--quiet")
    assert code == 2 and "outputs are not finite" in err and len(err.strip().splitlines()) == 1, err
