"""Small helpers of the NTK probe: cost-model constants, ranges, inputs, finiteness and overflow."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
from torch import Tensor, nn

from probe.errors import UserError
from probe.runtime.memory import out_of_memory
from probe.functional import FunctionalModel

# Cost-model constants (multiples of one sample's forward FLOPs [FP]):
_BWD_FP = 2.0        # a backward pass: input gradients + weight gradients
_JVP_FP = 2.5        # a forward-mode pass: primal + tangent
_VMAP_OVERHEAD = 1.5  # per-sample (vmapped) kernels vs one batched kernel, measured on CPU convs
_LANCZOS_MAX_BLOCK = 512  # samples per block in the matrix-free operator (throughput, not memory)
_GRAM_MAX_CHUNK = 32      # samples whose generic layer rows are formed at once (gram operator)
_GRAM_BLOCK = 20          # default vectors per block of the gram operator
_NTVP_BLOCK = 10          # default vectors per block of the VJP/JVP operator
_GRAM_ROW_BYTES = 6 << 20  # CPU only: a block of weight rows formed at once (~6 MB: stays in the L3 cache;
                           # a GPU forms a sub-chunk's rows per layer and output in one batched product)


def _fro(a: np.ndarray) -> float:
    """Frobenius norm without overflow for entries beyond 1e154."""
    m = float(np.abs(a).max()) if a.size else 0.0
    return m * float(np.linalg.norm(a / m)) if m > 0 and np.isfinite(m) else m


def _enum(cls, value, what: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise UserError(f"unknown {what} {value!r}; choose one of: {choices}") from None


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ranges(n: int, b: int) -> list[tuple[int, int]]:
    b = max(1, int(b))
    return [(i, min(n, i + b)) for i in range(0, n, b)]


class _progress:
    """Counts units of work and reports them as ``progress(desc, done, total)`` (the library's
    progress callback, see :data:`probe.runtime.progress.Progress`; ``None`` is silent)."""

    def __init__(self, total: int, desc: str, progress=None):
        self.total, self.desc, self.report, self.done = int(total), desc, progress, 0

    def __enter__(self) -> "_progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.report is not None and exc[0] is None and self.done < self.total:
            self.report(self.desc, self.total, self.total)  # finished early (converged, fewer blocks)

    def update(self, k: int = 1) -> None:
        self.done = min(self.total, self.done + int(k))
        if self.report is not None:
            self.report(self.desc, self.done, self.total)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())


def _check_finite(fm: FunctionalModel, x: Tensor, chunk: int, which: str, ddp=None) -> float:
    """Raise on non-finite model outputs; return the largest |output|. The chunks' checks and
    maxima stay on the device and come to the host once, after the last chunk. ``ddp`` (an
    active :class:`~probe.runtime.dist.Dist`): each rank checks its share of the samples and the
    ranks exchange (first non-finite sample, largest |output|), so that every rank raises the
    same error or returns the same maximum."""
    start = 0
    if ddp is not None:
        part = ddp.shard(x.shape[0])
        x, start = x[part], part.start
    ok, tops = [], []
    with torch.no_grad():
        for lo, hi in _ranges(x.shape[0], chunk):
            y = fm(fm.params, x[lo:hi])
            ok.append(torch.isfinite(y).all())
            if y.numel():
                tops.append(y.abs().max().to(torch.float64))
    bad = -1
    if ok and not bool(torch.stack(ok).all()):
        lo, hi = _ranges(x.shape[0], chunk)[int(torch.stack(ok).logical_not().nonzero()[0, 0])]
        with torch.no_grad():
            y = fm(fm.params, x[lo:hi])
        bad = start + lo + ((~torch.isfinite(y.reshape(hi - lo, -1))).any(1).nonzero().flatten().tolist() or [0])[0]
    top = max(0.0, float(torch.stack(tops).max())) if tops else 0.0
    if ddp is not None:
        every = ddp.all_gather((bad, top))
        bad = min((b for b, _ in every if b >= 0), default=-1)
        top = max(t for _, t in every)
    if bad >= 0:
        raise UserError(f"model outputs are not finite on the probe inputs ({which}, e.g. sample "
                        f"{bad}); check the checkpoint and the input normalisation")
    return top


def _out_of_range(dtype: torch.dtype, y_max: float) -> bool:
    """Whether outputs of size ``y_max`` put the kernel beyond ``dtype``'s range. The kernel
    grows like the squared output times sum_theta (d log f / d theta)^2 (seen: 1e6 y_max^2 for a
    multiplicative ResNet-20), so float32 is given up from outputs of ~1.8e12 on (sqrt of its
    largest value, 1.8e19, times 1e-7)."""
    return y_max > math.sqrt(torch.finfo(dtype).max) * 1e-7


def _promotion_note(dtype: torch.dtype, y_max: float) -> str:
    name = str(dtype).replace("torch.", "")
    return (f"model outputs reach {y_max:.3g}: the kernel would overflow {name}, so it was computed "
            f"in float64 (pass dtype= to choose)")


def _promoted(res, t0: float, dtype: torch.dtype, y_max: float):
    """The float64 re-run's result, timed from the first call and carrying the reason."""
    return dataclasses.replace(res, wall_time_s=time.perf_counter() - t0,
                               notes=(_promotion_note(dtype, y_max), *res.notes))


def _overflow_error(dtype: torch.dtype, y_max: float, what: str) -> UserError:
    name = str(dtype).replace("torch.", "")
    hint = "pass dtype=torch.float64" if dtype != torch.float64 else "rescale the model or its inputs"
    return UserError(f"the {what} overflowed {name} (model outputs reach {y_max:.3g}); {hint}")


def _prepare_inputs(fm: FunctionalModel, x1, x2) -> tuple[Tensor, Tensor, bool]:
    x1 = fm.prepare(x1)
    if x1.dim() < 1 or x1.shape[0] < 1:
        raise UserError(f"x1 must have a leading sample axis with at least one sample, got shape "
                        f"{tuple(x1.shape)}")
    if x2 is None:
        return x1, x1, True
    x2 = fm.prepare(x2)
    if x2.dim() != x1.dim() or x2.shape[1:] != x1.shape[1:] or x2.shape[0] < 1:
        raise UserError(f"x2 samples have shape {tuple(x2.shape[1:])} but x1 samples "
                        f"{tuple(x1.shape[1:])}; both must be (N, ...) with the same sample shape")
    return x1, x2, False



#: Exceptions by which a model says a transform does not work on it (no forward-mode AD, no
#: batching rule, a shape error under vmap); :class:`UserError` is ours and never one of them, and
#: ``torch.OutOfMemoryError`` (a ``RuntimeError``) is caught before them: running out of memory is
#: not the model's answer, it is raised as :class:`probe.errors.OutOfMemory`.
_MODEL_ERRORS = (NotImplementedError, RuntimeError, ValueError, TypeError, IndexError)


def _first_line(exc: BaseException, limit: int = 240) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{type(exc).__name__}: {text[:limit]}"


def _attempt(fn, what: str):
    """``(fn(), "")``, or ``(None, why)`` when the model says the transform in ``fn`` does not
    apply to it (:data:`_MODEL_ERRORS`; the caller falls back). Running out of memory raises
    :class:`probe.errors.OutOfMemory` naming ``what``; a :class:`UserError` passes through."""
    try:
        return fn(), ""
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(exc, what) from exc
    except UserError:
        raise
    except _MODEL_ERRORS as exc:
        return None, _first_line(exc)


class _SampleJacobian:
    """Per-sample Jacobians of the flattened outputs with respect to a parameter subset:
    ``jac(sub, x)`` -> {name: (n, O, *shape)}. ``vmap(jacrev)`` over the samples where the model
    allows it; where it does not (e.g. ``nn.GRU`` under vmap) a loop of ``jacrev`` over the
    samples, remembered for the later calls (``looped`` and ``reason`` say so)."""

    def __init__(self, fm: FunctionalModel, names):
        from torch.func import jacrev, vmap

        sub_names = set(names)
        rest = {n: p for n, p in fm.params.items() if n not in sub_names}

        def f(ps, xi):
            return fm.single({**rest, **ps}, xi)

        self._one = jacrev(f)
        self._vmapped = vmap(self._one, in_dims=(None, 0))
        self.looped, self.reason = False, ""

    def __call__(self, sub: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        if not self.looped:
            out, why = _attempt(lambda: self._vmapped(sub, x), "the per-sample Jacobians (vmap over the samples)")
            if not why:
                return out
            self.looped, self.reason = True, why
        rows = [self._one(sub, x[i]) for i in range(x.shape[0])]
        return {k: torch.stack([r[k] for r in rows]) for k in sub}


class _Pushforward:
    """Jacobian-vector products t -> J t of a batched forward ``f(params, xb)``.

    Forward mode (``jvp``) where the model supports it; where it does not (the eval-mode fast
    paths of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` have no forward-mode AD)
    the double-VJP identity J t = d/dc <J^T c, t>: a VJP of the VJP, which costs a backward pass
    more and needs only reverse mode. The mode is decided once, on the first sample
    (``reverse`` and ``reason`` say which and why)."""

    def __init__(self, f, params: dict[str, Tensor], x0: Tensor):
        from torch.func import jvp

        self.f, self.params = f, params
        self.reverse, self.reason = False, ""
        tangent = {k: torch.zeros_like(p) for k, p in params.items()}
        _, why = _attempt(lambda: jvp(lambda p: f(p, x0[:1]), (params,), (tangent,)),
                          "the forward-mode (jvp) check on one sample")
        if why:
            self.reverse, self.reason = True, why
            self._check(x0[:2])

    def _check(self, xb: Tensor) -> None:
        """<J t, c> = <t, J^T c> for random t and c: a custom backward that is not linear-traceable
        in its incoming gradient (``g.detach()``) would make the VJP of the VJP silently wrong."""
        from torch.func import vjp

        gen = torch.Generator().manual_seed(0)

        def rand(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.device, like.dtype)
        t = {k: rand(p) for k, p in self.params.items()}
        push = self.at(xb)
        with torch.no_grad():
            out = self.f(self.params, xb)
        c = rand(out)
        _, fn = vjp(lambda p: self.f(p, xb), self.params)
        jt, jtc = push(t), fn(c)[0]
        lhs = float((jt.double() * c.double()).sum())
        rhs = sum(float((t[k].double() * jtc[k].double()).sum()) for k in t)
        scale = max(abs(rhs), float(jt.double().norm() * c.double().norm()), 1e-300)
        tol = 1e-8 if out.dtype == torch.float64 else 1e-3
        if not abs(lhs - rhs) <= tol * scale:
            raise RuntimeError(f"the model's backward pass is not differentiable in the incoming "
                               f"gradient (a VJP of the VJP gives <Jt, c> = {lhs:.6g} against "
                               f"<t, J^T c> = {rhs:.6g}) and it has no forward-mode AD "
                               f"({self.reason})")

    def at(self, xb: Tensor):
        """The function t -> J t at the samples ``xb`` (vmap it over tangents)."""
        from torch.func import jvp, vjp

        f, params = self.f, self.params
        if not self.reverse:
            return lambda t: jvp(lambda p: f(p, xb), (params,), (t,))[1]
        # fused attention kernels have no double backward: the composite (math) one has
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            out, fn = vjp(lambda p: f(p, xb), params)
            _, fn2 = vjp(lambda cot: fn(cot)[0], torch.zeros_like(out))

        def push(t):
            with sdpa_kernel(SDPBackend.MATH):
                return fn2(t)[0]
        return push
