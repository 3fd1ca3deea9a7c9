"""Directions of ``probe surface`` from what the run store holds: stored Hessian eigenvectors, a
run's checkpoint trajectory, another checkpoint or another run. Each function takes the runner's
:class:`probe.probes.registry.ProbeContext` and returns a :class:`Directions`."""
from __future__ import annotations

import numpy as np
import torch

from probe.errors import UserError
from probe.runtime.memory import memory_budget
from probe.probes.surface._directions import (Directions, excluded_names, flat_from_state, flat_params,
                                              pca_directions, random_directions, towards_direction, trainable)

__all__ = ["directions_for", "stored_hessian_vectors"]


def _need_store(ctx, what: str):
    if ctx.store is None:
        raise UserError(f"{what} directions read the run store; run the probe through the runner (a runs folder)")
    return ctx.store


def stored_hessian_vectors(ctx, n_params: int, k: int):
    """(eigenvectors (P, k') float32, eigenvalues, probe id) of the newest ``probe hessian`` row of
    this target -- same model, run, checkpoint epoch and parameter count (and for a model given by
    name, the same seed and data: the same initial weights) -- with at least ``k`` vectors; None
    when there is none."""
    from probe.probes.registry import get_probe

    store = ctx.store
    if store is None:
        return None
    rows = store.list_probes(run_id=ctx.run_id, kind="hessian", model=ctx.model_name) if ctx.run_id else \
        store.list_probes(kind="hessian", model=ctx.model_name)
    for row in reversed(rows):
        params, summary = row.get("params") or {}, row.get("summary") or {}
        if row.get("status") != "finished" or row.get("run_id") != ctx.run_id \
                or row.get("checkpoint_epoch") != ctx.epoch or summary.get("n_params") != n_params \
                or params.get("which", "largest") == "smallest":
            continue
        if ctx.run_id is None and (params.get("seed") != ctx.seed or params.get("data") != ctx.data):
            continue
        try:
            result = get_probe(row["kind"]).result.from_store(row["summary"], store.load_probe_arrays(row["probe_id"]))
        except UserError:                       # a damaged artifact: look further back
            continue
        V = result.eigenvectors
        if V is None or V.ndim != 2 or V.shape[0] != n_params or V.shape[1] < k:
            continue
        return np.asarray(V), np.asarray(result.eigenvalues), row["probe_id"]
    return None


def _hessian(ctx, p, n_params: int) -> Directions:
    found = stored_hessian_vectors(ctx, n_params, p.dims)
    if found is not None:
        V, ev, pid = found
        note = f"hessian directions: the top-{p.dims} eigenvectors stored by probe hessian row {pid}"
        info = {"source": "stored", "probe_id": pid}
    else:
        from probe.probes.hessian import hessian_spectrum

        res = hessian_spectrum(ctx.model, ctx.x, ctx.y, k=2, trace=None, density=False, n_samples=None,
                               dtype=p.dtype, device=ctx.device, seed=ctx.seed, progress=ctx.progress)
        V, ev = res.eigenvectors, res.eigenvalues
        note = (f"hessian directions: no stored probe hessian row for this target, so the top-2 eigenvectors "
                f"were computed here on the same {int(ctx.x.shape[0])} samples ({res.n_hvps} Hessian-vector "
                f"products{'' if res.converged else ', not converged'})")
        info = {"source": "computed", "converged": bool(res.converged)}
    info["eigenvalues"] = [float(v) for v in ev[:p.dims]]
    vecs = tuple(torch.as_tensor(np.asarray(V[:, i], dtype=np.float64)) for i in range(p.dims))
    return Directions("hessian", vecs, info, (note, "hessian directions are unit eigenvectors (norm and include_bn "
                                                    "do not apply): coordinates are distances in weight space"))


def _trajectory(ctx, p, theta0: torch.Tensor) -> Directions:
    store = _need_store(ctx, "pca")
    if ctx.run_id is None:
        raise UserError("pca directions need a run's checkpoint trajectory; probe a run, not a model by name")
    cks = [c["epoch"] for c in store.list_checkpoints(ctx.run_id)]
    if len(cks) < 3:
        raise UserError(f"pca directions need at least 3 checkpoints; run {ctx.run_id} has {len(cks)}: train "
                        f"it for more epochs, or use random directions")
    notes = []
    P = theta0.numel()
    budget = memory_budget(p.memory_gb * 2 ** 30 or None, "cpu", name="memory budget")   # held on the host
    fit = max(3, int(budget / 2 // (8 * P)))                       # float64 vectors within half the budget
    if len(cks) > fit:
        keep = sorted(set(np.linspace(0, len(cks) - 1, fit).round().astype(int).tolist()))
        notes.append(f"pca: {len(keep)} of the run's {len(cks)} checkpoints (evenly spaced, first and last kept) "
                     f"fit the memory budget")
        cks = [cks[i] for i in keep]
    thetas = []
    for e in cks:
        state = store.load_checkpoint(ctx.run_id, e)
        what = f"checkpoint epoch {e} of run {ctx.run_id}"
        thetas.append(flat_from_state(ctx.model, state.get("model") if isinstance(state, dict) else None, what))
    mask = None
    if not p.include_bn:
        skip = excluded_names(ctx.model)
        mask = torch.cat([torch.full((w.numel(),), 0.0 if n in skip else 1.0, dtype=torch.float64)
                          for n, w in trainable(ctx.model).items()])
        notes.append("pca: biases and normalisation-layer parameters left out of the trajectory (as Li et al.); "
                     "include them with include_bn")
    d = pca_directions(theta0, thetas, cks, mask=mask, dims=p.dims)
    notes.append(f"pca of the trajectory of {len(cks)} checkpoints (epochs {cks[0]}..{cks[-1]}) minus the final one: "
                 "unit directions, coordinates are distances in weight space")
    return Directions(d.kind, d.vectors, d.info, tuple(notes), d.trajectory, d.trajectory_epochs)


def _other_point(ctx, p) -> tuple[torch.Tensor, str]:
    from probe.training import load_run_model

    store = _need_store(ctx, "towards")
    if p.to_run:
        run = store.resolve_run(p.to_run)
    elif ctx.run_id is None:
        raise UserError("towards another checkpoint needs a run target; for a model given by name name another "
                        "run (to_run)")
    else:
        run = ctx.run_id
    other = store.get_run(run)
    if other.get("model") != ctx.model_name:
        raise UserError(f"run {run} is a {other.get('model')!r} and this target a {ctx.model_name!r}: different "
                        f"architectures, no straight path between them")
    if ctx.run_id is not None and run != ctx.run_id:
        mine = (store.get_run(ctx.run_id).get("config") or {})
        theirs = other.get("config") or {}
        for key in ("fusion", "model_kwargs"):
            if (mine.get(key) or None) != (theirs.get(key) or None):
                raise UserError(f"run {run} has {key} {theirs.get(key)!r} and this target's run {mine.get(key)!r}: "
                                f"different architectures")
    to = (p.to or "last").strip().lower()
    if to in ("init", "0"):
        what = f"run {run} at init"
        seed = int((other.get("config") or {}).get("seed", 0))
        if run == ctx.run_id and ctx.rebuild is not None:
            model = ctx.rebuild(seed)
        else:
            model = load_run_model(store, run, "init")[0]
        state = model.state_dict()
    else:
        if to in ("last", "latest"):
            epoch = store.latest_checkpoint(run)
            if epoch is None:
                raise UserError(f"run {run} has no checkpoints to go towards")
        else:
            try:
                epoch = int(to)
            except ValueError:
                raise UserError(f"to must be an epoch number, init or last, got {p.to!r}") from None
        what = f"run {run} at epoch {epoch}"
        ck = store.load_checkpoint(run, epoch)
        state = ck.get("model") if isinstance(ck, dict) else None
    return flat_from_state(ctx.model, state, what), what


def directions_for(ctx, p) -> Directions:
    """The directions ``p.directions`` asks for at the context's target."""
    theta0 = flat_params(trainable(ctx.model))
    if p.directions == "random":
        d = random_directions(ctx.model, p.dims, norm=p.norm, include_bn=p.include_bn, seed=p.direction_seed)
        how = f"random Gaussian directions (seed {p.direction_seed}), {p.norm}-normalised against this target's weights"
        return Directions(d.kind, d.vectors, d.info, d.notes + (how,))
    if p.directions == "hessian":
        return _hessian(ctx, p, theta0.numel())
    if p.directions == "pca":
        return _trajectory(ctx, p, theta0)
    theta1, what = _other_point(ctx, p)
    d = towards_direction(theta0, theta1, what)
    return Directions(d.kind, d.vectors, d.info, (
        f"towards {what}: 0 is this target, 1 the other point (every trainable parameter; norm and include_bn do "
        f"not apply)", "BatchNorm running statistics stay this target's along the path, so at 1 the loss is not the "
        "other model's own unless bn recalibrate"))
