"""The one target runner every probe goes through.

:func:`run_probe` resolves the targets (a model by name, a run at a checkpoint, or every checkpoint
of a run), loads the probe data once per sweep (the run's own data settings), estimates BatchNorm
statistics on it for a model at initialisation, calls the probe's ``compute`` and stores each result
as one catalog row of the probe's kind. Over several targets a target that fails with a
:class:`UserError` becomes an :class:`Outcome` with an ``error`` and the sweep goes on; when every
target fails, the first error is raised.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from probe.checks import check_int
from probe.errors import UserError, first_line
from probe.functional import calibrate_batchnorm
from probe.jobs.targets import MAX_PROBE_INPUTS, iter_targets, probe_inputs
from probe.probes.registry import Probe, ProbeContext, get_probe, make_params, params_dict
from probe.runtime.dist import current, local
from probe.runtime.partial import PartialResults, model_fingerprint, partial_key
from probe.runtime.progress import Progress

__all__ = ["Outcome", "run_probe", "load_result", "figure_entries"]


@dataclass
class Outcome:
    """One target of a probe command: ``info`` (model, run_id, epoch, data, n and, once stored,
    probe_id) and either ``result`` (the probe's result object) or ``error`` (one line)."""

    info: dict
    result: Any = None
    error: str | None = None
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON entry of this target: its info, then the result's summary (or the error)."""
        out = dict(self.info)
        if self.result is not None:
            out.update(self.result.summary())
            if "probe_id" in self.info:
                out["probe_id"] = self.info["probe_id"]
        if self.error is not None:
            out["error"] = self.error
        return out


def run_probe(store, probe: str | Probe, params: Any = None, *, model: str | None = None,
              run: str | None = None, checkpoint=None, data: str | None = None,
              data_root: str | None = None, image_size: int | None = None, n: int | None = None,
              seed: int = 0, device: str = "auto", model_args: dict | None = None,
              factory: str | None = None, trust_factory: bool = False, weights: str | None = None,
              weights_key: str | None = None, save: bool = True,
              progress: Progress | None = None) -> list[Outcome]:
    """Run a registered probe on its targets and store one catalog row per target.

    ``probe``: a registered name or :class:`Probe`; ``params``: its parameters object, a dict of
    options, or ``None`` for the defaults. Targets: ``model`` (a registered name or
    ``package.module:factory``, at its seeded initialisation, on ``data`` / ``data_root`` /
    ``image_size``, default digits; with ``weights``, a file of its trained weights, entry
    ``weights_key``: :func:`probe.training.load_weights`, recorded by name and sha256 in the stored
    row) or ``run`` at ``checkpoint`` (an epoch, ``last`` (default),
    ``init`` or ``all``, on the data the run was trained on; a run built by a user factory needs
    ``factory`` or ``trust_factory``). ``n`` probe inputs (default: the probe's), drawn class-balanced
    and deterministically from the probe's split; ``seed`` seeds the model init (by name) and the
    probe. Returns one :class:`Outcome` per target, in order."""
    from probe.training import MAX_SEED, resolve_device

    spec = probe if isinstance(probe, Probe) else get_probe(probe)
    if params is None or isinstance(params, dict):
        params = make_params(spec.params, dict(params or {}))
    elif not isinstance(params, spec.params):
        raise UserError(f"probe {spec.name!r} takes {spec.params.__name__}, got {type(params).__name__}")
    n = spec.default_n if n is None else n
    check_int("n", n, 2, MAX_PROBE_INPUTS)
    check_int("seed", seed, 0, MAX_SEED)
    dev = resolve_device(device)
    ddp = current()
    # under torchrun rank 0 alone writes; a sweep over checkpoints is shared out by target (each
    # rank probes its targets alone), a single target by the probe's own chunks
    by_target = ddp.active and run is not None and checkpoint == "all"
    writes = save and ddp.main
    stored_params = {**params_dict(params), "n": n, "seed": seed}
    outcomes: list[Outcome] = []
    errors: list[UserError] = []
    inputs = None  # loaded once per sweep: every target of one command reads the same data
    for index, target in enumerate(iter_targets(store, model=model, run=run, checkpoint=checkpoint, data=data,
                                                seed=seed, model_args=model_args, data_root=data_root,
                                                image_size=image_size, factory=factory,
                                                trust_factory=trust_factory, weights=weights,
                                                weights_key=weights_key)):
        if by_target and index % ddp.world != ddp.rank:
            continue
        info = {"model": target.model_name, "run_id": target.run_id, "epoch": target.epoch,
                "data": target.data, "n": n, "index": index}
        spec_data = target.data_spec
        params_row = {**stored_params, "data": target.data,
                      "data_root": spec_data.root if spec_data else None,
                      "image_size": spec_data.image_size if spec_data else None}
        if target.weights is not None:  # which file: two weight files of one model are told apart
            info["weights"] = params_row["weights"] = {k: target.weights[k] for k in ("file", "sha256", "key")}
        try:
            if inputs is None:
                inputs = probe_inputs(spec_data or target.data, n, split=spec.split, seed=seed)
            x, y, num_classes = inputs
            trained = target.epoch or target.weights is not None   # BN statistics of its own
            model_ = target.model if trained else calibrate_batchnorm(target.model, x)
            partial = None
            if writes and not by_target:
                job = {"probe": spec.name, "model": target.model_name, "run": target.run_id,
                       "epoch": target.epoch, "params": params_row, "device": str(dev)}
                partial = PartialResults(store, lambda job=job, m=model_: partial_key(
                    {**job, "state": model_fingerprint(m)}))
            ctx = ProbeContext(model=model_, x=x, y=y, num_classes=num_classes, device=dev, seed=seed,
                               model_name=target.model_name, data=target.data, run_id=target.run_id,
                               epoch=target.epoch,
                               lr=target.lr, progress=progress, rebuild=target.rebuild, partial=partial,
                               store=store)
            with local() if by_target else contextlib.nullcontext():
                result = spec.compute(ctx, params)
        except UserError as e:
            errors.append(e)
            outcomes.append(Outcome(info, error=first_line(e), params=params_row))
            continue
        outcomes.append(Outcome(info, result=result, params=params_row))
        if partial is not None:
            _store_outcome(store, spec, outcomes[-1], target.model_name)
            partial.clear()                       # the result is in the catalog: pieces not needed
    if by_target:  # every rank's targets, in target order, on every rank; rank 0 stores them
        outcomes = sorted((o for part in ddp.all_gather(outcomes) for o in part), key=lambda o: o.info["index"])
        errors = [UserError(o.error) for o in outcomes if o.error is not None]
        if writes:
            for o in outcomes:
                if o.result is not None:
                    _store_outcome(store, spec, o, o.info["model"])
    for o in outcomes:
        o.info.pop("index", None)
    if errors and len(errors) == len(outcomes):
        raise errors[0]
    return outcomes


def _store_outcome(store, spec: Probe, outcome: Outcome, model_name: str) -> None:
    """One catalog row (and its arrays) for a successful outcome; its id goes into ``info``."""
    info = outcome.info
    info["probe_id"] = store.add_probe(spec.name, model=model_name, run_id=info["run_id"],
                                       checkpoint_epoch=info["epoch"], params=outcome.params,
                                       summary=outcome.result.summary(), arrays=outcome.result.arrays())


def load_result(store, probe_id: str) -> tuple[dict, Any]:
    """A stored probe row and its result object, rebuilt by its probe's ``result.from_store``."""
    row = store.get_probe(probe_id)
    spec = get_probe(row["kind"])
    return row, spec.result.from_store(row["summary"], store.load_probe_arrays(probe_id))


def figure_entries(outcomes: Sequence[Outcome]) -> list[tuple[dict, Any]]:
    """The ``(info, result)`` pairs a probe's figure builder takes, from the successful outcomes."""
    return [(o.info, o.result) for o in outcomes if o.result is not None]
