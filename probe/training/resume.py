"""Continuing a stored run from its last checkpoint (optionally for more epochs, on another
device or with its data files elsewhere)."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from probe.errors import UserError
from probe.probes.registry import Progress
from probe.training.build import model_name_for_run
from probe.training.config import MAX_EPOCHS, TrainConfig, check_device, parse_schedule, resolve_device
from probe.training.loop import TrainResult, train

__all__ = ["resume"]


def resume(run_ref: str, store=None, *, epochs: int | None = None, factory: str | None = None,
           trust_factory: bool = False, device: str | None = None, data_root: str | None = None,
           on_epoch: Callable[[dict], None] | None = None, progress: Progress | None = None) -> TrainResult:
    """Continue a run from its last checkpoint (from the start when it has none), optionally
    extending it to ``epochs``, on another ``device`` or reading its data from another
    ``data_root``; everything else comes from the stored config. A run built by a user factory
    needs ``factory`` or ``trust_factory`` (see :func:`~probe.training.build.model_name_for_run`)."""
    from probe.runtime.dist import DistError, current, joins, setup

    ddp = setup(resolve_device(device or "auto")) if joins() else current()
    if not ddp.main:  # rank 0 reads the run and tells the others what to train
        what = ddp.broadcast(None)
        if what[0] == "error":
            raise DistError(f"rank {ddp.rank}: rank 0 could not resume run {run_ref} (rank 0 says why)")
        if what[0] == "done":
            return what[1]
        _, config, run_id, name = what
        return train(config, None, run_id=run_id, model_name=name, on_epoch=on_epoch, progress=progress)
    try:
        what = _resume_plan(run_ref, store, epochs, factory, trust_factory, device, data_root)
    except BaseException:
        ddp.broadcast(("error", None))   # the other ranks stop too (rank 0 reports why)
        raise
    ddp.broadcast(what)
    if what[0] == "done":
        return what[1]
    _, config, run_id, name = what
    return train(config, _store_or_default(store), run_id=run_id, model_name=name, on_epoch=on_epoch, progress=progress)


def _store_or_default(store):
    from probe.store import RunStore

    return store if store is not None else RunStore()


def _resume_plan(run_ref: str, store, epochs, factory, trust_factory, device, data_root) -> tuple:
    """``("done", TrainResult)`` for a finished run that needs no more epochs, else ``("train",
    config, run id, model name)``."""
    store = _store_or_default(store)
    run = store.get_run(run_ref)
    name = model_name_for_run(run, factory, trust_factory)
    config = TrainConfig.from_dict(run["config"]).validate()
    if device is not None:
        config = replace(config, device=check_device(device))
    if data_root is not None:
        config = replace(config, data_root=str(data_root))
    done = (run["summary"] or {}).get("epochs_done") or 0
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or not done <= epochs <= MAX_EPOCHS:
            raise UserError(f"epochs {epochs!r}: run {run['run_id']} has {done} epochs done; a resume can "
                            f"keep or extend that, up to {MAX_EPOCHS}")
        if epochs != config.epochs and parse_schedule(config.schedule)[0] == "cosine":
            raise UserError(f"run {run['run_id']} uses a cosine schedule over {config.epochs} epochs; changing "
                            "the number of epochs would change the learning rate of the epochs already trained")
        config = replace(config, epochs=epochs)
    if run["status"] == "finished" and config.epochs <= done:
        metrics = store.get_metrics(run["run_id"])
        s = run["summary"] or {}
        return ("done", TrainResult(run["run_id"], "finished", s.get("epochs_done", len(metrics)), s.get("best_acc"),
                                    s.get("best_epoch"), s.get("final_acc"), s.get("train_time_s", 0.0), metrics,
                                    str(store.root)))
    return ("train", config, run["run_id"], name)
