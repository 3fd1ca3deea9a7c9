"""A runs folder from someone else runs no code; every bad input gets one line and exit 2;
probes follow the run they probe; training stops cleanly and says why."""
from __future__ import annotations

import gc
import json
import sqlite3
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from probe.errors import UserError
from probe.store import RunStore
from probe.training import TrainConfig, load_run_model, resume, train
from tests.probes.test_registry import cli


def assert_one_line_exit_2(code, out, err, needle=None):
    assert code == 2, (code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if out:  # with --json: one JSON object on stdout holding the same line
        assert json.loads(out) == {"error": err.strip(), "exit_code": 2}, out
    if needle is not None:
        assert needle in err, err


def _set_config(root: Path, run_id: str, **changes) -> None:
    """Edit a run's stored config as someone with write access to the runs folder could."""
    con = sqlite3.connect(root / "catalog.sqlite")
    config = json.loads(con.execute("SELECT config_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0])
    config.update(changes)
    con.execute("UPDATE runs SET config_json = ?, model = ? WHERE run_id = ?",
                (json.dumps(config), config["model"], run_id))
    con.commit()
    con.close()


USER_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10, in_chans=1, out=None):
            super().__init__()
            self.fc = nn.Linear(in_chans * 64, out or num_classes)

        def forward(self, x):
            return self.fc(x.flatten(1))

    def good(num_classes=10, in_chans=1):
        return Net(num_classes, in_chans)

    def wrong_shape(num_classes=10, in_chans=1):
        return Net(num_classes, in_chans, out=num_classes + 3)

    def raises(num_classes=10, in_chans=1):
        raise RuntimeError("factory exploded")

    def not_a_module(num_classes=10, in_chans=1):
        return 42

    class NoParams(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10]

    def no_params(num_classes=10, in_chans=1):
        return NoParams()

    class DictOut(Net):
        def forward(self, x):
            return {"logits": super().forward(x)}

    def dict_out(num_classes=10, in_chans=1):
        return DictOut(num_classes, in_chans)

    class FailsForward(Net):
        def forward(self, x):
            raise ValueError("bad forward")

    def fails_forward(num_classes=10, in_chans=1):
        return FailsForward(num_classes, in_chans)

    class InfWeights(Net):
        def __init__(self, num_classes=10, in_chans=1):
            super().__init__(num_classes, in_chans)
            self.spare = nn.Parameter(torch.zeros(3))  # never in the loss, so the loss stays finite
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            if self.training:
                self.calls += 1
                if int(self.calls) > 12:
                    with torch.no_grad():
                        self.spare.fill_(float("inf"))
            return super().forward(x)

    def inf_weights(num_classes=10, in_chans=1):
        return InfWeights(num_classes, in_chans)
""")


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "usermodels_h.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usermodels_h"


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """One finished tiny run (2 epochs) that the bad-input cases refer to."""
    root = tmp_path_factory.mktemp("runs")
    res = train(TrainConfig(model="tiny_add", epochs=2, limit_train=64, limit_test=32, schedule="constant"),
                RunStore(root))
    return root, res.run_id


# --- a stored config never imports code -------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["ntk", "--run", "{run}", "--n", "8"],
    ["ntk", "--run", "{run}", "--checkpoint", "init", "--n", "8"],
    ["ntk", "--run", "{run}", "--checkpoint", "all", "--n", "8"],
    ["ntk", "--run", "{run}", "--checkpoint", "1", "--method", "lanczos", "--n", "8"],
    ["train", "--resume", "{run}"],
    ["train", "--resume", "{run}", "--epochs", "5"],
    ["train", "--resume", "last"],
])
def test_a_stored_factory_name_is_never_imported(tmp_path, capsys, argv):
    root = tmp_path / "runs"
    res = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=32, schedule="constant"),
                RunStore(root))
    marker = tmp_path / "marker"
    _set_config(root, res.run_id, model="os:system", model_kwargs={"command": f"touch {marker}"})
    store = RunStore(root)
    store.update_run(res.run_id, status="interrupted")
    code, out, err = cli(capsys, *[a.replace("{run}", res.run_id) for a in argv], "--runs", root, "--quiet")
    assert_one_line_exit_2(code, out, err, "never imported")
    assert "os:system" in err  # the stored name is shown
    with pytest.raises(UserError, match="never imported"):
        load_run_model(store, res.run_id)
    with pytest.raises(UserError, match="never imported"):
        resume(res.run_id, store)
    assert not marker.exists()


def test_a_factory_run_is_rebuilt_when_the_user_names_the_factory(tmp_path, capsys, user_models):
    root = tmp_path / "runs"
    code, out, err = cli(capsys, "train", "--model", f"{user_models}:good", "--epochs", "1", "--limit-train", "64",
                         "--limit-test", "32", "--schedule", "constant", "--runs", root, "--quiet", "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    code, out, err = cli(capsys, "ntk", "--run", run_id, "--n", "8", "--runs", root, "--quiet", "--json")
    assert_one_line_exit_2(code, out, err, f"{user_models}:good")
    for extra in (["--factory", f"{user_models}:good"], ["--trust-factory"]):
        code, out, err = cli(capsys, "ntk", "--run", run_id, "--n", "8", "--runs", root, "--quiet", "--json",
                             "--no-eigenlearning", *extra)
        assert code == 0, err
        assert json.loads(out)["results"][0]["top_eigenvalues"][0] > 0
    code, out, err = cli(capsys, "train", "--resume", run_id, "--epochs", "2", "--factory", f"{user_models}:good",
                         "--runs", root, "--quiet", "--json")
    assert code == 0 and json.loads(out)["epochs_done"] == 2, err


# --- user models checked by one forward before training ----------------------------------------


@pytest.mark.parametrize("factory,needle", [
    ("wrong_shape", "returned shape (2, 13)"),
    ("raises", "RuntimeError: factory exploded"),
    ("not_a_module", "not an nn.Module"),
    ("no_params", "no trainable parameters"),
    ("dict_out", "returned a dict"),
    ("fails_forward", "ValueError: bad forward"),
    ("missing", "has no callable"),
])
def test_a_bad_user_factory_is_named_and_no_run_is_created(tmp_path, capsys, user_models, factory, needle):
    root = tmp_path / "runs"
    code, out, err = cli(capsys, "train", "--model", f"{user_models}:{factory}", "--epochs", "1",
                         "--runs", root, "--quiet")
    assert_one_line_exit_2(code, out, err, needle)
    assert RunStore(root).list_runs() == []
    code, out, err = cli(capsys, "ntk", "--model", f"{user_models}:{factory}", "--n", "8", "--runs", root,
                         "--quiet")
    assert_one_line_exit_2(code, out, err, needle)


def test_non_finite_weights_fail_the_run_like_a_nan_loss(tmp_path, capsys, user_models):
    root = tmp_path / "runs"
    code, out, err = cli(capsys, "train", "--model", f"{user_models}:inf_weights", "--epochs", "3",
                         "--limit-train", "512", "--batch-size", "64", "--runs", root, "--quiet")
    assert_one_line_exit_2(code, out, err, "weights became non-finite (first: spare)")
    store = RunStore(root)
    run = store.list_runs()[0]
    assert run["status"] == "failed" and "spare" in run["error"]
    assert store.latest_checkpoint(run["run_id"]) == 1  # epoch 1 (8 steps) was good
    state = store.load_checkpoint(run["run_id"], "last")["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --- every bad input: one line, exit 2 ---------------------------------------------------------

BAD_TRAIN = [
    (["--seed", "-1"], "seed must be"),
    (["--seed", "99999999999999"], "seed must be"),
    (["--device", "meta"], "device 'meta'"),
    (["--device", "cuda:x"], "device 'cuda:x'"),
    (["--weight-decay", "inf"], "weight_decay"),
    (["--weight-decay", "nan"], "weight_decay"),
    (["--weight-decay", "-0.1"], "weight_decay"),
    (["--lr", "0"], "lr must be"),
    (["--lr", "nan"], "lr must be"),
    (["--lr", "inf"], "lr must be"),
    (["--lr", "1e9"], "lr must be"),
    (["--momentum", "1"], "momentum"),
    (["--momentum", "-0.5"], "momentum"),
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "999999999"], "batch_size"),
    (["--epochs", "-3"], "epochs must be"),
    (["--epochs", "1000000000"], "epochs must be"),
    (["--label-smoothing", "1"], "label_smoothing"),
    (["--mixup", "-1"], "mixup"),
    (["--mixup", "nan"], "mixup"),
    (["--crop-padding", "-1"], "crop_padding"),
    (["--image-size", "0"], "image_size"),
    (["--image-size", "100000"], "image_size"),
    (["--limit-train", "0"], "limit_train"),
    (["--limit-test", "-5"], "limit_test"),
    (["--schedule", "step:0:0.1"], "schedule"),
    (["--schedule", "multistep:5,2:0.1"], "schedule"),
    (["--schedule", "multistep:5:nan"], "schedule"),
    (["--schedule", "cosine:3"], "schedule"),
    (["--seed", "abc"], "invalid int value"),
    (["--lr", "fast"], "invalid float value"),
    (["--model-arg", "novalue"], "KEY=VALUE"),
    (["--model-arg", "depth=-1"], "model 'tiny_add'"),
    (["--model-arg", "nosuch=1"], "unexpected keyword"),
    (["--fusion", "mul,r=xx"], "unknown or out of order"),
    (["--data", "imagenet"], "unknown data set"),
    (["--data", "mnist", "--data-root", "{tmp}/nothing"], "mnist not found"),
    (["--factory", "a.b:c"], "apply to --resume"),
    (["--trust-factory"], "apply to --resume"),
]


@pytest.mark.parametrize("argv,needle", BAD_TRAIN)
def test_bad_train_input(tmp_path, capsys, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = cli(capsys, "train", "--model", "tiny_add", "--epochs", "1", *argv,
                         "--runs", tmp_path / "runs", "--quiet")
    assert_one_line_exit_2(code, out, err, needle)


BAD_MODEL_NAMES = [
    ("", "model must be"),
    (":", "package.module:factory"),
    ("nosuchmodule_xyz:f", "cannot import"),
    ("os:path", "has no callable"),
    ("probe.errors:UserError", "not a model factory"),
    ("os:getcwd", "not an nn.Module"),
]


@pytest.mark.parametrize("name,needle", BAD_MODEL_NAMES)
def test_bad_model_names(tmp_path, capsys, name, needle):
    code, out, err = cli(capsys, "train", "--model", name, "--epochs", "1", "--runs", tmp_path / "runs", "--quiet")
    assert_one_line_exit_2(code, out, err, needle)


BAD_WITH_RUN = [
    (["train", "--resume", "{run}", "--lr", "0.5"], "--lr cannot change on resume"),
    (["train", "--resume", "{run}", "--model", "tiny_mul"], "--model cannot change on resume"),
    (["train", "--resume", "{run}", "--hflip", "--seed", "3"], "--seed, --hflip cannot change"),
    (["train", "--resume", "{run}", "--epochs", "-3"], "2 epochs done"),
    (["train", "--resume", "{run}", "--epochs", "1"], "2 epochs done"),
    (["train", "--resume", "{run}", "--device", "meta"], "device 'meta'"),
    (["train", "--resume", "\udcff"], "run reference"),
    (["train", "--resume", "../../etc"], "run reference"),
    (["train", "--resume", "nosuchrun"], "unknown run"),
    (["ntk", "--run", "{run}", "--checkpoint", "abc"], "expected an epoch number"),
    (["ntk", "--run", "{run}", "--checkpoint", "-1"], "0 or more"),
    (["ntk", "--run", "{run}", "--checkpoint", "99"], "no checkpoint for epoch 99"),
    (["ntk", "--run", "{run}", "--image-size", "16"], "trained at image size native"),
    (["ntk", "--run", "{run}", "--data", "synthetic"], "trained on 'digits'"),
    (["ntk", "--run", "{run}", "--model-arg", "width=3"], "--model-arg applies to --model"),
    (["ntk", "--run", "{run}", "--factory", "a.b:c"], "registered model"),
    (["ntk", "--run", "\udcff"], "run reference"),
    (["ntk", "--run", "nosuch"], "unknown run"),
    (["ntk", "--model", "tiny_add", "--run", "{run}"], "not allowed with argument"),
    (["ntk", "--model", "tiny_add", "--factory", "a.b:c"], "apply to --run"),
    (["ntk", "--model", "tiny_add", "--checkpoint", "2"], "--checkpoint needs --run"),
    (["ntk", "--model", "tiny_add", "--n", "0"], "n must be"),
    (["ntk", "--model", "tiny_add", "--n", "-5"], "n must be"),
    (["ntk", "--model", "tiny_add", "--n", "5000000"], "n must be"),
    (["ntk", "--model", "tiny_add", "--n", "2000"], "only 1347 train samples"),
    (["ntk", "--model", "tiny_add", "--topk", "-1"], "topk must be"),
    (["ntk", "--model", "tiny_add", "--topk", "0"], "topk must be"),
    (["ntk", "--model", "tiny_add", "--memory-gb", "nan"], "memory budget"),
    (["ntk", "--model", "tiny_add", "--memory-gb", "-1"], "memory budget"),
    (["ntk", "--model", "tiny_add", "--memory-gb", "inf"], "memory budget"),
    (["ntk", "--model", "tiny_add", "--seed", "-1"], "seed must be"),
    (["ntk", "--model", "tiny_add", "--device", "meta"], "device 'meta'"),
    (["ntk", "--model", "tiny_add", "--image-size", "0"], "image_size"),
    (["ntk", "--model", "tiny_add", "--method", "magic"], "magic"),
    (["ntk", "--model", "tiny_add", "--kind", "bogus"], "kind must be one of trace, full, diagonal"),
    (["ntk", "--model", "tiny_add", "--lanczos-operator", "bogus"], "lanczos_operator must be one of"),
    (["ntk", "--model", "tiny_add", "--data", "cifar10", "--data-root", "{tmp}/nothing"], "cifar10 not found"),
    (["ntk", "--model", "tiny_ad"], "did you mean tiny_add"),
    (["ntk"], "give --model NAME or --run RUN"),
    (["show", "nosuch"], "unknown run"),
    (["show", "\udcff"], "run reference"),
    (["runs", "--status", "bogus"], "invalid choice"),
    (["fusions", "--parse", "mul,r=zz"], "unknown or out of order"),
    (["demo", "--epochs", "0"], "epochs must be"),
    (["nosuchcommand"], "invalid choice"),
]


@pytest.mark.parametrize("argv,needle", BAD_WITH_RUN)
def test_bad_input_across_subcommands(tmp_path, capsys, shared_run, argv, needle):
    root, run_id = shared_run
    argv = [a.replace("{run}", run_id).replace("{tmp}", str(tmp_path)) for a in argv]
    runs = [] if argv[0] == "fusions" or argv[0] == "nosuchcommand" else ["--runs", root]
    code, out, err = cli(capsys, *argv, *runs, "--quiet") if argv[0] != "nosuchcommand" else cli(capsys, *argv)
    assert_one_line_exit_2(code, out, err, needle)


def test_runs_root_that_is_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for argv in (["runs"], ["show", "last"], ["ntk", "--model", "tiny_add", "--n", "8"],
                 ["train", "--model", "tiny_add", "--epochs", "1"]):
        code, out, err = cli(capsys, *argv, "--runs", tmp_path / "afile", "--quiet")
        assert_one_line_exit_2(code, out, err)


# --- probes follow the run ---------------------------------------------------------------------


def test_a_run_is_probed_at_its_own_image_size(tmp_path, capsys):
    root = tmp_path / "runs"
    res = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=32, image_size=16), RunStore(root))
    code, out, err = cli(capsys, "ntk", "--run", res.run_id, "--n", "8", "--runs", root, "--quiet", "--json",
                         "--no-eigenlearning")
    assert code == 0, err
    probe = RunStore(root).list_probes(run_id=res.run_id)[0]
    assert probe["params"]["image_size"] == 16
    # the probe saw 16x16 inputs: the same kernel as computed by hand on the run's own data
    from probe.data import load_data
    from probe.probes.ntk import empirical_ntk

    model, _, _ = load_run_model(RunStore(root), res.run_id)
    x = load_data("digits", image_size=16, limit_train=8).x_train
    assert x.shape[-1] == 16
    K = empirical_ntk(model, x, kind="trace", dtype="float64").kernel
    np.testing.assert_allclose(RunStore(root).load_probe_arrays(probe["probe_id"])["kernel"], K, rtol=1e-10)
    code, out, err = cli(capsys, "ntk", "--run", res.run_id, "--image-size", "8", "--runs", root, "--quiet")
    assert_one_line_exit_2(code, out, err, "image size 16")


def _write_cifar10_binary(folder: Path, per_batch: int = 4, n_test: int = 4) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        labels = (np.arange(n) % 10).astype(np.uint8)[:, None]
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())


def test_a_run_is_probed_on_its_own_data_root(tmp_path, capsys):
    data = tmp_path / "cifar"
    _write_cifar10_binary(data / "cifar-10-batches-bin")
    root = tmp_path / "runs"
    code, out, err = cli(capsys, "train", "--model", "tiny_add", "--model-arg", "in_chans=3", "--data", "cifar10",
                         "--data-root", data, "--epochs", "1", "--runs", root, "--quiet", "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    code, out, err = cli(capsys, "ntk", "--run", run_id, "--n", "8", "--runs", root, "--quiet", "--json",
                         "--no-eigenlearning")
    assert code == 0, err  # the stored data root is used
    moved = tmp_path / "moved"
    data.rename(moved)
    code, out, err = cli(capsys, "ntk", "--run", run_id, "--n", "8", "--runs", root, "--quiet")
    assert_one_line_exit_2(code, out, err, "cifar10 not found")
    code, out, err = cli(capsys, "ntk", "--run", run_id, "--n", "8", "--data-root", moved, "--runs", root,
                         "--quiet", "--json", "--no-eigenlearning")
    assert code == 0, err
    assert RunStore(root).list_probes(run_id=run_id)[-1]["params"]["data_root"] == str(moved)


# --- training stops cleanly and says why -------------------------------------------------------


def test_ctrl_c_marks_interrupted_and_a_crash_marks_failed_with_its_reason(tmp_path):
    store = RunStore(tmp_path)
    config = TrainConfig(model="tiny_add", epochs=3, limit_train=64, limit_test=32, schedule="constant")

    def stop(exc):
        def on_epoch(row):
            if row["epoch"] == 1:
                raise exc
        return on_epoch

    with pytest.raises(KeyboardInterrupt):
        train(config, store, on_epoch=stop(KeyboardInterrupt()))
    run = store.list_runs()[0]
    assert run["status"] == "interrupted" and "resumes from epoch 1" in run["error"]
    with pytest.raises(RuntimeError):
        train(config, store, on_epoch=stop(RuntimeError("disk controller on fire")))
    run = store.list_runs()[0]
    assert run["status"] == "failed" and run["error"] == "RuntimeError: disk controller on fire"
    done = resume(store.list_runs()[1]["run_id"], store)  # the interrupted one
    assert done.status == "finished" and [m["epoch"] for m in done.metrics] == [1, 2, 3]
    assert done.train_time_s == pytest.approx(sum(m["epoch_time_s"] for m in done.metrics), rel=1e-9)
    assert store.get_run(done.run_id)["status"] == "finished"


def test_a_full_disk_fails_the_run_with_its_reason_and_it_resumes_exactly(tmp_path, capsys, mount, fill_disk):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", disk)
    root = disk / "root"
    config = TrainConfig(model="tiny_add", epochs=3, limit_train=64, limit_test=32, schedule="constant", seed=4)
    filler: list[Path] = []

    def fill_after_epoch_1(row):
        if row["epoch"] == 1:
            filler.extend(fill_disk(disk))

    from probe.errors import DiskFullError

    with pytest.raises(DiskFullError, match="no space left on device"):
        train(config, RunStore(root), on_epoch=fill_after_epoch_1)
    store = RunStore(root, readonly=True)
    run = store.list_runs()[0]
    assert run["status"] == "failed" and "no space left on device" in run["error"]
    assert store.latest_checkpoint(run["run_id"]) == 1 and store.load_checkpoint(run["run_id"])["epoch"] == 1
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    # full again (the failed write and the space reserve gave some back): one line, and nothing changes
    filler.extend(fill_disk(disk))
    code, out, err = cli(capsys, "train", "--resume", run["run_id"], "--runs", root, "--quiet")
    assert_one_line_exit_2(code, out, err, "no space left on device")
    assert RunStore(root, readonly=True).latest_checkpoint(run["run_id"]) == 1
    for f in set(filler):
        f.unlink()
    code, out, err = cli(capsys, "train", "--resume", run["run_id"], "--runs", root, "--quiet", "--json")
    assert code == 0, err
    ref = train(config, RunStore(tmp_path / "ref"))
    got = RunStore(root, readonly=True).get_metrics(run["run_id"])
    for a, b in zip(got, ref.metrics, strict=True):
        assert all(a[k] == b[k] for k in ("train_loss", "test_loss", "test_top1", "lr")), (a, b)
    assert RunStore(root, readonly=True).get_run(run["run_id"])["status"] == "finished"


# --- corruption: clear errors, skipped rows, a rebuilt catalog -----------------------------------


def test_runs_and_show_read_a_read_only_root(tmp_path, capsys, shared_run, mount):
    src, run_id = shared_run
    ro = tmp_path / "ro"
    ro.mkdir()
    mount("--bind", src, ro)
    mount("-o", "remount,bind,ro", ro)
    code, out, err = cli(capsys, "runs", "--runs", ro, "--json")
    assert code == 0, err
    assert [r["run_id"] for r in json.loads(out)["runs"]] == [run_id]
    code, out, err = cli(capsys, "show", run_id, "--runs", ro, "--json")
    assert code == 0 and len(json.loads(out)["metrics"]) == 2, err
    code, out, err = cli(capsys, "train", "--model", "tiny_add", "--runs", ro, "--quiet")
    assert_one_line_exit_2(code, out, err, "not writable")


def test_a_malformed_row_is_listed_as_damaged_with_a_warning(tmp_path, capsys):
    root = tmp_path / "runs"
    store = RunStore(root)
    good = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=32), store).run_id
    bad = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=32), store).run_id
    con = sqlite3.connect(root / "catalog.sqlite")
    con.execute("UPDATE runs SET config_json = '{not json' WHERE run_id = ?", (bad,))
    con.commit()
    con.close()
    code, out, err = cli(capsys, "runs", "--runs", root, "--json")
    assert code == 0, err
    listed = json.loads(out)
    # the damaged row stays in the listing, marked damaged with why (never silently left out)
    assert [(r["run_id"], r["status"]) for r in listed["runs"]] == [(bad, "damaged"), (good, "finished")]
    assert "not valid JSON" in listed["runs"][0]["problem"]
    assert len(listed["skipped"]) == 1 and bad in listed["skipped"][0]
    assert err.startswith("warning:") and bad in err and len(err.strip().splitlines()) == 1
    code, out, err = cli(capsys, "show", bad, "--runs", root)
    assert_one_line_exit_2(code, out, err, bad)


def test_a_checkpoint_without_its_model_entry_is_named(tmp_path, capsys):
    root = tmp_path / "runs"
    store = RunStore(root)
    res = train(TrainConfig(model="tiny_add", epochs=1, limit_train=64, limit_test=32, schedule="constant"), store)
    state = store.load_checkpoint(res.run_id, 1)
    del state["model"]
    store.save_checkpoint(res.run_id, 1, state)  # a well-formed, checksummed file that lacks its weights
    store.update_run(res.run_id, status="interrupted")
    for argv in (["ntk", "--run", res.run_id, "--n", "8"], ["train", "--resume", res.run_id, "--epochs", "2"]):
        code, out, err = cli(capsys, *argv, "--runs", root, "--quiet")
        assert_one_line_exit_2(code, out, err, "no valid 'model' entry")


def test_a_lost_catalog_is_refused_then_rebuilt_from_the_run_folders(tmp_path, capsys):
    root = tmp_path / "runs"
    store = RunStore(root)
    done = train(TrainConfig(model="tiny_add", epochs=2, limit_train=64, limit_test=32), store)
    code, out, err = cli(capsys, "ntk", "--run", done.run_id, "--n", "8", "--runs", root, "--quiet", "--json",
                         "--no-eigenlearning")
    assert code == 0, err
    before = {"run": store.get_run(done.run_id), "metrics": store.get_metrics(done.run_id),
              "probes": store.list_probes()}
    store.close()
    (root / "catalog.sqlite").write_bytes(b"")  # a 0-byte catalog beside the run folders
    for name in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
        (root / name).unlink(missing_ok=True)
    gc.collect()    # a store the commands left open would write the catalog back as it is collected
    code, out, err = cli(capsys, "runs", "--runs", root)
    assert_one_line_exit_2(code, out, err, "rebuild")
    code, out, err = cli(capsys, "runs", "--rebuild-catalog", "--runs", root, "--json")
    assert code == 0, err
    rebuilt = json.loads(out)
    assert rebuilt["rebuilt"]["runs"] == 1 and rebuilt["rebuilt"]["checkpoints"] == 2
    assert rebuilt["rebuilt"]["probes"] == 1 and Path(rebuilt["rebuilt"]["old_catalog"]).exists()
    store = RunStore(root)
    run = store.get_run(done.run_id)
    assert run["status"] == "finished" and run["config"] == before["run"]["config"]
    assert run["summary"]["best_acc"] == before["run"]["summary"]["best_acc"]
    assert store.get_metrics(done.run_id) == before["metrics"]  # restored from the last checkpoint
    assert [p["probe_id"] for p in store.list_probes()] == [p["probe_id"] for p in before["probes"]]
    probe_id = before["probes"][0]["probe_id"]
    assert store.get_probe(probe_id)["summary"] == before["probes"][0]["summary"]
    assert store.load_probe_arrays(probe_id)["kernel"].shape == (8, 8)


def test_a_wrongly_typed_model_argument_is_named(tmp_path, capsys):
    code, out, err = cli(capsys, "train", "--model", "cifar_resnet", "--model-arg", "width=abc", "--epochs", "1",
                         "--runs", tmp_path, "--quiet")
    assert_one_line_exit_2(code, out, err, "width must be an integer like its default 16, got 'abc'")


def test_warnings_do_not_break_the_one_line_error(tmp_path, capsys):
    # a zero-channel model: torch warns while building it, then its forward fails
    code, out, err = cli(capsys, "train", "--model", "tiny_add", "--model-arg", "in_chans=0", "--epochs", "1",
                         "--runs", tmp_path, "--quiet")
    assert_one_line_exit_2(code, out, err, "failed on a batch of shape (2, 1, 8, 8)")


def test_a_stored_config_cannot_ask_for_a_giant_model(tmp_path, capsys, shared_run):
    root = tmp_path / "runs"
    res = train(TrainConfig(model="cifar_resnet", model_kwargs={"width": 2, "depth": 8}, epochs=1, limit_train=32,
                            limit_test=16), RunStore(root))
    _set_config(root, res.run_id, model_kwargs={"width": 10 ** 6, "depth": 8})
    code, out, err = cli(capsys, "ntk", "--run", res.run_id, "--n", "8", "--runs", root, "--quiet")
    assert_one_line_exit_2(code, out, err, "refused")
