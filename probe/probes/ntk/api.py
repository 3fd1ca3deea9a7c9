"""The public functions of the NTK probe: the kernel, its spectrum, and the matrix-free top-k.

:func:`empirical_ntk` plans (:mod:`._plan`) and runs one of the kernel methods (:mod:`._jacobian`,
:mod:`._ntvp`, :mod:`._layerwise`); :func:`ntk_spectrum` summarises a kernel with
:mod:`probe.linalg.spectrum`; :func:`ntk_topk_lanczos` runs :func:`probe.linalg.block_lanczos` on
one of the two NTK operators (:mod:`._operators`).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor, nn

from probe.autodiff import find_structured_layers as _find_layers
from probe.runtime.dist import current
from probe.errors import UserError
from probe.runtime.precision import exact
from probe.runtime.memory import MemoryMeter, memory_budget, out_of_memory
from probe.functional import (FunctionalModel, OutputSelector, ParamFilter, check_sample_independence,
                              couples_samples, eval_mode, fix_batch_statistics, functionalize)
from probe.linalg import CallableOperator, SymmetricOperator, block_lanczos, dense_eigenvalues, spectrum_stats
from probe.probes.ntk._blocks import _block_shape, _symmetrize_
from probe.probes.ntk._dist import _factored, _tiled
from probe.probes.ntk._methods import KernelMethod, NtkMethod, candidates, run_plan
from probe.probes.ntk._operators import _GramOperator, _NtkOperator, _ShardedGram
from probe.probes.ntk._plan import (_checked_layers, _Ctx, _default_block, _fit_n, _measure, _no_plan_error, _Plan,
                                    _plan_gram)
from probe.probes.ntk._util import (_LANCZOS_MAX_BLOCK, _MODEL_ERRORS,
                                    _check_finite, _enum, _first_line, _has_batchnorm, _mib,
                                    _out_of_range, _overflow_error, _prepare_inputs, _progress,
                                    _promoted)
from probe.probes.ntk.result import LanczosMethod, LanczosResult, NtkKind, NtkResult, SpectrumResult
from probe.inputs import takes_loader

__all__ = ["empirical_ntk", "ntk_spectrum", "ntk_topk_lanczos"]

_STAT_CHUNK = 256       # samples per forward pass when fixing BatchNorm statistics
_TRIAL = 4              # samples of the calibration run of a plan
_TRIAL_SLACK = 8 << 20  # measured working sets this much above the estimate are within it


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


@takes_loader("x1", None, "x2")
@exact
def empirical_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None = None, *,
                  kind: NtkKind | str = "trace", method: NtkMethod | str = "auto",
                  memory_budget_bytes: int | None = None, block_size: int | None = None,
                  param_filter: ParamFilter = None, dtype: torch.dtype | str | None = None,
                  device: torch.device | str | None = None, output: OutputSelector = None,
                  progress=None) -> NtkResult:
    """Empirical NTK of ``model`` between ``x1`` (N1, ...) and ``x2`` (N2, ...) (default: x1).

    ``kind`` and the axis conventions: the :mod:`probe.probes.ntk` docstring. ``param_filter``
    restricts the kernel to a parameter group (the other parameters are held fixed). The model is
    evaluated in eval mode and is not modified.

    Memory and cost model (``method="auto"``): one forward pass of one sample measures the
    activations saved for the backward pass (A, per sample) and the forward FLOPs [FP] (matmul
    and conv FLOPs, ``FlopCounterMode``). Each method gets a plan -- the largest blocks of samples
    whose peak working set (kernel + the Jacobians / activations it holds at once) fits the
    budget -- and an estimated cost, with q = 1 (trace), O (diagonal), O^2 (full):

    * jacobian:  1.5 * E * (1 + 2*O) * [FP] + 2 * N1 * N2 * q * P, where E counts per-sample
      Jacobian evaluations (N when all fit at once, more when column blocks are recomputed);
    * layerwise: S * (1 + 2*O) * [FP] + sum over layers of 2 * N1 * N2 * q * P_layer (or the
      Gram cost), S the samples pushed through forward/backward passes, plus the jacobian cost
      of any parameter outside structured layers;
    * ntvp:      1.5 * N2 * O * (3 + 2.5 * N1) * [FP].

    (1.5: per-sample vmapped kernels against batched ones.) ``auto`` takes the cheapest plan that
    fits ``memory_budget_bytes``: in practice ``layerwise`` for CNNs/MLPs built from
    Linear/Conv2d/BatchNorm, ``jacobian`` for other models (blocked by samples, then by parameter
    groups as the budget shrinks), ``ntvp`` when not even one sample's O*P Jacobian fits. The
    chosen plan is reported in ``result.schedule`` and ``result.est_gflop``. When the kernel
    itself or every method's smallest working set exceeds the budget a :class:`UserError` says so
    before anything large is allocated, with the N that would fit and what to use instead.
    ``block_size`` forces the number of samples per block (for tests and tuning).

    Every byte is counted against ``memory_budget_bytes``: the kernel, the parameter copy (none
    when no cast is needed), the closed-form self-check (layers whose check does not fit are used
    unchecked, with a note) and each method's working set, which is measured on a small block of
    samples before a plan that uses more than an eighth of the budget runs, and the plan resized
    when the measurement exceeds the estimate.

    ``auto`` is a fallback chain: plans are tried cheapest first, and a method that fails for
    this model (no forward-mode AD, as in the fast paths of ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention``; no batching rule under vmap, as ``nn.GRU``, where per-sample loops
    take over inside a method; a working set beyond the budget once measured) is recorded in
    ``notes`` and the next one runs. ``output`` selects the tensor of a model that returns a
    mapping, a HuggingFace ``ModelOutput`` or a tuple (:func:`probe.functional.select_output`).

    Samples must be independent: BatchNorm without running statistics gets its statistics fixed
    at those of ``x1`` (:func:`probe.functional.fix_batch_statistics`, with a note); any other
    coupling of the samples of a batch (``x - x.mean(0)``) is a :class:`UserError`.

    Under ``torchrun`` (:mod:`probe.runtime.dist`) the trace and diagonal kernels of x1 with
    itself by ``layerwise`` are computed from layer factors: each rank records the layer inputs
    and output gradients of its share of the samples once and the ranks exchange them, each
    contracting its own block and half of every cross block (a note gives the bytes sent); other
    kinds, x2, methods and factors that do not fit the budget share out tiles of the kernel. Every
    rank returns the whole kernel.

    Raises :class:`UserError` for unknown kind/method, mismatched inputs, parameter filters that
    select nothing, non-finite model outputs, models that couple samples, a method that does not
    work on the model and impossible budgets.
    """
    t0 = time.perf_counter()
    kind = _enum(NtkKind, kind, "NTK kind")
    method = _enum(NtkMethod, method, "NTK method")
    ddp = current()
    spread = ddp.active and isinstance(x1, Tensor) and x1.shape[0] >= 2 and not couples_samples(model)

    def tiles(why: str = "") -> NtkResult:
        return _tiled(ddp, empirical_ntk, model, x1, x2, t0, kind=kind, why=why, method=method,
                      memory_budget_bytes=memory_budget_bytes, block_size=block_size, param_filter=param_filter,
                      dtype=dtype, device=device, output=output)
    if spread and (x2 is not None or kind == NtkKind.FULL or x1.shape[0] < ddp.world
                   or method not in (NtkMethod.AUTO, NtkMethod.LAYERWISE)):
        return tiles()
    if block_size is not None and int(block_size) < 1:
        raise UserError(f"block_size must be a positive integer, got {block_size!r}")
    fm = functionalize(model, param_filter=param_filter, dtype=dtype, device=device, output=output)
    memory_budget_bytes = memory_budget(memory_budget_bytes, fm.device, name="memory_budget_bytes")
    notes: list[str] = []
    if any(m.training for m in model.modules()):
        notes.append("model was in train mode: evaluated in eval mode (BatchNorm with its running "
                     "statistics, dropout off); the model's modes are restored")
    with eval_mode(model):
        x1, x2, sym = _prepare_inputs(fm, x1, x2)
        fm, layers, stats = _independent(fm, x1, notes)
        itemsize = torch.empty((), dtype=fm.dtype).element_size()
        c = _Ctx(fm, kind, x1, x2, sym, stats, itemsize, int(memory_budget_bytes))
        free = c.budget - c.kernel_bytes - fm.copied_bytes
        if free <= 0:
            fit = _fit_n(c.budget // 2, c.q, None if sym else c.n2)
            copy = (f" and the parameter copy {_mib(fm.copied_bytes)}" if fm.copied_bytes else "")
            raise UserError(
                f"the {kind.value} kernel for N1={c.n1}, N2={c.n2}, O={c.O} alone needs "
                f"{_mib(c.kernel_bytes)} (float64){copy} but memory_budget_bytes is "
                f"{_mib(c.budget)}; at most N1={fit} samples fit with half the budget left for the "
                f"work. Use fewer samples, kind='trace' (N x N), ntk_topk_lanczos(...) for the top "
                f"eigenvalues without forming the kernel, or raise memory_budget_bytes")
        act_bytes = max(1, 3 * stats.saved_numel * itemsize)
        chunk = max(1, min(c.n1, free // act_bytes))
        y_max = _check_finite(fm, x1, chunk, "x1", ddp if spread else None)
        if not sym:
            y_max = max(y_max, _check_finite(fm, x2, chunk, "x2"))
        if dtype is None and fm.dtype != torch.float64 and _out_of_range(fm.dtype, y_max):
            res = empirical_ntk(model, x1, x2, kind=kind, method=method,
                                memory_budget_bytes=memory_budget_bytes, block_size=block_size,
                                param_filter=param_filter, dtype=torch.float64, device=device,
                                output=output, progress=progress)
            return _promoted(res, t0, fm.dtype, y_max)

        good: list = []
        fallback: list[str] = []
        wanted = candidates(method)
        if any(m.structured for m in wanted):
            good, fallback, bad = _checked_layers(c, layers, free, notes)
            if bad:
                notes.append(f"layerwise: {len(bad)} parameter tensor(s) failed the closed-form "
                             f"check and use the generic Jacobian path")
        if spread:   # under torchrun: each rank's layer factors once, exchanged (else tiles)
            try:
                got = _factored(c, good, fallback, ddp, free, progress)
            except torch.OutOfMemoryError as exc:
                raise out_of_memory(exc, "the NTK kernel (layer factors over ranks)") from exc
            except UserError:       # a peer rank lost (DistError) among them
                raise
            except _MODEL_ERRORS as exc:
                raise UserError(f"the layerwise kernel over {ddp.world} ranks failed on this model "
                                f"({_first_line(exc)})") from None
            if got is None:
                return tiles("the layer factors do not apply or fit the memory budget")
            K, plan, sent = got
            notes.append(f"kernel over {ddp.world} ranks from layer factors: each rank recorded its "
                         f"samples' layer inputs and output gradients once and sent {_mib(sent)} of "
                         f"them to the others")
        else:
            by_name = {m.name: m for m in wanted}

            def make(m: KernelMethod, ctx: _Ctx, room: int) -> _Plan:
                return m.plan(ctx, (good, fallback), room, block_size)

            plans = [make(m, c, free) for m in wanted]
            feasible = [p for p in plans if p.feasible]
            if not feasible:
                raise _no_plan_error(c, plans, sym)
            K = torch.zeros(_block_shape(kind, c.n1, c.n2, c.O), dtype=torch.float64, device=fm.device)
            failures: list[str] = []
            plan = None
            for cand in sorted(feasible, key=lambda p: p.cost):
                try:
                    cand = _calibrated(c, cand, free, lambda ctx, room, m=by_name[cand.method]: make(m, ctx, room),
                                       notes)
                    run_plan(c, cand, K, progress)
                    plan = cand
                    break
                except torch.OutOfMemoryError as exc:
                    raise out_of_memory(exc, f"the NTK kernel (method {cand.method})") from exc
                except UserError:
                    raise
                except _MODEL_ERRORS as exc:
                    if method != NtkMethod.AUTO:
                        raise UserError(f"method={method.value!r} does not work on this model "
                                        f"({_first_line(exc)}); method='auto' tries the other methods"
                                        ) from None
                    failures.append(f"{cand.method} failed on this model ({_first_line(exc)})")
                    K.zero_()
            notes.extend(f"{f}; the next method was tried" for f in failures)
            if plan is None:
                skipped = [f"{p.method}: {p.reason}" for p in plans if not p.feasible]
                raise UserError("no NTK method works for this model: " + "; ".join(failures + skipped))
            if plan.fallback is not None:
                notes.append(f"layerwise: {len(fallback)} parameter tensor(s) outside "
                             f"Linear/Conv2d/BatchNorm layers via the Jacobian path")
    if not bool(torch.isfinite(K).all()):
        raise _overflow_error(fm.dtype, y_max, f"{kind.value} kernel")
    if kind == NtkKind.FULL:
        K = K.reshape(c.n1 * c.O, c.n2 * c.O)
    if sym:   # exactly symmetric (blocks on the diagonal and NTVP columns carry rounding asymmetry)
        _symmetrize_(K)
    kernel = K.cpu().numpy()
    bn_mode = "eval" if _has_batchnorm(model) else "none"
    return NtkResult(kernel=kernel, kind=kind.value, method=plan.method, n1=c.n1, n2=c.n2,
                     n_outputs=c.O, n_params=fm.n_params, dtype=str(fm.dtype).replace("torch.", ""),
                     wall_time_s=time.perf_counter() - t0,
                     peak_memory_bytes=int(max(plan.peak_bytes, c.check_bytes) + c.kernel_bytes
                                           + fm.copied_bytes),
                     symmetric=sym,
                     n_blocks=plan.n_blocks + (plan.fallback.n_blocks if plan.fallback else 0),
                     schedule=plan.schedule, bn_mode=bn_mode, est_gflop=plan.flops / 1e9,
                     param_filter=None if param_filter is None else repr(param_filter),
                     notes=tuple(notes))


def _independent(fm: FunctionalModel, x: Tensor, notes: list[str]):
    """(fm with BatchNorm statistics fixed where it has none, its structured layers, the
    measuring pass's statistics); raises :class:`UserError` when the forward couples samples."""
    fm, note = fix_batch_statistics(fm, x, chunk=_STAT_CHUNK)
    if note:
        notes.append(note)
    check_sample_independence(fm, x)
    layers = _find_layers(fm)
    stats = _measure(fm, x[:1].clone(), layers)
    return fm, layers, stats


def _calibrated(c: _Ctx, plan: _Plan, free: int, make, notes: list[str]) -> _Plan:
    """``plan``, or the same method re-planned for its measured working set.

    A plan that takes more than an eighth of ``free`` is first run on a block of at most
    ``_TRIAL`` samples under a :class:`probe.runtime.memory.MemoryMeter` (which also shows early that a
    method does not work on the model). When the measured peak exceeds that small plan's estimate
    (by more than ``_TRIAL_SLACK``), the method is re-planned with the budget divided by the
    ratio; raises ``RuntimeError`` (a failure of this method) when it then does not fit.
    """
    if plan.peak_bytes <= free // 8:
        return plan
    m1, m2 = min(c.n1, _TRIAL), min(c.n2, _TRIAL)
    small = _Ctx(c.fm, c.kind, c.x1[:m1], c.x1[:m1] if c.sym else c.x2[:m2], c.sym, c.stats,
                 c.itemsize, c.budget)
    trial = make(small, free)
    if not trial.feasible:
        return plan
    Kt = torch.zeros(_block_shape(c.kind, m1, m1 if c.sym else m2, c.O), dtype=torch.float64,
                     device=c.fm.device)
    with MemoryMeter(c.fm.device) as meter:
        run_plan(small, trial, Kt, None)
    del Kt
    measured, est = meter.peak_bytes, trial.peak_bytes + small.kernel_bytes
    if measured <= est + _TRIAL_SLACK:
        return plan
    ratio = measured / max(est, 1)
    again = make(c, int(free / ratio))
    if not again.feasible:
        raise RuntimeError(f"its measured working set ({_mib(measured)} on {m1} samples, "
                           f"{ratio:.1f}x the estimate) does not fit memory_budget_bytes")
    notes.append(f"{plan.method}: measured working set on {m1} samples {_mib(measured)}, "
                 f"{ratio:.1f}x the estimate; blocks sized for it ({again.schedule})")
    again.peak_bytes = int(again.peak_bytes * ratio)
    return again


# --------------------------------------------------------------------------------------------
# Spectrum
# --------------------------------------------------------------------------------------------


def _targets(y, n_rows: int) -> np.ndarray:
    """Labels/targets as an (n_rows, C) float64 matrix (see :func:`ntk_spectrum`)."""
    y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        classes, idx = np.unique(y, return_inverse=True)
        Y = np.zeros((y.size, classes.size))
        Y[np.arange(y.size), idx] = 1.0
        Y -= Y.mean(0, keepdims=True)
    else:
        Y = y.astype(np.float64).reshape(y.shape[0], -1)
    if Y.shape[0] == n_rows:
        return Y
    if Y.size == n_rows:                       # (N, O) targets against a full (N*O) kernel
        return Y.reshape(n_rows, 1)
    raise UserError(f"targets with {Y.shape[0]} rows do not match a kernel with {n_rows} rows")


@exact
def ntk_spectrum(K, y=None, *, floor: float | None = None) -> SpectrumResult:
    """Eigenvalues and spectrum summaries of a symmetric PSD kernel (float64 throughout).

    ``K``: (n, n) array/tensor, or an :class:`NtkResult` of kind ``trace`` or ``full`` (for
    ``diagonal`` pass ``result.kernel[a]``). The kernel is symmetrised, (K + K^T)/2, to remove
    rounding asymmetry before ``eigvalsh``.

    * ``eigenvalues``: descending.
    * ``floor``: eigenvalues at or below it are numerically zero; default n * eps * lambda_max
      (the rounding level of an eigen-solver in float64).
    * ``condition_number``: lambda_max / smallest eigenvalue above the floor; when some eigenvalues
      are below the floor the kernel is near-singular, ``n_below_floor`` counts them and a note
      says so (the condition number then describes the well-determined part only).
    * ``effective_rank``: exp(entropy of lambda / sum lambda) (Roy & Vetterli 2007), negatives
      clipped to 0; ``participation_ratio``: (sum lambda)^2 / sum lambda^2.
      (These three: :func:`probe.linalg.spectrum_stats`.)
    * ``alignment`` (kernel-target alignment, Cristianini et al. 2002):
      <K, Y Y^T>_F / (||K||_F ||Y Y^T||_F). ``y`` integer class labels (N,) become one-hot,
      centred per class column; float targets (N,) or (N, C) are used as given; against a
      ``full`` kernel (N*O rows), (N, O) targets are flattened sample-major.
    """
    if isinstance(K, NtkResult):
        if K.kind == NtkKind.DIAGONAL.value:
            raise UserError("ntk_spectrum needs a square kernel: pass result.kernel[a] for output a of "
                            "a diagonal kernel, or compute kind='trace'")
        K = K.kernel
    K = np.asarray(K.detach().cpu() if isinstance(K, Tensor) else K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise UserError(f"ntk_spectrum needs a square (n, n) kernel, got shape {K.shape}")
    if not np.isfinite(K).all():
        raise UserError("the kernel has non-finite entries; recompute it in float64")
    n = K.shape[0]
    Ks = 0.5 * (K + K.T)
    ev = dense_eigenvalues(K)                                        # of Ks, descending
    stats = spectrum_stats(ev, floor=floor, name="kernel")
    align = None
    if y is not None:
        Y = _targets(y, n)
        Kn = Ks / max(float(np.abs(Ks).max()), np.finfo(np.float64).tiny)   # alignment is scale-free
        num = float(np.trace(Y.T @ Kn @ Y))
        den = float(np.linalg.norm(Kn) * np.linalg.norm(Y.T @ Y))
        align = num / den if den > 0 else 0.0
    return SpectrumResult(eigenvalues=ev, condition_number=stats.condition_number,
                          effective_rank=stats.effective_rank,
                          participation_ratio=stats.participation_ratio, alignment=align,
                          floor=stats.floor, n_below_floor=stats.n_below_floor,
                          trace=float(np.trace(Ks)), notes=stats.notes)


# --------------------------------------------------------------------------------------------
# Matrix-free top-k
# --------------------------------------------------------------------------------------------


@takes_loader("x")
@exact
def ntk_topk_lanczos(model: nn.Module, x: Tensor, k: int = 20, *, kind: NtkKind | str = "trace",
                     method: LanczosMethod | str = "auto",
                     param_filter: ParamFilter = None, dtype: torch.dtype | str | None = None,
                     device: torch.device | str | None = None,
                     memory_budget_bytes: int | None = None,
                     block_size: int | None = None, block_vectors: int | None = None,
                     max_dim: int | None = None, tol: float | None = None,
                     return_eigenvectors: bool = False, seed: int = 0,
                     output: OutputSelector = None, progress=None) -> LanczosResult:
    """Top-k eigenvalues of the empirical NTK of ``model`` on ``x`` without forming the kernel.

    Block Lanczos (``block_vectors`` = s vectors per step, full reorthogonalisation) over one of
    two operators (:class:`LanczosMethod`): ``gram``, M = J^T J in parameter space, one pass over
    the data per block (per-sample layer rows in closed form); or ``ntvp``, K v = J (J^T v) by
    VJPs and JVPs in sample space. ``auto`` takes ``gram`` when it applies and fits
    ``memory_budget_bytes``, and the VJP/JVP operator when gram does not fit or fails on the
    model (noted). Neither forms an N x N array. A block of s vectors resolves eigenvalues of
    multiplicity up to s (plain Lanczos, s=1, sees each eigenvalue once; a kernel restricted to
    the last layer, kron(H H^T, I_O), repeats each O times with ``kind="full"``); ``s`` defaults to
    min(k, 20) for ``gram`` and min(k, 10) for ``ntvp``, and a note warns when s or more equal
    Ritz values cluster (copies may be missing). Both operators run the one solver,
    :func:`probe.linalg.block_lanczos`. ``output`` selects the tensor of a model that returns a
    mapping or a tuple (:func:`probe.functional.select_output`).

    Convergence: every top-k Ritz residual (||K y - theta y||, or for ``gram`` ||M p - theta p||,
    p in parameter space) <= tol * theta_max; the eigenvalue error is then at most the residual,
    and about residual^2 / gap for separated eigenvalues. ``tol`` defaults to 1e-8 for float64
    and 1e-5 in lower precision, where the operator's own rounding (~1e-6 theta_max in float32)
    puts a floor under the residuals. ``max_dim`` caps the Krylov dimension (default
    max(10k, 100)); when reached, ``converged`` is False and a note says so. ``kind``: ``trace``
    (N x N) or ``full`` (N*O x N*O, sample-major eigenvectors). ``return_eigenvectors`` costs
    ``gram`` one more pass (y = J p / sqrt(theta)). ``block_size`` forces the samples per pass.
    """
    t0 = time.perf_counter()
    kind = _enum(NtkKind, kind, "NTK kind")
    method = _enum(LanczosMethod, method, "Lanczos method")
    if kind == NtkKind.DIAGONAL:
        raise UserError("ntk_topk_lanczos supports kind='trace' or 'full'; for one output's kernel use "
                        "param_filter/a model head with that output")
    for name, val in (("block_vectors", block_vectors), ("block_size", block_size), ("max_dim", max_dim)):
        if val is not None and int(val) < 1:
            raise UserError(f"{name} must be a positive integer, got {val!r}")
    fm = functionalize(model, param_filter=param_filter, dtype=dtype, device=device, output=output)
    memory_budget_bytes = memory_budget(memory_budget_bytes, fm.device, name="memory_budget_bytes")
    notes = []
    if any(m.training for m in model.modules()):
        notes.append("model was in train mode: evaluated in eval mode; modes restored")
    with eval_mode(model):
        x, _, _ = _prepare_inputs(fm, x, None)
        fm, layers, stats = _independent(fm, x, notes)
        O, N, P = stats.n_outputs, x.shape[0], fm.n_params
        n = N * (O if kind == NtkKind.FULL else 1)
        k = int(k)
        if not 1 <= k <= n:
            raise UserError(f"k must be between 1 and {n} (the kernel's size), got {k}")
        if tol is None:
            tol = 1e-8 if fm.dtype == torch.float64 else 1e-5
        it = torch.empty((), dtype=fm.dtype).element_size()
        budget = int(memory_budget_bytes) - fm.copied_bytes
        act_bytes = max(1, 3 * stats.saved_numel * it)
        y_max = _check_finite(fm, x, max(1, min(N, max(budget // 2, act_bytes) // act_bytes)), "x")
        if dtype is None and fm.dtype != torch.float64 and _out_of_range(fm.dtype, y_max):
            res = ntk_topk_lanczos(model, x, k, kind=kind, method=method, param_filter=param_filter,
                                   dtype=torch.float64, device=device,
                                   memory_budget_bytes=memory_budget_bytes, block_size=block_size,
                                   block_vectors=block_vectors, max_dim=max_dim, tol=tol,
                                   return_eigenvectors=return_eigenvectors, seed=seed, output=output,
                                   progress=progress)
            return _promoted(res, t0, fm.dtype, y_max)

        gram = None
        if method in (LanczosMethod.AUTO, LanczosMethod.GRAM):
            c = _Ctx(fm, kind, x, x, True, stats, it, budget)
            good, fallback, bad = _checked_layers(c, layers, budget, notes)
            F = P * (O if kind == NtkKind.TRACE else 1)
            first = max(1, min(int(block_vectors or _default_block(LanczosMethod.GRAM, k)), k))
            # without a given block size, smaller blocks until the basis fits the budget
            for s in ([first] if block_vectors else sorted({first, min(first, 10), min(first, 5),
                                                            min(first, 2), 1}, reverse=True)):
                cap = int(max_dim) if max_dim else max(10 * k, 100)
                cap = F if cap >= F else max(cap // s * s, min(F, -(-k // s) * s + s))
                gram = _plan_gram(c, good, fallback, k, s, cap, n, block_size)
                if gram.feasible:
                    break
            if bad and gram.feasible:
                notes.append(f"gram: {len(bad)} parameter tensor(s) failed the closed-form check "
                             f"and use vmap(jacrev)")
            if gram.feasible and gram.n_blocks < cap:
                notes.append(f"gram: Krylov dimension capped at {gram.n_blocks} by the memory budget")
            if method == LanczosMethod.GRAM and not gram.feasible:
                raise UserError(f"method='gram' cannot run: {gram.reason}; raise memory_budget_bytes "
                                f"(budget {_mib(budget)}) or use method='ntvp'")
        gram_failed = None
        if gram is not None and gram.feasible:
            plan = gram
            sweeps_max = -(-plan.n_blocks // s) + (1 if return_eigenvectors else 0)
            try:
                with _progress(N * sweeps_max, f"ntk lanczos ({kind.value}, gram, {s} vectors/pass)",
                               progress) as pbar:
                    ddp = current()
                    if ddp.active and N >= ddp.world:   # M = sum over samples: each rank its part
                        op = _ShardedGram(_GramOperator(fm, x[ddp.shard(N)], kind, O, plan.layers, plan.groups[0],
                                                        plan.block, plan.chunk, pbar), ddp)
                        notes.append(f"gram: products by data shards over {ddp.world} ranks")
                    else:
                        op = _GramOperator(fm, x, kind, O, plan.layers, plan.groups[0], plan.block,
                                           plan.chunk, pbar)
                    # a parameter space smaller than k holds only F non-zero eigenvalues
                    eig = block_lanczos(_finite(op, fm.dtype, y_max, "parameter-space operator J^T J"),
                                        min(k, op.size), block_size=s, max_dim=plan.n_blocks, tol=tol,
                                        seed=seed, return_vectors=return_eigenvectors)
                    Y = None
                    if return_eigenvectors:                 # y = J p / ||J p||, p the Ritz vectors
                        JY = op.rows_times(eig.vectors).to(torch.float64).cpu().numpy()  # (n, k)
                        Y = JY / np.maximum(np.linalg.norm(JY, axis=0), 1e-300)
            except torch.OutOfMemoryError as exc:
                raise out_of_memory(exc, "the NTK Lanczos (gram operator)") from exc
            except UserError:
                raise
            except _MODEL_ERRORS as exc:
                if method == LanczosMethod.GRAM:
                    raise UserError(f"method='gram' does not work on this model ({_first_line(exc)}); "
                                    f"method='auto' tries the VJP/JVP operator") from None
                gram_failed = _first_line(exc)
                notes.append(f"gram failed on this model ({gram_failed}); VJP/JVP products instead")
        if gram is not None and gram.feasible and gram_failed is None:
            if op.outputs_looped:
                notes.append(f"gram: the {O} output gradients one backward pass each (batching them "
                             f"failed: {op.outputs_looped})")
            if not eig.converged:
                notes.append(f"not converged within a Krylov dimension of {eig.dim}: raise max_dim or "
                             f"memory_budget_bytes (largest residual {eig.residuals.max():.3g})")
            notes.extend(eig.notes)
            return LanczosResult(eigenvalues=eig.eigenvalues, eigenvectors=Y, residuals=eig.residuals,
                                 n_matvecs=op.matvecs, converged=eig.converged, kind=kind.value, n=N,
                                 n_outputs=O, n_params=P, dtype=str(fm.dtype).replace("torch.", ""),
                                 wall_time_s=time.perf_counter() - t0,
                                 peak_memory_bytes=int(plan.peak_bytes), block_vectors=s,
                                 subspace_dim=eig.dim, method=LanczosMethod.GRAM.value,
                                 n_passes=op.sweeps, notes=tuple(notes))
        if gram is not None and method == LanczosMethod.AUTO and gram_failed is None:
            notes.append(f"gram operator not used ({gram.reason}): VJP/JVP products instead")

        first = max(1, min(int(block_vectors or _default_block(LanczosMethod.NTVP, k)), k))
        # without a given block size, smaller blocks until the tangents fit the budget
        for s in ([first] if block_vectors else sorted({first, min(first, 5), min(first, 2), 1},
                                                         reverse=True)):
            dim_cap = min(n, int(max_dim) if max_dim else max(10 * k, 100))
            dim_cap = max(dim_cap, min(n, k + s))
            m = s * (O if kind == NtkKind.TRACE else 1)        # vectors pushed through at once
            # tangents, gradient; the float64 basis, ~4 blocks of work and the projection T
            fixed = (m + 2) * P * it + 8 * (n * (dim_cap + 4 * s) + dim_cap ** 2)
            # per sample: the VJP's forward graph and backward wave; the JVPs (O tangents at a
            # time) keep no graph, only a few layers' primal and tangent activations
            per_sample = int(((2 + min(m, O) / 2) * stats.saved_numel + 2 * m * O) * it)
            free = budget - fixed
            if free >= per_sample:
                break
        if s < first:
            notes.append(f"ntvp: {s} vector(s) per block (not {first}) to fit the memory budget; a "
                         f"block of s resolves eigenvalues repeated at most s times")
        b = int(block_size) if block_size else (free // per_sample if free > 0 else 0)
        if b < 1 or free < per_sample:
            need = fixed + per_sample
            raise UserError(f"matrix-free NTK needs at least {_mib(need)} (tangents {m} x P={P}, "
                            f"Lanczos basis, one sample's activations) but memory_budget_bytes is "
                            f"{_mib(memory_budget_bytes)}; raise it"
                            + (" or use block_vectors=1" if s > 1 else ""))
        # beyond a few hundred samples per block the passes get memory-bound (measured on CPU:
        # 2000-sample blocks ~1.4x slower per sample than 250-500)
        b = min(b, N, _LANCZOS_MAX_BLOCK) if not block_size else min(b, N)
        op = _NtkOperator(fm, x, kind, O, b, dist=current())
        if op.dist is not None:
            notes.append(f"ntvp: products by data shards over {op.dist.world} ranks")
        try:
            with _progress(dim_cap, f"ntk lanczos ({kind.value}, ntvp)", progress) as pbar:
                eig = block_lanczos(_finite(op, fm.dtype, y_max, "NTK-vector product"), k,
                                    block_size=s, max_dim=dim_cap, tol=tol, seed=seed,
                                    return_vectors=return_eigenvectors, progress=pbar.update)
        except torch.OutOfMemoryError as exc:
            raise out_of_memory(exc, "the NTK Lanczos (ntvp operator)") from exc
        except UserError:
            raise
        except _MODEL_ERRORS as exc:
            tried = f"; gram failed too ({gram_failed})" if gram_failed else (
                f"; the gram operator could not run ({gram.reason})" if gram is not None else "")
            raise UserError(f"the ntvp (VJP/JVP) NTK operator does not work on this model "
                            f"({_first_line(exc)}){tried}") from None
    if op.looped:
        notes.append(f"ntvp: products one vector at a time ({op.looped})")
    if op.pushforward is not None and op.pushforward.reverse:
        notes.append(f"ntvp: the model has no forward-mode AD ({op.pushforward.reason}): J t by a "
                     f"VJP of the VJP")
    if not eig.converged:
        notes.append(f"not converged within a Krylov dimension of {eig.dim}: raise max_dim "
                     f"(largest residual {eig.residuals.max():.3g})")
    notes.extend(eig.notes)
    Y = eig.vectors.cpu().numpy() if return_eigenvectors else None                 # (n, k) float64
    return LanczosResult(eigenvalues=eig.eigenvalues, eigenvectors=Y, residuals=eig.residuals,
                         n_matvecs=op.matvecs, converged=eig.converged, kind=kind.value, n=N,
                         n_outputs=O, n_params=P, dtype=str(fm.dtype).replace("torch.", ""),
                         wall_time_s=time.perf_counter() - t0,
                         peak_memory_bytes=int(fixed + b * per_sample), block_vectors=s,
                         subspace_dim=eig.dim, method=LanczosMethod.NTVP.value,
                         n_passes=2 * -(-op.matvecs // s), notes=tuple(notes))


def _finite(op: SymmetricOperator, dtype: torch.dtype, y_max: float, what: str) -> CallableOperator:
    """``op`` with every product checked: a non-finite one raises the overflow error (the kernel
    left ``dtype``'s range) instead of feeding inf/nan to the solver."""
    def checked(V: Tensor) -> Tensor:
        W = op.matmat(V)
        if not bool(torch.isfinite(W).all()):
            raise _overflow_error(dtype, y_max, what)
        return W
    return CallableOperator(checked, op.size, dtype=op.dtype, device=op.device)
