"""`--weights FILE` on the probe commands and `probe.load_weights`: a trained model's own weights,
read weights-only, checked against the model, recorded by name and sha256."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from probe.errors import UserError
from probe.store import RunStore
from probe.training import TrainConfig, build_model, load_weights, train
from tests.probes.test_registry import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch tiny_add run on digits and its last checkpoint's state_dict saved alone."""
    root = tmp_path_factory.mktemp("runs")
    store = RunStore(root)
    res = train(TrainConfig(model="tiny_add", epochs=2, limit_train=64, limit_test=32, schedule="constant"), store)
    ckpt = store.load_checkpoint(res.run_id, 2)
    weights = root / "mine.pt"
    torch.save(ckpt["model"], weights)
    return root, res.run_id, weights, ckpt["model"]


def _tiny():
    torch.manual_seed(3)
    return build_model("tiny_add", num_classes=10, in_chans=1, image_size=8)


def test_probing_own_weights_equals_probing_the_run(trained, capsys):
    root, run_id, weights, _ = trained
    common = ["--n", "32", "--k", "3", "--no-density", "--trace-matvecs", "8", "--json", "--runs", str(root)]
    code, out, err = cli(capsys, "hessian", "--run", run_id, *common)
    assert code == 0, err
    by_run = json.loads(out)["results"][0]
    code, out, err = cli(capsys, "hessian", "--model", "tiny_add", "--weights", str(weights), *common)
    assert code == 0, err
    mine = json.loads(out)["results"][0]
    # the same weights on the same inputs: the same curvature (same code path, so equal to rounding)
    assert mine["top_eigenvalues"] == pytest.approx(by_run["top_eigenvalues"], rel=1e-6, abs=1e-9)
    assert mine["trace"]["estimate"] == pytest.approx(by_run["trace"]["estimate"], rel=1e-6)
    assert mine["weights"]["file"] == "mine.pt"
    import hashlib
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert mine["weights"]["sha256"] == sha
    row = RunStore(root, readonly=True).get_probe(mine["probe_id"])
    assert row["params"]["weights"] == {"file": "mine.pt", "sha256": sha, "key": None}


def test_checkpoint_dict_default_key_and_named_key(trained, tmp_path):
    _, _, _, sd = trained
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "model_state_dict": sd, "optimizer": {"lr": 0.1}}, path)
    m = _tiny()
    info = load_weights(m, path)
    assert info["key"] == "model_state_dict" and info["file"] == "ckpt.pt" and len(info["sha256"]) == 64
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.save({"ema": sd, "other": sd}, path)
    assert load_weights(_tiny(), path, key="ema")["key"] == "ema"
    with pytest.raises(UserError, match="no entry 'nope'"):
        load_weights(_tiny(), path, key="nope")
    with pytest.raises(UserError, match="weights key"):       # neither a state dict nor a known entry
        load_weights(_tiny(), path)
    # a DistributedDataParallel state dict (every name under module.)
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    m = _tiny()
    load_weights(m, path)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_mismatched_weights_are_named_in_one_line_and_the_model_is_kept(trained, tmp_path):
    _, _, _, sd = trained
    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = dict(sd)
    first = next(iter(bad))
    del bad[first]
    bad["extra.weight"] = torch.zeros(2)
    shaped = next(k for k, v in sd.items() if v.ndim >= 2 and k != first)
    bad[shaped] = torch.zeros(3, 3)
    path = tmp_path / "bad.pt"
    torch.save(bad, path)
    with pytest.raises(UserError) as e:
        load_weights(m, path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"missing {first}" in msg and "unexpected extra.weight" in msg and f"mis-shaped {shaped} (3, 3)" in msg
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


class _Writes:
    """A pickle whose loading would write a file (and so run code)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "ran"))


def test_a_pickle_that_is_not_weights_only_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Writes(marker)}, path)
    with pytest.raises(UserError, match="not a weights-only torch.save file"):
        load_weights(_tiny(), path)
    assert not marker.exists()
    path2 = tmp_path / "evil.pkl"
    path2.write_bytes(pickle.dumps(_Writes(marker)))
    code, out, err = cli(capsys, "hessian", "--model", "tiny_add", "--weights", str(path2), "--n", "8",
                         "--runs", str(tmp_path / "runs"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a weights-only torch.save file" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("argv,needle", [
    (["--weights", "{tmp}/none.pt"], "cannot read"),
    (["--weights", "{tmp}/garbage.pt"], "not a weights-only torch.save file"),
    (["--weights", "{tmp}/empty.pt"], "not a torch.save file"),
    (["--weights", "{tmp}/w.safetensors"], "safetensors"),
    (["--weights-key", "model"], "give --weights FILE too"),
])
def test_bad_weight_files_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "garbage.pt").write_bytes(b"not a zip, not a pickle")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = cli(capsys, "ntk", "--model", "tiny_add", "--n", "4", *argv, "--runs", str(tmp_path / "r"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_weights_with_a_run_is_refused(trained, capsys):
    root, run_id, weights, _ = trained
    code, out, err = cli(capsys, "ntk", "--run", run_id, "--weights", str(weights), "--runs", str(root))
    assert code == 2 and "--weights applies to --model" in err


def test_safetensors_file_loads_when_the_package_is_installed(trained, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    _, _, _, sd = trained
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    m = _tiny()
    load_weights(m, path)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_train_starts_from_own_weights_and_records_them(trained, tmp_path, capsys):
    import hashlib

    from probe.training import load_run_model

    _, _, weights, sd = trained
    code, out, err = cli(capsys, "train", "--model", "tiny_add", "--weights", str(weights), "--epochs", "1",
                         "--limit-train", "64", "--limit-test", "32", "--lr", "1e-9", "--schedule", "constant",
                         "--runs", str(tmp_path), "--json", "--quiet")
    assert code == 0, err
    rid = json.loads(out)["run_id"]
    store = RunStore(tmp_path, readonly=True)
    recorded = store.get_run(rid)["config"]["resolved"]["weights"]
    assert recorded == {"file": "mine.pt", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "key": None}
    init, _, _ = load_run_model(store, rid, "init")              # the run's initialisation is the file
    assert all(torch.equal(v, sd[k]) for k, v in init.state_dict().items())
    after = store.load_checkpoint(rid, 1)["model"]               # one epoch at lr 1e-9 moves nothing visibly
    for name, _ in init.named_parameters():
        torch.testing.assert_close(after[name], sd[name], rtol=0, atol=1e-6)
    code, out, err = cli(capsys, "train", "--resume", rid, "--weights", str(weights), "--runs", str(tmp_path))
    assert code == 2 and "--weights cannot change on resume" in err and len(err.strip().splitlines()) == 1
