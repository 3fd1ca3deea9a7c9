"""How a run computes and what its checkpoints hold beyond the weights: the AMP dtype and the loss
scaler's state (an exact float16 resume), every rank's generator states, deterministic
algorithms for the run's duration, and the environment recorded with the run (a resume elsewhere
warns)."""
from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
import pytest
import torch

from probe.errors import StoreError, UserError
from probe.store import RunStore
from probe.training import TrainConfig, resume, train
from probe.training.numerics import choose_amp_dtype, deterministic, environment, environment_changes
from probe.training.state import own_rank_state, per_rank_states, rank_rng_state, restore

SMALL = dict(epochs=2, limit_train=96, limit_test=32, batch_size=32, schedule="constant", lr=0.05)


def _weights_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the AMP dtype ------------------------------------------------------------------------------


@pytest.mark.parametrize("native,want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_amp_dtype_is_bfloat16_where_the_gpu_computes_it(monkeypatch, native, want):
    asked = []

    def supported(including_emulation=True):
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert choose_amp_dtype("auto", torch.device("cuda", 0)) == want
    assert asked == [False]                                  # emulated bfloat16 is not "supported"
    assert choose_amp_dtype("auto", torch.device("cpu")) == torch.bfloat16     # the CPU as before
    assert choose_amp_dtype("float16", torch.device("cuda")) == torch.float16  # forced: no question asked
    assert choose_amp_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert len(asked) == 1


def test_amp_dtype_option_is_checked_and_is_a_flag(tmp_path, capsys):
    from probe.cli import build_parser, main
    from probe.cli.commands import train_config_from_args

    with pytest.raises(UserError, match="amp_dtype must be one of auto, bfloat16, float16"):
        TrainConfig(model="tiny_add", amp=True, amp_dtype="half").validate()
    with pytest.raises(UserError, match="add --amp"):
        TrainConfig(model="tiny_add", amp_dtype="float16").validate()
    args = build_parser().parse_args(["train", "--model", "tiny_add", "--amp", "--amp-dtype", "float16",
                                      "--deterministic"])
    c = train_config_from_args(args).validate()
    assert c.amp and c.amp_dtype == "float16" and c.deterministic
    assert TrainConfig(model="tiny_add").amp_dtype == "auto" and not TrainConfig(model="tiny_add").deterministic
    code = main(["train", "--model", "tiny_add", "--amp-dtype", "float16", "--runs", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "add --amp" in err and len(err.strip().splitlines()) == 1


def test_a_run_records_its_amp_dtype_and_environment(tmp_path):
    store = RunStore(tmp_path)
    amp = train(TrainConfig(model="tiny_add", amp=True, **{**SMALL, "epochs": 1}), store)
    plain = train(TrainConfig(model="tiny_add", **{**SMALL, "epochs": 1}), store)
    resolved = store.get_run(amp.run_id)["config"]["resolved"]
    assert resolved["amp_dtype"] == "bfloat16"                 # CPU autocast, no loss scaler
    assert resolved["environment"] == {"torch": torch.__version__, "cudnn": None, "gpu": None}
    assert "scaler" not in store.load_checkpoint(amp.run_id, 1)
    assert store.get_run(plain.run_id)["config"]["resolved"]["amp_dtype"] is None
    assert store.get_run(plain.run_id)["config"]["amp_dtype"] == "auto"


# --- the loss scaler in a checkpoint --------------------------------------------------------------


def _fast_growing_scaler(device, enabled):
    # the scale doubles after every finite step (and halves on an overflow, skipping it): a resume
    # that restarted the scaler at 65536 would step differently from the uninterrupted run
    return torch.amp.GradScaler(device.type, enabled=enabled, growth_interval=1)


def test_float16_amp_resume_is_exact_with_the_scaler_state(tmp_path, monkeypatch):
    import probe.training.loop as loop

    monkeypatch.setattr(loop, "make_scaler", _fast_growing_scaler)
    config = TrainConfig(model="tiny_wrn", model_kwargs={"dropout": 0.3}, amp=True, amp_dtype="float16",
                         mixup=0.2, seed=4, **{**SMALL, "epochs": 3})
    ref_store, store = RunStore(tmp_path / "ref"), RunStore(tmp_path / "cut")
    ref = train(config, ref_store)
    assert ref_store.get_run(ref.run_id)["config"]["resolved"]["amp_dtype"] == "float16"

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, store, on_epoch=stop)
    run_id = store.list_runs()[0]["run_id"]
    saved = store.load_checkpoint(run_id, 1)                    # loaded with weights_only=True
    assert set(saved["scaler"]) >= {"scale", "_growth_tracker"}
    assert saved["scaler"]["scale"] != 65536.0                  # the state moved: it matters
    assert saved["scaler"] == ref_store.load_checkpoint(ref.run_id, 1)["scaler"]
    done = resume(run_id, store)
    assert done.status == "finished"
    for a, b in zip(store.get_metrics(run_id), ref_store.get_metrics(ref.run_id), strict=True):
        assert {k: a[k] for k in ("train_loss", "test_loss", "test_top1")} == \
            {k: b[k] for k in ("train_loss", "test_loss", "test_top1")}
    last, want = store.load_checkpoint(run_id, 3), ref_store.load_checkpoint(ref.run_id, 3)
    assert _weights_equal(last["model"], want["model"]) and last["scaler"] == want["scaler"]


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, torch.Generator().manual_seed(1), np.random.Generator(np.random.PCG64(2))


def _checkpoint(scaler_state=None, rng_extra=None) -> dict:
    from probe.training.state import rng_state

    model, opt, gen, mix = _parts()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1,
            "rng": {**rng_state(gen, mix, torch.device("cpu")), **(rng_extra or {})}}
    if scaler_state is not None:
        ckpt["scaler"] = scaler_state
    buf = io.BytesIO()                                          # as the store writes and reads it
    torch.save(ckpt, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_restore_gives_the_scaler_its_state_back():
    scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for value in (1.0, float("inf"), 1.0, 1.0):                  # grow, back off (skipped step), grow
        opt.zero_grad()
        scaler.scale((w * value).sum()).backward()
        scaler.step(opt)
        scaler.update()
    state = scaler.state_dict()
    assert state["scale"] != 65536.0
    ckpt = _checkpoint(state)
    model, opt2, gen, mix = _parts()
    fresh = torch.amp.GradScaler("cpu", growth_interval=1)
    restore(ckpt, "ckpt", model, opt2, gen, mix, torch.device("cpu"), scaler=fresh)
    assert fresh.state_dict() == state
    # a checkpoint without a scaler state (bfloat16 or full precision) leaves a fresh scaler alone
    untouched = torch.amp.GradScaler("cpu")
    restore(_checkpoint(), "ckpt", model, opt2, gen, mix, torch.device("cpu"), scaler=untouched)
    assert untouched.state_dict()["scale"] == 65536.0
    # a disabled scaler (no float16) ignores a stored state
    off = torch.amp.GradScaler("cpu", enabled=False)
    restore(ckpt, "ckpt", model, opt2, gen, mix, torch.device("cpu"), scaler=off)
    assert off.state_dict() == {}
    with pytest.raises(StoreError, match="loss-scaler"):
        restore(_checkpoint({"scale": "big"}), "ckpt", model, opt2, gen, mix, torch.device("cpu"),
                scaler=torch.amp.GradScaler("cpu"))


# --- every rank's generator states ---------------------------------------------------------------


def test_every_rank_gets_its_own_cpu_and_cuda_generator_states_back():
    cpu = [torch.full((4,), r, dtype=torch.uint8) for r in range(3)]
    cuda = [torch.full((4,), 10 + r, dtype=torch.uint8) for r in range(3)]
    rng = per_rank_states([{"torch": c, "cuda": g} for c, g in zip(cpu, cuda)])
    assert rng["ranks"] == cpu and rng["cuda_ranks"] == cuda
    for r in range(3):
        own = own_rank_state(rng, r)
        assert own["torch"] is cpu[r] and own["cuda"] is cuda[r]
    cpu_only = per_rank_states([{"torch": c} for c in cpu])     # a gloo job on CPUs
    assert "cuda_ranks" not in cpu_only and own_rank_state(cpu_only, 2) == {"torch": cpu[2]}
    assert own_rank_state({"torch": cpu[0]}, 0) == {}          # a single process: nothing per rank
    with pytest.raises(IndexError):
        own_rank_state(rng, 3)
    here = rank_rng_state(torch.device("cpu"))
    assert set(here) == {"torch"} and torch.equal(here["torch"], torch.get_rng_state())


def test_restore_sets_this_ranks_own_cpu_generator():
    states = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    ckpt = _checkpoint(rng_extra=per_rank_states([{"torch": s} for s in states]))
    model, opt, gen, mix = _parts()
    restore(ckpt, "ckpt", model, opt, gen, mix, torch.device("cpu"), rank=1)
    assert torch.equal(torch.get_rng_state(), states[1])
    with pytest.raises(StoreError, match="RNG"):
        restore(ckpt, "ckpt", model, opt, gen, mix, torch.device("cpu"), rank=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restore_sets_this_ranks_own_cuda_generator():
    device = torch.device("cuda", torch.cuda.current_device())
    states = []
    for seed in (21, 22):
        torch.cuda.manual_seed(seed)
        states.append(rank_rng_state(device))
    assert all("cuda" in s for s in states) and not torch.equal(states[0]["cuda"], states[1]["cuda"])
    ckpt = _checkpoint(rng_extra=per_rank_states(states))
    model, opt, gen, mix = _parts()
    restore(ckpt, "ckpt", model, opt, gen, mix, device, rank=1)
    assert torch.equal(torch.cuda.get_rng_state(device), states[1]["cuda"])
    assert choose_amp_dtype("auto", device) == (torch.bfloat16 if torch.cuda.is_bf16_supported(
        including_emulation=False) else torch.float16)
    env = environment(device)
    assert env["gpu"] == torch.cuda.get_device_name(device) and env["cudnn"] == torch.backends.cudnn.version()


# --- deterministic algorithms ---------------------------------------------------------------------


def _flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_deterministic_sets_the_flags_for_the_block_and_restores_them(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _flags()
    with deterministic():
        assert _flags() == (True, False, True, False, ":4096:8")
    assert _flags() == before
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")       # a deterministic setting of the caller's
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.raises(ZeroDivisionError), deterministic():
            assert _flags() == (True, False, True, False, ":16:8")
            1 / 0
        assert _flags() == (True, True, False, True, ":16:8")
    finally:
        torch.use_deterministic_algorithms(False)
    with deterministic(False):
        assert _flags()[:4] == (False, False, False, True)


def test_a_deterministic_run_sets_the_flags_while_it_trains_only(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before, during = _flags(), []
    res = train(TrainConfig(model="tiny_add", deterministic=True, **SMALL), RunStore(tmp_path),
                on_epoch=lambda row: during.append(_flags()))
    assert res.status == "finished" and during == [(True, False, True, False, ":4096:8")] * 2
    assert _flags() == before
    assert RunStore(tmp_path).get_run(res.run_id)["config"]["deterministic"] is True


# --- the environment a run was trained on ----------------------------------------------------------


def test_environment_changes_name_what_differs():
    was = {"torch": "2.12.0", "cudnn": 90100, "gpu": "NVIDIA H100 80GB HBM3"}
    now = {"torch": "2.13.0", "cudnn": 90100, "gpu": "NVIDIA H200"}
    assert environment_changes(was, now) == ["torch 2.12.0 -> 2.13.0", "gpu NVIDIA H100 80GB HBM3 -> NVIDIA H200"]
    assert environment_changes(was, was) == [] and environment_changes(None, now) == []
    assert environment_changes({"torch": "2.13.0"}, now) == []   # an older run recorded torch alone


def test_a_resume_on_another_torch_warns_naming_it(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    config = TrainConfig(model="tiny_add", **SMALL)

    def stop(row):
        raise KeyboardInterrupt

    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train(config, store, on_epoch=stop)
    same, other = (r["run_id"] for r in store.list_runs())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resume(same, store)
    assert not [w for w in caught if "resumes on" in str(w.message)]
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with pytest.warns(RuntimeWarning, match=rf"run {other} was trained with .*torch "
                                            rf"{re.escape(torch.version.__version__)} -> 9\.9\.9"):
        done = resume(other, store)
    assert done.status == "finished"
    # the record stays the original run's
    assert store.get_run(other)["config"]["resolved"]["environment"]["torch"] == torch.version.__version__


def test_an_operation_without_a_deterministic_algorithm_stops_the_run_in_one_line(tmp_path, monkeypatch):
    import probe.training.loop as loop

    def refuse(*args, **kwargs):
        raise RuntimeError("scatter_add_cuda_kernel does not have a deterministic implementation, but you set "
                           "'torch.use_deterministic_algorithms(True)'.\nmore")

    monkeypatch.setattr(loop, "_train", refuse)
    with pytest.raises(UserError, match=r"^--deterministic: scatter_add_cuda_kernel does not have"):
        train(TrainConfig(model="tiny_add", deterministic=True, **SMALL), RunStore(tmp_path))
    with pytest.raises(RuntimeError, match="scatter_add"):
        train(TrainConfig(model="tiny_add", **SMALL), RunStore(tmp_path))
