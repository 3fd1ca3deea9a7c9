"""The public function of the surface probe: :func:`loss_surface`, the loss and accuracy of a model
over a 1D or 2D grid in weight space, theta(a, b) = theta0 + a d1 + b d2 (its result:
:class:`~probe.probes.surface.result.SurfaceResult`).

Cost: one forward pass over the n fixed samples per grid point (twice that with
``bn="recalibrate"``); Li et al.'s default 51 x 51 grid is 2601 passes. The subset lives on the
device for the whole grid; points go in chunks (:mod:`._evaluate`: one ``vmap`` over
``functional_call`` per batch of points where that pays, a plain loop where it does not), and
every finished chunk is saved through ``partial`` (:class:`probe.runtime.partial.PartialResults`)
so that an interrupted grid resumes where it stopped and equals an uninterrupted one exactly:
the evaluation plan (chunk size, vmap or loop, samples per pass) is saved first and reused.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from probe.errors import UserError
from probe.runtime.precision import exact
from probe.runtime.chunks import map_chunks
from probe.runtime.memory import memory_budget, out_of_memory
from probe.runtime.progress import Progress
from probe.functional import couples_samples, flatten_params, functionalize
from probe.probes.surface._directions import Directions, flat_params
from probe.probes.surface._evaluate import LOOP_CHUNK, Plan, centre_point, evaluate_points, plan_evaluation
from probe.probes.surface._grid import Grid, parse_grid
from probe.probes.surface.result import SurfaceResult
from probe.inputs import takes_loader

__all__ = ["loss_surface", "as_directions"]

_BN_MODES = ("eval", "recalibrate")
_VECTORIZE = ("auto", "vmap", "loop")


def as_directions(directions, n_params: int) -> Directions:
    """A :class:`Directions` from itself, a vector (P,), a matrix (P, k) of columns (k = 1 or 2,
    e.g. stored eigenvectors) or a sequence of one or two vectors; float64 CPU vectors."""
    if isinstance(directions, Directions):
        d = directions
    else:
        if isinstance(directions, (list, tuple)):
            vecs = [torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v) for v in directions]
        else:
            t = directions if isinstance(directions, Tensor) else torch.as_tensor(np.asarray(directions))
            vecs = [t] if t.dim() == 1 else [t[:, i] for i in range(t.shape[1])] if t.dim() == 2 else None
            if vecs is None:
                raise UserError(f"directions must be a vector (P,) or a matrix (P, k), got shape {tuple(t.shape)}")
        d = Directions("custom", tuple(v.detach().reshape(-1).to("cpu", torch.float64) for v in vecs))
    if d.dims not in (1, 2):
        raise UserError(f"a surface has 1 or 2 directions, got {d.dims}")
    for v in d.vectors:
        if v.numel() != n_params:
            raise UserError(f"a direction has {v.numel()} elements but the model has {n_params} trainable "
                            f"parameters (directions are flattened in named_parameters order)")
        if not bool(torch.isfinite(v).all()):
            raise UserError("a direction has non-finite elements")
    return d


def _check(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@takes_loader("x", "y")
@exact
def loss_surface(model: nn.Module, x, y, directions, grid: str | Grid = "-1:1:51", *, bn: str = "eval",
                 vectorize: str = "auto", memory_gb: float | None = None, chunk: int = 0,
                 dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                 partial: Any = None, progress: Progress | None = None) -> SurfaceResult:
    """Cross-entropy loss and top-1 accuracy of ``model`` on (x (n, ...), y (n,) int labels) over a
    grid of points theta0 + a d1 (+ b d2) in weight space.

    ``directions``: a :class:`Directions` (:func:`random_directions`, :func:`pca_directions`,
    :func:`towards_direction`) or vectors as :func:`as_directions` takes them, flattened over the
    trainable parameters in ``named_parameters`` order. ``grid``: ``"START:STOP:COUNT"`` for every
    axis or ``"A,B"`` per axis (:func:`parse_grid`), or a :class:`Grid`. ``bn``: ``"eval"`` (the
    model's running statistics at every point) or ``"recalibrate"`` (re-estimated per point by a
    train-mode pass over x: double cost, point by point). ``vectorize``: ``"auto"`` | ``"vmap"``
    | ``"loop"`` (:mod:`._evaluate`); ``memory_gb`` bounds the working set (samples per pass and
    points per vmap call; None: the device's default, :func:`probe.runtime.memory.memory_budget`);
    ``chunk`` grid points per saved chunk (0: from the plan). ``dtype`` float32 / float64 (default
    the model's), ``device`` (default the model's): the subset moves there once. ``partial``: saved
    chunks (``get(piece)`` / ``put(piece, arrays)``), or None.

    The model is not modified (parameters, buffers, ``requires_grad`` and train/eval flags).
    """
    t0 = time.perf_counter()
    bn = _check("bn mode", bn, _BN_MODES)
    vectorize = _check("vectorize", vectorize, _VECTORIZE)
    if memory_gb is not None and (not isinstance(memory_gb, (int, float)) or isinstance(memory_gb, bool)
                                  or not 0 < memory_gb < 1e6):
        raise UserError(f"memory_gb must be a positive number, got {memory_gb!r}")
    fm = functionalize(model, dtype=dtype, device=device)
    memory_gb = memory_budget(None if memory_gb is None else memory_gb * 2 ** 30, fm.device,
                              name="memory_gb") / 2 ** 30
    P = fm.n_params
    dirs = as_directions(directions, P)
    g = grid if isinstance(grid, Grid) else parse_grid(grid, dirs.dims)
    if g.dims != dirs.dims:
        raise UserError(f"the grid is {g.dims}D but there are {dirs.dims} direction(s)")
    x = fm.prepare(torch.as_tensor(x))
    y = torch.as_tensor(y).to(fm.device)
    if x.shape[0] != y.shape[0] or y.dim() != 1 or x.shape[0] == 0 or y.is_floating_point():
        raise UserError(f"expected inputs (n, ...) and integer labels (n,), got shapes {tuple(x.shape)} and "
                        f"{tuple(y.shape)}")
    n = int(x.shape[0])
    notes = list(dirs.notes)
    if any(m.training for m in model.modules()):
        notes.append("the model was in train mode: evaluated in eval mode (dropout off); its modes are restored")
    notes.append("BatchNorm: running statistics re-estimated at every point on the subset (train-mode pass)"
                 if bn == "recalibrate" else "BatchNorm in eval mode: the model's running statistics at every point")

    theta0 = flatten_params(fm.params)                                           # (P,) dtype, device
    D = torch.stack(list(dirs.vectors)).to(device=fm.device, dtype=fm.dtype)     # (dims, P)
    plan = None
    if partial is not None:
        saved = partial.get("plan")
        plan = None if saved is None else Plan.from_arrays(saved)
    if plan is None:
        plan = plan_evaluation(fm, x, g.n_points, vectorize=vectorize, bn=bn, memory_gb=float(memory_gb),
                               chunk=int(chunk))
        if plan.vmap:
            plan = _try_vmap(fm, theta0, D, x, y, plan, vectorize, int(chunk), notes)
        if partial is not None:
            partial.put("plan", plan.to_arrays())
    if couples_samples(model):
        notes.append(f"BatchNorm layers without running statistics normalise every forward pass by its own batch "
                     f"({plan.sample_batch} of the {n} samples)")
    try:
        centre_loss, centre_acc = centre_point(fm, x, y, plan.sample_batch)
    except (IndexError, RuntimeError, ValueError) as exc:          # labels out of range, shapes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"the loss could not be evaluated on the probe data ({type(exc).__name__}: {first})") from None

    N = g.n_points
    starts = list(range(0, N, plan.chunk))
    desc = f"surface {'x'.join(map(str, g.shape))} ({'vmap' if plan.vmap else 'loop'})"

    def chunk(i: int) -> dict[str, np.ndarray]:
        lo, hi = starts[i], min(N, starts[i] + plan.chunk)
        loss_i, acc_i = evaluate_points(fm, theta0, D, g.coords(lo, hi), x, y, plan, bn)
        return {"loss": loss_i, "accuracy": acc_i, "range": np.asarray([lo, hi], dtype=np.int64)}

    # chunks shared out over the ranks under torchrun, saved as they finish (resume)
    pieces, resumed = map_chunks(len(starts), chunk, piece=lambda i: f"chunk-{i:05d}", partial=partial,
                                 fits=lambda i, got: _fits(got, starts[i], min(N, starts[i] + plan.chunk)),
                                 progress=progress, desc=desc, done_of=lambda i: min(N, starts[i] + plan.chunk),
                                 total=N)
    loss = np.concatenate([np.asarray(p["loss"], dtype=np.float64) for p in pieces])
    acc = np.concatenate([np.asarray(p["accuracy"], dtype=np.float64) for p in pieces])
    if resumed:
        notes.append(f"{resumed} of {len(starts)} chunks taken from an interrupted attempt of the same job")
    if partial is not None:
        notes.extend(n_ for n_ in getattr(partial, "notes", []) if n_ not in notes)

    if not np.isfinite(centre_loss):
        notes.append(f"the model's own loss on the subset is not finite ({centre_loss}): check the checkpoint")
    ci = g.centre_index()
    grid_centre = None if ci is None or not np.isfinite(loss[ci]) else float(loss[ci])
    bad = int((~np.isfinite(loss)).sum())
    if bad:
        notes.append(f"the loss is not finite at {bad} of {N} grid points: stored as NaN (gaps in the figures)")
    if grid_centre is not None and bn == "eval" and abs(grid_centre - centre_loss) > 1e-4 * max(1.0, abs(centre_loss)):
        notes.append(f"the grid's centre loss {grid_centre:.6g} differs from the model's {centre_loss:.6g}")
    theta64 = flat_params(fm.params)
    tnorm = float(theta64.norm())
    norms = tuple(float(v.norm()) for v in dirs.vectors)
    rel = tuple(v / tnorm if tnorm > 0 else float("inf") for v in norms)
    cos = None
    if dirs.dims == 2:
        cos = float(dirs.vectors[0] @ dirs.vectors[1]) / max(norms[0] * norms[1], 1e-300)
    if dirs.trajectory is not None:
        reach = np.abs(dirs.trajectory).max(axis=0)
        lim = [np.abs(g.alpha).max()] + ([np.abs(g.beta).max()] if g.beta is not None else [])
        if any(r > m for r, m in zip(reach, lim)):
            notes.append("the trajectory reaches coordinates " + ", ".join(f"{r:.3g}" for r in reach) +
                         ": beyond the grid; widen it to see all of it")
    shape = g.shape
    return SurfaceResult(kind=dirs.kind, alpha=g.alpha, beta=g.beta, loss=loss.reshape(shape),
                         accuracy=acc.reshape(shape), centre_loss=centre_loss, centre_accuracy=centre_acc,
                         grid_centre_loss=grid_centre, direction_norms=norms,
                         relative_norms=tuple(float(r) for r in rel), cosine=cos, directions=dict(dirs.info),
                         n_samples=n, n_params=P, bn=bn, dtype=str(fm.dtype).replace("torch.", ""), plan=plan,
                         n_chunks=len(starts), resumed_chunks=resumed, wall_time_s=time.perf_counter() - t0,
                         trajectory=dirs.trajectory, trajectory_epochs=dirs.trajectory_epochs, notes=tuple(notes))


def _try_vmap(fm, theta0, D, x, y, plan: Plan, vectorize: str, chunk: int, notes: list) -> Plan:
    """``plan`` if two points go through vmap, else (``auto``) the loop with a note saying why."""
    try:
        evaluate_points(fm, theta0, D, np.zeros((2, D.shape[0])), x, y, replace(plan, vmap_batch=2))
        return plan
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(exc, "the surface's vmap trial on two grid points") from exc
    except UserError:              # a ValueError, but the user's mistake, not vmap's
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if vectorize == "vmap":
            raise UserError(f"this model cannot be evaluated under vmap ({type(exc).__name__}: {why}); use "
                            f"vectorize loop or auto") from None
        notes.append(f"vmap failed on this model ({type(exc).__name__}: {why}): grid points evaluated one by one")
        return replace(plan, vmap=False, vmap_batch=1, chunk=chunk or LOOP_CHUNK)


def _fits(arrays: dict, lo: int, hi: int) -> bool:
    """A saved chunk is used only when it is exactly the points lo..hi."""
    try:
        r = np.asarray(arrays["range"]).tolist()
        return (r == [lo, hi] and np.asarray(arrays["loss"]).shape == (hi - lo,)
                and np.asarray(arrays["accuracy"]).shape == (hi - lo,))
    except (KeyError, TypeError, ValueError):
        return False
