"""``train_many`` with several jobs: the same runs and numbers as one job at the same thread count,
a killed or interrupted sweep continued (nothing trained twice), a diverged run returned as a
result, a run that cannot be trained reported by its config while the others finish."""
from __future__ import annotations

import fcntl
import os
import textwrap
import threading
import time
from dataclasses import replace

import pytest

from experiments.__main__ import build_parser
from experiments._common import Context, train_many
from experiments._fusion import Protocol, fusion_config
from probe.errors import UserError
from probe.store import RunStore
from probe.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny runs: one thread beats two on a busy machine

TINY = Protocol("tiny", 64, 1, 32, "64 samples, 1 epoch")


def tiny(row: str, seed: int = 0, epochs: int = 1) -> TrainConfig:
    """A seed row on the tiny protocol, at WRN-10-1."""
    return replace(fusion_config(row, replace(TINY, epochs=epochs), seed), model_kwargs={"depth": 10, "widen": 1})


def numbers(store: RunStore, run_id: str) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in store.get_metrics(run_id)]


def test_two_jobs_give_the_runs_and_numbers_of_one(tmp_path):
    configs = [tiny("fmm01"), tiny("fmm18"), tiny("fmm01")]   # a recipe twice: trained once
    got = {}
    for jobs in (1, 2):
        store = RunStore(tmp_path / f"jobs{jobs}")
        seen = []
        ctx = Context(store=store, out=tmp_path, jobs=jobs, threads_per_job=1,
                      progress=lambda desc, done, total: seen.append((desc, done, total)))
        ids = train_many(ctx, configs, desc="sweep")
        assert ids[0] == ids[2] != ids[1] and len(store.list_runs()) == 2
        assert seen[-1] == ("sweep", 3, 3)
        runs = [store.get_run(i) for i in ids]
        assert [r["status"] for r in runs] == ["finished"] * 3
        assert [r["config"]["fusion"] for r in runs] == ["fmm01", "fmm18", "fmm01"]
        assert {r["config"]["resolved"]["num_threads"] for r in runs} == {1}
        got[jobs] = [numbers(store, i) for i in ids]
    assert got[2] == got[1]   # exactly: same recipe, same thread count, deterministic CPU kernels


@pytest.mark.parametrize("left, jobs", [("interrupted", 1), ("running", 2)])
def test_a_stopped_sweep_is_continued_not_retrained(tmp_path, left, jobs):
    store = RunStore(tmp_path / "runs")
    done, cut, new = tiny("fmm01", epochs=2), tiny("fmm18", epochs=2), tiny("fmm01", seed=1, epochs=2)
    done_id = train(done, store).run_id

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cut, store, on_epoch=stop)
    cut_id = store.list_runs()[0]["run_id"]
    assert store.get_run(cut_id)["status"] == "interrupted" and store.latest_checkpoint(cut_id) == 1
    if left == "running":   # a killed process leaves its run "running"
        store.update_run(cut_id, status="running")
    before = {i: store.get_metrics(i) for i in (done_id, cut_id)}
    lines = []
    ids = train_many(Context(store=store, out=tmp_path, jobs=jobs, log=lines.append), [done, cut, new])
    assert ids[:2] == [done_id, cut_id] and ids[2] not in (done_id, cut_id)
    assert len(store.list_runs()) == 3
    assert f"resuming run {cut_id} (wrn fmm18 seed 0, 2 epochs on digits)" in lines
    assert store.get_metrics(done_id) == before[done_id]              # not trained again
    after = store.get_metrics(cut_id)
    assert [m["epoch"] for m in after] == [1, 2] and after[0] == before[cut_id][0]   # epoch 1 untouched
    assert {store.get_run(i)["status"] for i in ids} == {"finished"}


NAN_MODEL = textwrap.dedent("""
    import torch
    from torch import nn

    class Blowup(nn.Module):
        def __init__(self, num_classes=10, in_chans=1):
            super().__init__()
            self.fc = nn.Linear(in_chans * 64, num_classes)

        def forward(self, x):
            out = self.fc(x.flatten(1))
            return out * float("nan") if self.training else out

    def factory(num_classes=10, in_chans=1):
        return Blowup(num_classes, in_chans)
""")


def test_diverged_run_is_a_result_and_a_failure_names_its_config(tmp_path, monkeypatch):
    (tmp_path / "jobs_nanmod.py").write_text(NAN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))   # the spawned workers get this path too
    store = RunStore(tmp_path / "runs")
    good, blowup = tiny("fmm01"), TrainConfig(model="jobs_nanmod:factory", epochs=1, limit_train=64, batch_size=32)
    broken = replace(tiny("fmm18", seed=3), data="no-such-data")
    lines = []
    ctx = Context(store=store, out=tmp_path, jobs=2, threads_per_job=1, log=lines.append)
    with pytest.raises(UserError) as err:
        train_many(ctx, [good, blowup, broken])
    assert ("1 of 3 run(s) to train failed: wrn fmm18 seed 3, 1 epoch on no-such-data: unknown data set"
            in str(err.value))
    assert any(line.startswith("could not train wrn fmm18 seed 3") for line in lines)
    by_model = {r["model"]: r for r in store.list_runs()}
    assert by_model["wrn"]["status"] == "finished" and len(by_model) == 2
    assert by_model["jobs_nanmod:factory"]["status"] == "failed"
    assert "nan" in by_model["jobs_nanmod:factory"]["error"]
    lines.clear()
    ids = train_many(replace(ctx, jobs=1), [good, blowup])     # nothing left to train
    assert ids == [by_model["wrn"]["run_id"], by_model["jobs_nanmod:factory"]["run_id"]]
    assert len(store.list_runs()) == 2 and any("diverged: not trained again" in line for line in lines)


def test_settings_are_checked(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    for bad in (dict(jobs=0), dict(jobs=True), dict(threads_per_job=0)):
        with pytest.raises(UserError, match="must be an integer"):
            train_many(Context(store=store, out=tmp_path, **bad), [tiny("fmm01")])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="under torchrun"):
        train_many(Context(store=store, out=tmp_path, jobs=2), [tiny("fmm01")])
    args = build_parser().parse_args(["--jobs", "2", "--threads-per-job", "1"])
    assert (args.jobs, args.threads_per_job) == (2, 1)
    assert build_parser().parse_args([]).jobs == 1 and not hasattr(build_parser().parse_args([]), "threads_per_job")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--jobs", "0"])


def test_a_second_sweep_waits_for_the_first(tmp_path):
    store = RunStore(tmp_path)
    fd = os.open(tmp_path / ".sweep.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)   # a sweep in progress
    lines, result = [], []
    waiting = threading.Thread(target=lambda: result.append(
        train_many(Context(store=store, out=tmp_path, log=lines.append), [])))
    waiting.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines == [f"another sweep is training into {store.root}; waiting for it to finish"] and not result
    os.close(fd)
    waiting.join(30)
    assert result == [[]]
