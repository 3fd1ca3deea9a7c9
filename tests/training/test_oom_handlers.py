"""A CUDA out-of-memory error (a RuntimeError) inside checkpoint loading, the model check and the
process group is reported as probe.OutOfMemory, not as a checkpoint that does not fit, a broken model
or a peer that stopped."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probe.runtime.dist as dist_mod
from probe.errors import OutOfMemory, StoreError, UserError
from probe.store import RunStore
from probe.training import TrainConfig, load_run_model, train
from probe.training.build import check_model
from probe.training.state import restore

SMALL = dict(epochs=1, limit_train=96, limit_test=32, batch_size=32, schedule="constant", lr=0.05)

OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB\nmore lines"


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError(OOM_TEXT)


def _parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator(), np.random.default_rng(2)


def _checkpoint() -> dict:
    from probe.training.state import rng_state

    model, opt, gen, mix = _parts()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1,
            "rng": rng_state(gen, mix, torch.device("cpu"))}


def test_restore_reports_oom_not_a_bad_checkpoint(monkeypatch):
    ckpt = _checkpoint()
    model, opt, gen, mix = _parts()
    monkeypatch.setattr(model, "load_state_dict", _oom)
    with pytest.raises(OutOfMemory, match="out of memory in loading the weights of ckpt .*CUDA out of memory"):
        restore(ckpt, "ckpt", model, opt, gen, mix, torch.device("cpu"))
    model, opt, gen, mix = _parts()
    monkeypatch.setattr(opt, "load_state_dict", _oom)
    with pytest.raises(OutOfMemory, match="loading the optimizer state of ckpt"):
        restore(ckpt, "ckpt", model, opt, gen, mix, torch.device("cpu"))
    model, opt, gen, mix = _parts()                  # other RuntimeErrors still mean a checkpoint that does not fit
    monkeypatch.setattr(model, "load_state_dict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("size")))
    with pytest.raises(StoreError, match="does not fit its model"):
        restore(ckpt, "ckpt", model, opt, gen, mix, torch.device("cpu"))


def test_load_run_model_reports_oom(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    res = train(TrainConfig(model="tiny_add", **SMALL), store)
    monkeypatch.setattr(nn.Module, "load_state_dict", _oom)
    with pytest.raises(OutOfMemory, match=f"loading the weights of checkpoint epoch 1 of run {res.run_id}"):
        load_run_model(store, res.run_id, "last")
    monkeypatch.setattr(nn.Module, "load_state_dict", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("size")))
    with pytest.raises(UserError, match="does not fit model"):
        load_run_model(store, res.run_id, "last")


class _Hungry(nn.Module):
    def __init__(self, error):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.error = error

    def forward(self, x):
        raise self.error


def test_check_model_reports_oom_not_a_broken_model():
    with pytest.raises(OutOfMemory, match=r"the check of model 'm' on a batch of shape \(2, 4\)"):
        check_model(_Hungry(torch.OutOfMemoryError(OOM_TEXT)), torch.zeros(2, 4), 3, "m")
    with pytest.raises(UserError, match="model 'm' failed on a batch"):
        check_model(_Hungry(RuntimeError("shapes")), torch.zeros(2, 4), 3, "m")


def test_process_group_oom_is_not_a_peer_that_stopped(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", _oom)
    with pytest.raises(OutOfMemory, match=r"joining the process group \(gloo\)"):
        dist_mod.setup("cpu")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("refused")))
    with pytest.raises(dist_mod.DistError, match="could not join the process group"):
        dist_mod.setup("cpu")
    d = dist_mod.Dist(rank=1, world=2, backend="gloo")
    with pytest.raises(OutOfMemory, match="the all-reduce on rank 1 of 2"):
        d._call("all-reduce", _oom)
    with pytest.raises(dist_mod.DistError, match="a peer rank stopped"):
        d._call("all-reduce", lambda: (_ for _ in ()).throw(RuntimeError("closed")))
