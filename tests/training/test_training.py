"""Training, exact resume after SIGKILL, divergence handling, the train / runs / show / demo CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from probe.errors import UserError
from probe.store import RunStore
from probe.training import TrainConfig, TrainingDiverged, load_run_model, lr_at, train
from tests.probes.test_registry import cli

ROOT = Path(__file__).resolve().parents[2]


def _env():
    # one thread: bit-for-bit identical floating point between the killed/resumed and the reference run
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def test_lr_schedules():
    c = TrainConfig(model="tiny_add", lr=0.1, epochs=200, schedule="multistep:60,120,160:0.2")
    assert [round(lr_at(c, e), 10) for e in (0, 59, 60, 119, 120, 160, 199)] == \
        [0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008]
    c = TrainConfig(model="tiny_add", lr=0.1, epochs=50, schedule="step:30:0.1")
    assert lr_at(c, 29) == pytest.approx(0.1) and lr_at(c, 30) == pytest.approx(0.01)
    c = TrainConfig(model="tiny_add", lr=0.1, epochs=10, schedule="cosine")
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 5) == pytest.approx(0.05)
    with pytest.raises(UserError, match="schedule"):
        TrainConfig(model="tiny_add", schedule="linear").validate()


def test_train_logs_metrics_checkpoints_best_and_final(tmp_path):
    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_add", epochs=3, lr=0.05, limit_train=256, limit_test=100), store)
    assert res.status == "finished" and res.epochs_done == 3
    rows = store.get_metrics(res.run_id)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in ("train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "lr",
                    "epoch_time_s"):
            assert r[key] is not None, key
        assert r["test_top5"] >= r["test_top1"]
    assert res.best_acc == max(r["test_top1"] for r in rows) and res.final_acc == rows[-1]["test_top1"]
    assert [c["epoch"] for c in store.list_checkpoints(res.run_id)] == [1, 2, 3]
    run = store.get_run(res.run_id)
    assert run["status"] == "finished" and run["summary"]["best_acc"] == res.best_acc
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    # the checkpoint rebuilds the model (self-describing run) with identical predictions
    model, _, epoch = load_run_model(store, res.run_id, "last")
    assert epoch == 3
    from probe.training import evaluate
    from probe.data import load_data
    d = load_data("digits", limit_test=100)
    assert evaluate(model, d.x_test, d.y_test)["top1"] == pytest.approx(res.final_acc)


def _train_cmd(runs, extra=()):
    return [sys.executable, "-m", "probe.cli", "train", "--model", "tiny_wrn", "--model-arg", "dropout=0.3",
            "--data", "digits", "--epochs", "6", "--lr", "0.05", "--batch-size", "32", "--crop-padding", "1",
            "--hflip", "--mixup", "0.2", "--seed", "3", "--runs", str(runs), "--quiet", "--json", *extra]


@pytest.mark.slow          # tests/training/test_resume.py kills runs at chosen points in the default suite
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    """Dropout, augmentation and mixup all draw random numbers: a resume is exact only if every
    generator is restored."""
    killed_root, ref_root = tmp_path / "killed", tmp_path / "ref"
    proc = subprocess.Popen(_train_cmd(killed_root), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = None
    deadline = time.time() + 240
    while time.time() < deadline:
        if (killed_root / "catalog.sqlite").exists():
            store = store or RunStore(killed_root)
            runs = store.list_runs()
            if runs and (store.latest_checkpoint(runs[0]["run_id"]) or 0) >= 2:
                break
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run_id = store.list_runs()[0]["run_id"]
    assert store.get_run(run_id)["status"] == "running"  # killed, not finished
    assert store.latest_checkpoint(run_id) < 6

    resumed = subprocess.run([sys.executable, "-m", "probe.cli", "train", "--resume", run_id, "--runs",
                              str(killed_root), "--quiet", "--json"], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    ref = subprocess.run(_train_cmd(ref_root), env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    ref_id = json.loads(ref.stdout)["run_id"]
    ref_store = RunStore(ref_root)

    got, want = store.get_metrics(run_id), ref_store.get_metrics(ref_id)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        for key in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "lr"):
            assert a[key] == b[key], (a["epoch"], key, a[key], b[key])
    wa = store.load_checkpoint(run_id, 6)["model"]
    wb = ref_store.load_checkpoint(ref_id, 6)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert store.get_run(run_id)["status"] == "finished"
    assert json.loads(resumed.stdout)["best_acc"] == json.loads(ref.stdout)["best_acc"]


NAN_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class Blowup(nn.Module):
        def __init__(self, num_classes=10, in_chans=1):
            super().__init__()
            self.fc = nn.Linear(in_chans * 64, num_classes)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            if self.training:
                self.calls += 1
            out = self.fc(x.flatten(1))
            return out * float("nan") if int(self.calls) > 12 else out

    def factory(num_classes=10, in_chans=1):
        return Blowup(num_classes, in_chans)
""")


def test_nan_loss_stops_marks_failed_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    (tmp_path / "nanmod.py").write_text(NAN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = tmp_path / "runs"
    code, out, err = cli(capsys, "train", "--model", "nanmod:factory", "--data", "digits", "--epochs", "3",
                         "--limit-train", "512", "--batch-size", "64", "--runs", str(runs), "--quiet")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "loss became nan" in err and "marked failed" in err
    store = RunStore(runs)
    run = store.list_runs()[0]
    assert run["status"] == "failed" and "nan" in run["error"]
    assert store.latest_checkpoint(run["run_id"]) == 1  # epoch 1 (8 steps) was good, epoch 2 diverged
    state = store.load_checkpoint(run["run_id"], "last")["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    with pytest.raises(TrainingDiverged):
        train(TrainConfig(model="nanmod:factory", epochs=3, limit_train=512), store)


def test_train_cli_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "probe.cli", "train", "--model", "mul_resnet", "--data", "digits",
                           "--epochs", "3", "--json", "--runs", str(tmp_path)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=900)  # a hang guard, not a speed test
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert {"run_id", "best_acc", "final_acc"} <= set(data) and data["epochs_done"] == 3
    assert "epoch 3/3" in proc.stderr  # logs go to stderr


@pytest.mark.parametrize("argv,needle", [
    (["--model", "tiny_add", "--data", "imagenet"], "unknown data set"),
    (["--model", "tiny_ad", "--data", "digits"], "did you mean tiny_add"),
    (["--model", "tiny_add", "--data", "cifar10", "--data-root", "{tmp}/empty"], "data_batch_1"),
    (["--model", "tiny_add", "--data", "digits", "--schedule", "linear"], "schedule"),
    (["--model", "tiny_add", "--data", "digits", "--epochs", "0"], "epochs must be"),
    (["--model", "tiny_add", "--fusion", "mul,r=xx"], "unknown or out of order"),
    (["--preset", "nope"], "unknown preset"),
    (["--resume", "nosuchrun"], "unknown run"),
])
def test_train_bad_input_exit_2_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = cli(capsys, "train", *argv, "--runs", str(tmp_path / "runs"), "--quiet")
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_runs_root_not_writable(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, _, err = cli(capsys, "train", "--model", "tiny_add", "--runs", str(blocker / "runs"), "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_tampered_checkpoint_is_refused_on_resume(tmp_path, capsys):
    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_add", epochs=1, limit_train=128, limit_test=50), store)
    ckpt = Path(store.list_checkpoints(res.run_id)[0]["path"])
    payload = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {payload}",))

    torch.save({"model": Evil()}, ckpt)
    store.update_run(res.run_id, status="interrupted")
    code, _, err = cli(capsys, "train", "--resume", res.run_id, "--runs", str(tmp_path), "--quiet")
    assert code == 2 and ("refused" in err or "corrupt" in err)
    assert not payload.exists()


def test_two_trainings_into_one_catalog(tmp_path):
    cmd = [sys.executable, "-m", "probe.cli", "train", "--model", "tiny_add", "--data", "digits", "--epochs", "4",
           "--limit-train", "256", "--runs", str(tmp_path), "--quiet", "--json"]
    procs = [subprocess.Popen(cmd + ["--seed", str(s)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-300:] for o in outs]
    ids = {json.loads(o[0])["run_id"] for o in outs}
    store = RunStore(tmp_path)
    assert len(ids) == 2
    for rid in ids:
        assert [m["epoch"] for m in store.get_metrics(rid)] == [1, 2, 3, 4]
        assert len(store.list_checkpoints(rid)) == 4 and store.get_run(rid)["status"] == "finished"


def test_runs_show_and_quick_demo(tmp_path, capsys):
    code, out, err = cli(capsys, "demo", "--quick", "--runs", str(tmp_path), "--quiet", "--json")
    assert code == 0, err
    demo = json.loads(out)
    assert [m["model"] for m in demo["models"]] == ["add_resnet", "mul_resnet"]
    assert all(m["best_acc"] is not None and m["final_acc"] is not None for m in demo["models"])
    # the quick comparison compares two trained models: both far above chance (10%) on digits' 10 classes
    # (measured: add_resnet 96.7%, mul_resnet 92.7%; the former 16-step recipe left mul_resnet at 10.9%)
    assert all(m["final_acc"] > 50.0 for m in demo["models"]), [(m["model"], m["final_acc"]) for m in demo["models"]]
    _check_side_by_side(demo, RunStore(tmp_path))
    code, out, _ = cli(capsys, "runs", "--runs", str(tmp_path), "--json")
    assert code == 0 and json.loads(out)["count"] == 2
    rid = demo["models"][0]["run_id"]
    code, out, _ = cli(capsys, "show", rid[:20], "--runs", str(tmp_path), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["run"]["run_id"] == rid and len(shown["metrics"]) == 4
    code, out, _ = cli(capsys, "show", "last", "--runs", str(tmp_path))
    assert code == 0 and "test top1" in out


def _check_side_by_side(demo: dict, store: RunStore) -> None:
    """The demo's side-by-side table equals the stored probe rows of each model's last epoch,
    read here straight from the catalog summaries and the stored arrays."""
    import numpy as np

    runs = {m["model"]: m["run_id"] for m in demo["models"]}
    rows = {r["key"]: r for r in demo["side_by_side"]}
    expected = {"grad_snr": ("gradvar", ("aggregates", "snr")), "rel_update": ("gradvar", ("aggregates", "rel_update")),
                "lambda_max": ("hessian", ("lambda_max",)), "hessian_trace": ("hessian", ("trace", "estimate")),
                "ntk_cond": ("ntk", ("spectrum", "condition_number")),
                "ntk_eff_rank": ("ntk", ("spectrum", "effective_rank")),
                "path_deviation": ("interp", ("all", "deviation_max_mean")),
                "path_degree": ("interp", ("all", "degree_mean"))}
    assert set(expected) < set(rows) and {r["kind"] for r in rows.values()} == {"optimisation", "generalisation"}
    for model, rid in runs.items():
        last = max(c["epoch"] for c in store.list_checkpoints(rid))
        for key, (kind, path) in expected.items():
            pid = rows[key]["probe_ids"][model]
            probe_row = store.get_probe(pid)
            assert probe_row["run_id"] == rid and probe_row["kind"] == kind and probe_row["checkpoint_epoch"] == last
            value = probe_row["summary"]
            for k in path:
                value = value[k]
            assert rows[key][model] == pytest.approx(value, rel=1e-12), (model, key)
        # no gates in either model: saturation is n/a, not 0
        assert rows["sat_frac"][model] is None
        # the surface rise from the stored grid: mean loss over |a|, |b| <= 0.5 minus the centre loss
        pid = rows["surface_rise"]["probe_ids"][model]
        arrays, summary = store.load_probe_arrays(pid), store.get_probe(pid)["summary"]
        a, b = np.meshgrid(arrays["alpha"], arrays["beta"], indexing="ij")
        inner = (np.abs(a) <= 0.5) & (np.abs(b) <= 0.5)
        assert inner.sum() >= 9
        assert rows["surface_rise"][model] == pytest.approx(arrays["loss"][inner].mean() - summary["centre_loss"],
                                                            rel=1e-12)
        # the NTK column is the NTK section's last-epoch row
        assert rows["ntk_cond"]["probe_ids"][model] == [r["probe_id"] for r in demo["ntk"]
                                                        if r["model"] == model and r["when"] != "init"][0]


def test_presets_reproduce_seed_recipes():
    from probe.cli import build_parser
    from probe.cli.commands import train_config_from_args

    args = build_parser().parse_args(["train", "--preset", "fmm-caltech101", "--epochs", "5"])
    c = train_config_from_args(args)
    assert (c.model, c.data, c.batch_size, c.lr, c.momentum, c.weight_decay) == \
        ("wrn16_10", "caltech101", 64, 0.1, 0.9, 5e-4)
    assert c.schedule == "multistep:60,120,160:0.2" and c.epochs == 5  # flags override the preset
    assert c.model_kwargs == {"dropout": 0.3} and not c.rebuild_optimizer_each_epoch
    args = build_parser().parse_args(["train", "--preset", "nku-cifar100", "--fusion", "mul"])
    c = train_config_from_args(args)
    assert (c.model, c.data, c.seed, c.schedule, c.weight_decay, c.batch_size) == \
        ("resnet50", "cifar100", 666, "step:30:0.1", 1e-4, 256)
    assert c.hflip and c.crop_padding == 4 and c.fusion == "mul"


def test_amp_and_optimizer_rebuild_run(tmp_path):
    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_mul", epochs=2, limit_train=128, limit_test=50, amp=True,
                            rebuild_optimizer_each_epoch=True, label_smoothing=0.1), store)
    assert res.status == "finished" and all(m["train_loss"] is not None for m in res.metrics)
