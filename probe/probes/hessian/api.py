"""The public functions of the Hessian probe: the curvature operator of a model's loss, the block
grouping of its parameters, and :func:`hessian_spectrum` (top-k, trace, density, per block).

:func:`hessian_spectrum` fixes one seeded data subset, builds a Hessian or GGN operator on it
(:mod:`._operators`) and runs the generic estimators (:mod:`probe.linalg`) on it: extreme
eigenpairs by :func:`probe.linalg.block_lanczos`, the trace by Hutch++ or Hutchinson, the
spectral density by stochastic Lanczos quadrature; on request the same per parameter block.
"""
from __future__ import annotations

import fnmatch
import re
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probe.errors import UserError
from probe.runtime.precision import exact, exact_products
from probe.functional import FunctionalModel, OutputSelector, ParamFilter, functionalize
from probe.linalg import TraceEstimate, extreme_eigenpairs, hutchinson_trace, hutchpp_trace, slq_density
from probe.runtime.dist import current
from probe.runtime.progress import Progress
from probe.probes.hessian._operators import (Criterion, DataShardedOperator, GGNOperator, HessianOperator,
                                             couples_samples, has_batchnorm)
from probe.probes.hessian.result import BlockResult, Eigenpairs, HessianResult
from probe.inputs import takes_loader

__all__ = ["hessian_spectrum", "curvature_operator", "group_blocks", "resolve_criterion"]


_OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator}
_CRITERIA = ("cross_entropy", "mse")
_WHICH = ("largest", "smallest", "both")
_TRACES = ("hutchpp", "hutchinson")
_LIST_MAX = 40          # block names listed in an error message


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _choice(value, choices: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value.lower()


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise UserError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def resolve_criterion(criterion: str | Criterion) -> tuple[str, Criterion]:
    """(name, ``criterion(outputs, targets) -> mean loss``) for ``"cross_entropy"`` (softmax
    cross-entropy of logits (b, C) against labels (b,), ``F.cross_entropy``), ``"mse"`` (mean
    over all elements of (outputs - targets)^2, as ``F.mse_loss``) or a callable with the same
    contract (it must return the *mean* over the batch, a 0-dim tensor)."""
    if callable(criterion):
        return getattr(criterion, "__name__", type(criterion).__name__), criterion
    name = _choice(criterion, _CRITERIA, "criterion")
    return name, (F.cross_entropy if name == "cross_entropy" else _mse)


def _mse(out: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements, written out: forward-mode AD through
    ``F.mse_loss``'s backward fails in torch 2.13 ("ZeroTensors are immutable")."""
    return (out - target).pow(2).mean()


def _subset(x, y, n_samples: int | None, seed: int) -> tuple[Tensor, Tensor, int]:
    """The fixed subset: n_samples of (x, y) chosen by a torch.Generator(seed) permutation (in
    their original order), all of them when n_samples is None or at least their number."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
        raise UserError(f"inputs and targets must have the same number of samples, got shapes "
                        f"{tuple(x.shape)} and {tuple(y.shape)}")
    N = int(x.shape[0])
    if N == 0:
        raise UserError("no samples: x and y are empty")
    if n_samples is None or n_samples >= N:
        return x, y, N
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(int(seed)))[:n_samples].sort().values
    return x[idx], y[idx], N


def _targets(fm: FunctionalModel, x: Tensor, y: Tensor, name: str) -> Tensor:
    """Targets on the model's device; for ``"mse"`` integer labels (n,) become one-hot rows of the
    output's width, and the target shape must match the output's."""
    y = y.to(device=fm.device, dtype=fm.dtype if y.is_floating_point() else None)
    if name != "mse":
        return y
    with torch.no_grad():
        out = fm(fm.params, x[:1])
    if not y.is_floating_point():
        if y.dim() != 1 or out.dim() != 2:
            raise UserError(f"criterion 'mse' with integer labels needs outputs (n, C) and labels (n,), "
                            f"got outputs {tuple(out.shape)} and labels {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
            raise UserError(f"labels must lie in 0..{out.shape[1] - 1} (the model has {out.shape[1]} "
                            f"outputs), got {int(y.min())}..{int(y.max())}")
        return F.one_hot(y.long(), out.shape[1]).to(fm.dtype)
    if tuple(y.shape[1:]) != tuple(out.shape[1:]):
        raise UserError(f"criterion 'mse' needs targets shaped like the outputs, got targets "
                        f"{tuple(y.shape)} and outputs {tuple(out.shape)} per batch")
    return y


@takes_loader("x", "y")
@exact
def curvature_operator(model: nn.Module, x, y, *, criterion: str | Criterion = "cross_entropy",
                       operator: str = "hessian", param_filter: ParamFilter = None,
                       batch_size: int | None = None, bn: str = "eval",
                       dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                       output: OutputSelector = None, vectorize: str = "auto"
                       ) -> HessianOperator | GGNOperator:
    """The Hessian (``operator="hessian"``) or Gauss-Newton (``"ggn"``) operator of the mean
    loss of ``model`` over all of (x, y), a :class:`probe.linalg.SymmetricOperator` of size P
    over the parameters selected by ``param_filter`` (others held fixed), vectors in the model's
    dtype (or ``dtype``) flattened in ``named_parameters`` order. Products go in mini-batches of
    ``batch_size`` samples (default all); ``bn`` and ``vectorize``: :mod:`._operators`. Each
    ``matmat(V)`` of V (P, b) costs b products. The model is not modified. The products run with
    TF32 off whenever they are called (:func:`probe.runtime.precision.exact_products`).
    """
    name, crit = resolve_criterion(criterion)
    kind = _choice(operator, tuple(_OPERATORS), "operator")
    fm = functionalize(model, param_filter=param_filter, dtype=dtype, device=device, output=output)
    x, y, _ = _subset(x, y, None, 0)
    x = fm.prepare(x)
    y = _targets(fm, x, y, name)
    return exact_products(_OPERATORS[kind](fm, x, y, crit, batch_size=batch_size, vectorize=vectorize,
                                           bn=_choice(bn, ("eval", "train"), "bn mode")))


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _owner(name: str) -> str:
    """The module that owns a parameter: its name minus the last component (root: the name)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _stages(names: Sequence[str]) -> dict[str, list[str]]:
    parts = [n.split(".") for n in names]
    depth = 0                    # strip a wrapper common to every name (``net.``, ``model.``)
    while all(len(p) >= depth + 3 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    prefix = ".".join(parts[0][:depth]) + "." if depth else ""
    children: dict[str, list[str]] = {}
    container: dict[str, bool] = {}
    for n, p in zip(names, parts):
        head = p[depth]
        children.setdefault(head, []).append(n)
        container[head] = container.get(head, False) or len(p) >= depth + 3
    heads = list(children)
    stages = [i for i, h in enumerate(heads) if container[h]]
    out: dict[str, list[str]] = {}
    for i, h in enumerate(heads):
        if stages and not container[h] and i < stages[0]:
            key = "stem"
        elif stages and not container[h] and i > stages[-1]:
            key = "head"
        else:
            key = prefix + h
        out.setdefault(key, []).extend(children[h])
    return out


def group_blocks(names: Sequence[str], blocks: str) -> dict[str, list[str]]:
    """Group parameter names (in order) into named blocks.

    * ``"layer"``: by owning module (the name minus its last component): ``layer1.0.conv1.weight``
      and ``layer1.0.conv1.bias`` form the block ``layer1.0.conv1``.
    * ``"stage"``: by top-level child module (after stripping a wrapper module common to every
      name, e.g. ``net.`` of an ``nn.Sequential`` attribute): ``layer1.0.conv1.weight`` -> ``layer1``.
      Children that are single layers (their parameters sit directly on them, e.g. ``conv1``,
      ``bn1``, ``fc``) are grouped as ``stem`` before the first multi-layer stage and ``head``
      after the last one; between stages, and when no child has sub-layers, each is its own block.
    * anything else is a PATTERN over the ``"layer"`` block names: a glob (``fnmatch``, whole
      name, e.g. ``"*conv*"``) or a regular expression matching at the start of the name
      (``re.match``, as ``param_filter``: ``"layer1"``, ``r"layer\\d\\.0\\."``); every matching
      layer is its own block. A pattern matching no layer raises :class:`UserError` listing the
      layer names.
    """
    names = list(names)
    if not names:
        raise UserError("no parameters to group into blocks")
    if not isinstance(blocks, str) or not blocks:
        raise UserError(f"blocks must be 'stage', 'layer' or a name pattern, got {blocks!r}")
    layers: dict[str, list[str]] = {}
    for n in names:
        layers.setdefault(_owner(n), []).append(n)
    if blocks == "layer":
        return layers
    if blocks == "stage":
        return _stages(names)
    try:
        rx = re.compile(blocks)
    except re.error:
        rx = None
    chosen = {b: ps for b, ps in layers.items()
              if fnmatch.fnmatchcase(b, blocks) or (rx is not None and rx.match(b))}
    if not chosen:
        avail = list(layers)
        listed = ", ".join(avail[:_LIST_MAX]) + (f" ... ({len(avail)} in all)" if len(avail) > _LIST_MAX else "")
        raise UserError(f"block pattern {blocks!r} matches no block; the blocks (layers) are: {listed}; "
                        f"or use blocks='stage' or 'layer'")
    return chosen


# --------------------------------------------------------------------------------------------
# The spectrum
# --------------------------------------------------------------------------------------------


class _Counter:
    """Reports products as ``progress(desc, done, total)``; ``total`` is the planned upper bound
    (Lanczos may converge sooner; the last report then jumps to the total)."""

    def __init__(self, progress: Progress | None, total: int, desc: str):
        self.report, self.total, self.desc, self.done = progress, max(1, int(total)), desc, 0

    def __call__(self, k: int) -> None:
        self.done = min(self.total, self.done + int(k))
        if self.report is not None:
            self.report(self.desc, self.done, self.total)

    def finish(self) -> None:
        if self.report is not None:
            self.report(self.desc, self.total, self.total)


def _eig(op, k: int, which: str, *, tol, max_dim, seed: int, vectors: bool, block: int,
         counter: _Counter) -> Eigenpairs:
    res = extreme_eigenpairs(op, k, which, block_size=block, max_dim=max_dim, tol=tol, seed=seed,
                             return_vectors=vectors, progress=counter)
    V = None if res.vectors is None else res.vectors.detach().to(torch.float32).cpu().numpy()
    notes = list(res.notes)
    if not res.converged:
        notes.append(f"{which} eigenvalues not converged within a Krylov dimension of {res.dim} "
                     f"(largest residual {float(res.residuals.max()):.3g}); raise max_dim or tol")
    return Eigenpairs(which=which, eigenvalues=np.asarray(res.eigenvalues, dtype=np.float64), eigenvectors=V,
                      residuals=np.asarray(res.residuals, dtype=np.float64), converged=res.converged,
                      n_matvecs=res.n_matvecs, dim=res.dim, tol=res.tol, notes=tuple(notes))


def _trace(op, method: str, m: int, seed: int, block: int) -> TraceEstimate:
    if method == "hutchpp":
        return hutchpp_trace(op, m, seed=seed, block=block)
    return hutchinson_trace(op, m, seed=seed, block=block)


@takes_loader("x", "y")
@exact
def hessian_spectrum(model: nn.Module, x, y, *, criterion: str | Criterion = "cross_entropy",
                     operator: str = "hessian", k: int = 5, which: str = "largest",
                     trace: str | None = "hutchinson", trace_matvecs: int = 100, density: bool = True,
                     density_probes: int = 3, density_steps: int = 50, blocks: str | None = None,
                     n_samples: int | None = 200, batch_size: int | None = None, bn: str = "eval",
                     dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                     seed: int = 0, return_eigenvectors: bool = True, tol: float | None = None,
                     max_dim: int | None = None, lanczos_block: int | None = None,
                     param_filter: ParamFilter = None, output: OutputSelector = None,
                     progress: Progress | None = None) -> HessianResult:
    """Curvature of the loss of ``model`` at its current parameters: extreme eigenvalues, trace,
    spectral density, and the same per parameter block.

    Data: ``n_samples`` of (x (N, ...), y (N, ...)) chosen by a ``torch.Generator(seed)``
    permutation (all N when None or more), the same subset for every product; the loss is
    ``criterion`` (:func:`resolve_criterion`) averaged over it, evaluated in mini-batches of
    ``batch_size`` (default all at once). ``operator``: ``"hessian"`` (H v = jvp of grad) or
    ``"ggn"`` (J^T H_out J, PSD); :mod:`._operators`. ``bn``: ``"eval"`` (running statistics) or
    ``"train"`` (batch statistics of the whole subset, which must then be one batch). The model
    is not modified (parameters, buffers, ``requires_grad``, train/eval flags, ``.grad``).

    Computed, with their cost in products ("HVPs", each a pass over the subset):

    * ``which`` = ``"largest"`` / ``"smallest"`` / ``"both"``: the k largest / smallest algebraic
      eigenpairs by block Lanczos (``lanczos_block`` vectors per step; default min(k, 4), except
      for the largest with the Hessian's kept-graph products, where a block gains nothing and
      costs products: 1 for k = 1, else 2; a block of s resolves multiplicities up to s and
      notes clusters of s or more); ``tol``
      and ``max_dim`` as :func:`probe.linalg.block_lanczos`: relative residual 1e-8 in float64,
      1e-5 in float32; Krylov dimension at most max(10 k, 100)): as many HVPs as the Krylov
      dimension reached, at most ``max_dim``, for each of ``largest`` and ``smallest``
      (clustered interior eigenvalues such as the smallest of a Hessian converge slowly; a note
      says so). Eigenvectors (P, k) float32 with ``return_eigenvectors``.
    * ``trace`` = ``"hutchinson"`` (default) / ``"hutchpp"`` (Hutch++) / None: ``trace_matvecs``
      HVPs. Hutch++ spends two thirds of its budget on a sketch of the top eigenspace, which pays
      when a few eigenvalues dominate the trace; a network Hessian's bulk is flat and indefinite:
      ResNet-20, 200 samples, 100 products: standard error 20.2 with Hutch++, 12.1 with
      Hutchinson; on a 5k-parameter ResNet with its exact trace, RMS relative error 0.19 vs 0.07.
    * ``density``: stochastic Lanczos quadrature, at most ``density_probes`` * ``density_steps``
      HVPs (the probes in lockstep, one block product per step).
    * ``blocks`` = ``"stage"`` / ``"layer"`` / a pattern (:func:`group_blocks`): per block the
      diagonal block of the operator (the block's parameters alone, the rest held fixed): its
      extreme eigenvalues (k capped at the block's size) and trace (same method and budget; no
      density, no eigenvectors), the eigen-solves and the trace once more per block.

    Numerics: products in the model's dtype (or ``dtype``; pass ``torch.float64`` for exact work
    on small models), inner products and the small Lanczos matrices in float64. ``seed`` fixes
    the subset and every random vector.

    Raises :class:`UserError` for: mismatched x/y lengths; an unknown criterion, operator,
    ``which``, trace method or BatchNorm mode; k larger than the number of parameters; a block
    pattern that matches nothing (with the block names); ``bn="train"`` with mini-batches; a
    non-finite loss at the probe point (nothing else is computed).
    """
    t0 = time.perf_counter()
    crit_name, crit = resolve_criterion(criterion)
    kind = _choice(operator, tuple(_OPERATORS), "operator")
    which = _choice(which, _WHICH, "which (eigenvalues)")
    bn = _choice(bn, ("eval", "train"), "bn mode")
    tmethod = None if trace is None else _choice(trace, _TRACES, "trace method")
    k = _positive("k", k)
    if n_samples is not None:
        n_samples = _positive("n_samples", n_samples)
    if batch_size is not None:
        batch_size = _positive("batch_size", batch_size)
    if tmethod is not None:
        trace_matvecs = _positive("trace_matvecs", trace_matvecs, 3 if tmethod == "hutchpp" else 1)
    if density:
        density_probes = _positive("density_probes", density_probes)
        density_steps = _positive("density_steps", density_steps)
    if max_dim is not None:
        max_dim = _positive("max_dim", max_dim)
    if lanczos_block is not None:
        lanczos_block = _positive("lanczos_block", lanczos_block)
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < float(tol) < 1):
        raise UserError(f"tol must be a number between 0 and 1, got {tol!r}")

    fm = functionalize(model, param_filter=param_filter, dtype=dtype, device=device, output=output)
    P = fm.n_params
    if k > P:
        raise UserError(f"k={k} is larger than the number of parameters ({P}); use k <= {P}")
    if max_dim is not None and max_dim < k:
        raise UserError(f"max_dim={max_dim} must be at least k={k}")
    groups = group_blocks(list(fm.params), blocks) if blocks is not None else {}
    xs, ys, N = _subset(x, y, n_samples, seed)
    n = int(xs.shape[0])
    notes: list[str] = []
    if n_samples is not None and n_samples > N:
        notes.append(f"n_samples={n_samples} is more than the {N} samples given: all {N} used")
    elif n < N:
        notes.append(f"used {n} of the {N} samples given (n_samples={n_samples}, a seeded subset; "
                     "n_samples=None uses all)")
    if any(m.training for m in model.modules()):
        notes.append(f"model was in train mode: evaluated with dropout off and BatchNorm in "
                     f"{bn} mode; the model's modes are restored")
    if bn == "train" and not has_batchnorm(model):
        notes.append("bn='train' has no effect: the model has no BatchNorm layer")
    elif bn == "eval" and couples_samples(model):
        notes.append("the model has BatchNorm layers without running statistics: they normalise by "
                     "the statistics of the whole subset (one batch)")
    xs = fm.prepare(xs)
    ys = _targets(fm, xs, ys, crit_name)
    ddp = current()
    # under torchrun the products go by data shards (each rank its part of the subset, summed by
    # an all-reduce) where the loss is a mean of independent per-sample terms
    shard = ddp.active and bn == "eval" and not couples_samples(model) and n >= ddp.world

    def Op(fm_, xs_, ys_, crit_, **kw):
        if not shard:
            return _OPERATORS[kind](fm_, xs_, ys_, crit_, **kw)
        part = ddp.shard(n)
        return DataShardedOperator(_OPERATORS[kind](fm_, xs_[part], ys_[part], crit_, **kw), n, ddp)

    if shard:
        notes.append(f"products by data shards over {ddp.world} ranks ({n // ddp.world}-{-(-n // ddp.world)} "
                     f"samples each)")
    op = Op(fm, xs, ys, crit, batch_size=batch_size, bn=bn)

    try:
        loss = op.mean_loss()
    except (TypeError, IndexError, ValueError, RuntimeError) as exc:   # labels out of range, shapes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"the loss could not be evaluated on the probe data ({type(exc).__name__}: "
                        f"{first}); check that the targets fit the model's outputs and the "
                        f"criterion") from None
    if not np.isfinite(loss):
        raise UserError(f"the loss at the probe point is not finite ({loss}): no curvature can be "
                        f"computed there; check the checkpoint, the inputs and their normalisation")

    def block_for(w: str, kk: int) -> int:
        """Vectors per Lanczos step. Vmapped products: min(k, 4), a block costs little more than
        one vector. Kept-graph products go one vector at a time, so a block only adds products
        (ResNet-20, 200 samples, top-5 to 1e-3: 17 products with s = 1, 22 with s = 2, 36 with
        s = 4): the largest take s = 1 for k = 1 (a repeated top eigenvalue has the same value)
        and s = 2 otherwise (a repeated eigenvalue is resolved or flagged by the cluster note);
        the smallest keep min(k, 4): the near-zero bulk of a network Hessian is highly repeated."""
        if lanczos_block:
            return min(lanczos_block, kk)
        if getattr(op, "vectorize", None) == "graph" and w == "largest":
            return 1 if kk == 1 else 2
        return min(kk, 4)

    wanted = ("largest", "smallest") if which == "both" else (which,)
    dim_cap = min(P, max_dim or max(10 * k, 100))
    plan = (len(wanted) * dim_cap + (trace_matvecs if tmethod else 0)
            + (density_probes * density_steps if density else 0))
    counter = _Counter(progress, plan, f"{kind} spectrum ({n} samples, {P} parameters)")
    ops = [op]

    pairs = {w: _eig(op, k, w, tol=tol, max_dim=max_dim, seed=seed, vectors=return_eigenvectors, block=block_for(w, k),
                     counter=counter) for w in wanted}
    for e in pairs.values():
        notes.extend(e.notes)
    tr = None
    if tmethod is not None:
        tr = _trace(op, tmethod, trace_matvecs, seed + 1, block=10)
        counter(tr.n_matvecs)
    dens = None
    if density:
        dens = slq_density(op, density_probes, density_steps, seed=seed + 2, progress=counter)
    counter.finish()
    op.release()

    block_results: dict[str, BlockResult] = {}
    if groups:
        for bi, (name, pnames) in enumerate(groups.items()):
            chosen = set(pnames)
            fmb = functionalize(model, param_filter=lambda nm, c=chosen: nm in c, dtype=fm.dtype,
                                device=fm.device, output=output)
            opb = Op(fmb, xs, ys, crit, batch_size=batch_size, bn=bn)
            ops.append(opb)
            kb = min(k, fmb.n_params)
            mdb = None if max_dim is None else max(kb, min(max_dim, fmb.n_params))
            cb = _Counter(progress, len(wanted) * min(fmb.n_params, mdb or max(10 * kb, 100))
                          + (trace_matvecs if tmethod else 0), f"{kind} block {name} ({fmb.n_params} parameters)")
            eb = {w: _eig(opb, kb, w, tol=tol, max_dim=mdb, seed=seed + 3 + bi, vectors=False,
                          block=block_for(w, kb), counter=cb) for w in wanted}
            tb = _trace(opb, tmethod, trace_matvecs, seed + 1, block=10) if tmethod else None
            cb.finish()
            opb.release()
            for w, e in eb.items():
                if not e.converged:
                    notes.append(f"block {name}: {w} eigenvalues not converged (Krylov dimension {e.dim})")
            empty = np.zeros(0)
            block_results[name] = BlockResult(
                name=name, params=tuple(pnames), n_params=fmb.n_params,
                largest=eb["largest"].eigenvalues if "largest" in eb else empty,
                smallest=eb["smallest"].eigenvalues if "smallest" in eb else empty,
                trace=None if tb is None else tb.estimate, trace_stderr=None if tb is None else tb.stderr,
                converged=all(e.converged for e in eb.values()), n_matvecs=opb.matvecs)
    for o in ops:
        for note in o.notes:
            if note not in notes:
                notes.append(note)
    return HessianResult(operator=kind, criterion=crit_name, which=which, k=k, largest=pairs.get("largest"),
                         smallest=pairs.get("smallest"), trace=tr, density=dens, blocks=block_results,
                         loss=float(loss), n_params=P, n_samples=n, batch_size=op.batch_size, bn=bn,
                         dtype=str(fm.dtype).replace("torch.", ""), n_hvps=sum(o.matvecs for o in ops),
                         wall_time_s=time.perf_counter() - t0, seed=int(seed), notes=tuple(notes), n_available=N)
