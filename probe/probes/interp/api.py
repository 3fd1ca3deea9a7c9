"""Input-space interpolation: the function a model computes between real samples (``probe interp``).

Do multiplicative networks learn smoother or rougher functions near and between real samples than
additive ones? This probe measures the shape of the fitted function along mixup paths and over
the plane through three samples, as numbers two models can be compared by.

**Pairs.** From the samples ``(x, y)`` (the test split in the probe) ``pairs`` unordered pairs of
distinct samples are drawn, seeded: ``round(pairs * same_class_fraction)`` pairs of the same label
and the rest of different labels, each without repetition (a same-class pair is drawn by picking a
class with probability proportional to its number of pairs, then two distinct samples of it; a
different-class pair likewise from a pair of classes). Asking for more pairs of a kind than the
samples hold is an error. Paths are ordered same-class first; within a pair ``a < b`` (sample
indices).

**Paths.** Along ``x(t) = (1 - t) x_a + t x_b`` on ``steps`` equally spaced ``t`` in ``[0, 1]``
(both ends included) the probe records the logits ``f(x(t))`` (C,), their softmax, the predicted
class (argmax) and the cross-entropies ``CE_a(t) = CE(f(x(t)), y_a)``, ``CE_b(t) = CE(f(x(t)), y_b)``.

* **Mixup loss** ``L(t) = (1 - t) CE_a(t) + t CE_b(t)`` (for a same-class pair simply the
  cross-entropy of the common label); its **barrier** is
  ``max_t [L(t) - ((1 - t) L(0) + t L(1))]`` (the loss above the straight line between the end
  losses, as in linear mode connectivity; >= 0, since it is 0 at both ends).
* **Deviation from linearity** ``dev(t) = ||f(x(t)) - ((1 - t) f(x_a) + t f(x_b))||_2 /
  ||f(x_b) - f(x_a)||_2``: the Euclidean norm over the C logits of the gap to the chord between
  the end outputs, relative to the length of that chord (so it is scale-free, and 0 for every
  affine function of the input). Per path ``deviation_max = max_t dev(t)`` and ``deviation_mean``,
  the trapezoidal mean over ``t`` in ``[0, 1]`` (``int_0^1 dev(t) dt`` on the grid). A pair whose
  end outputs coincide has no chord: its deviations are NaN, left out of every mean and counted as
  ``degenerate``. Closed form for ``f_k(x) = (w_k . x)^2``: ``dev(t) = t (1 - t) ||beta^2|| /
  ||2 alpha beta + beta^2||`` with ``alpha_k = w_k . x_a``, ``beta_k = w_k . (x_b - x_a)``.
* **Polynomial degree.** ``t`` is mapped to ``s = 2 t - 1`` in ``[-1, 1]``; the logits along the
  path (T, C) are fitted by least squares with Chebyshev polynomials of degree ``d = 0, 1, ...,
  max_degree`` (one orthonormal basis from the QR decomposition of the Chebyshev-Vandermonde
  matrix, residuals by successive projection: numerically stable up to ``d = steps - 2``). The fit
  error is ``err_d = ||Y - Y_d||_F / ||Y - Y_0||_F``, the part of the path's variation the
  degree-d fit leaves unexplained (``Y_0`` is the mean over the path: ``err_0 = 1``). The path's
  **degree** is the lowest ``d`` with ``err_d <= degree_tol``, or ``max_degree + 1`` ("above")
  when none fits. A path along which the logits do not vary (variation <= 100 machine epsilons of
  ``||Y||_F``) has degree 0.
* **Class changes**: the number of steps at which the predicted class differs from the previous
  step. The ends *require* one change when the predicted classes at ``t = 0`` and ``t = 1`` differ
  and none otherwise (for correctly classified ends: 0 for a same-class pair, 1 for a
  different-class pair); an **extra class change** is a path with more changes than that.

**Planes.** For ``triples`` seeded triples ``(x_a, x_b, x_c)`` (three different labels when the
samples have three classes, else three distinct samples) the predicted class and the largest
softmax probability on the grid ``x_a + u (x_b - x_a) + v (x_c - x_a)``, ``u, v`` each on
``plane_resolution`` equally spaced points in ``[-plane_margin, 1 + plane_margin]`` (the affine
frame: the samples sit at ``(0, 0)``, ``(1, 0)``, ``(0, 1)``; it is not orthonormal, the lengths
and the cosine of the two edges are stored). Arrays are indexed ``[triple, v, u]``.

**Summary.** Per group (``same_class``, ``different_class``, ``all``): mean and median of the
per-path maximal and mean deviation, mean and median degree and the fraction of paths above
``max_degree``, the fraction of paths with an extra class change, mean class changes, mean and
median loss barrier, mean mixup loss, and the accuracy at the path ends.

Every forward pass is batched: the path points of many pairs (and the grid points of the planes)
are generated on the fly in chunks of ``batch_size`` inputs. The model runs through
:func:`torch.func.functional_call` in eval mode with explicit buffers and is never changed; a
BatchNorm without running statistics has them held fixed at those of the samples ``x``; a forward
that couples the samples of a batch is refused.

    >>> r = interpolation_paths(model, x_test, y_test, pairs=64, steps=33)
    >>> r.deviation_max        # (P,) per path
    >>> r.summary()["different_class"]["deviation_max_mean"]
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import Tensor, nn

from probe.checks import check_int, check_number
from probe.errors import UserError
from probe.runtime.precision import exact
from probe.functional import FunctionalModel, OutputSelector, check_sample_independence, fix_batch_statistics
from probe.probes.interp.result import InterpResult
from probe.probes.registry import Progress
from probe.inputs import takes_loader

__all__ = ["interpolation_paths", "check_options"]

_MAX_PAIRS = 1_000_000
_MAX_STEPS = 10_000


def check_options(*, pairs, same_class_fraction, steps, degree_tol, max_degree, triples, plane_resolution,
                  plane_margin, batch_size) -> None:
    """Raise :class:`UserError` on a bad option of :func:`interpolation_paths` (the messages name the option)."""
    check_int("pairs", pairs, 1, _MAX_PAIRS)
    check_number("same_class_fraction", same_class_fraction, 0.0, 1.0)
    check_int("steps", steps, 2, _MAX_STEPS)
    check_number("degree_tol", degree_tol, 0.0, 1.0, lo_open=True, hi_open=True)
    check_int("max_degree", max_degree, 0, _MAX_STEPS)
    if max_degree > steps - 2:
        raise UserError(f"max_degree must be at most steps - 2 = {steps - 2} (a polynomial of degree "
                        f"steps - 1 passes through every point), got {max_degree}")
    check_int("triples", triples, 0, 10_000)
    check_int("plane_resolution", plane_resolution, 2, 2_000)
    check_number("plane_margin", plane_margin, 0.0, 100.0)
    check_int("batch_size", batch_size, 1, 1 << 24)


# --- sampling pairs and triples -----------------------------------------------------------------


def _draw_pairs(rng: np.random.Generator, groups: list[np.ndarray], count: int, same: bool) -> np.ndarray:
    """``count`` distinct unordered pairs (count, 2) of sample indices, ``a < b``: both of one group
    (``same``) or of two different groups; drawn group(s) first (weighted by their pair counts),
    then samples uniformly, duplicates redrawn. Order: as drawn."""
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    if same:
        weights = (sizes * (sizes - 1) // 2).astype(np.float64)
        keys_a = np.flatnonzero(weights > 0)
        probs = weights[keys_a] / weights[keys_a].sum()
    else:
        ia, ib = np.triu_indices(len(groups), 1)
        weights = (sizes[ia] * sizes[ib]).astype(np.float64)
        ok = weights > 0
        ia, ib, weights = ia[ok], ib[ok], weights[ok]
        probs = weights / weights.sum()
    total = int(round(float(weights.sum())))
    if 2 * count >= total:             # few pairs exist: enumerate them all and choose
        every = []
        if same:
            for g in groups:
                if len(g) > 1:
                    i, j = np.triu_indices(len(g), 1)
                    every.append(np.stack([g[i], g[j]], 1))
        else:
            for a, b in zip(ia, ib):
                every.append(np.stack(np.meshgrid(groups[a], groups[b], indexing="ij"), -1).reshape(-1, 2))
        every = np.sort(np.concatenate(every), axis=1)
        return every[rng.permutation(len(every))[:count]]
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < count:
        m = 2 * (count - len(out)) + 8
        if same:
            cls = keys_a[rng.choice(len(keys_a), size=m, p=probs)]
            for c in cls:
                g = groups[c]
                i, j = rng.choice(len(g), size=2, replace=False)
                key = (int(min(g[i], g[j])), int(max(g[i], g[j])))
                if key not in seen:
                    seen.add(key)
                    out.append(key)
                    if len(out) == count:
                        break
        else:
            pick = rng.choice(len(ia), size=m, p=probs)
            for k in pick:
                ga, gb = groups[ia[k]], groups[ib[k]]
                i, j = int(ga[rng.integers(len(ga))]), int(gb[rng.integers(len(gb))])
                key = (min(i, j), max(i, j))
                if key not in seen:
                    seen.add(key)
                    out.append(key)
                    if len(out) == count:
                        break
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _select_pairs(y: np.ndarray, pairs: int, same_class_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index (P, 2) int64, same (P,) bool)``, same-class pairs first."""
    n_same = int(math.floor(pairs * same_class_fraction + 0.5))
    n_diff = pairs - n_same
    classes = np.unique(y)
    groups = [np.flatnonzero(y == c) for c in classes]
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    avail_same = int((sizes * (sizes - 1) // 2).sum())
    n = len(y)
    avail_diff = n * (n - 1) // 2 - avail_same
    for want, have, kind in ((n_same, avail_same, "same-class"), (n_diff, avail_diff, "different-class")):
        if want > have:
            raise UserError(f"{pairs} pairs with same_class_fraction {same_class_fraction:g} need {want} "
                            f"{kind} pairs, but the {n} samples ({len(classes)} classes) hold only {have}: "
                            f"ask for fewer pairs, change same_class_fraction or give more samples")
    rng = np.random.default_rng([seed, 0])
    same_idx = _draw_pairs(rng, groups, n_same, True) if n_same else np.zeros((0, 2), np.int64)
    diff_idx = _draw_pairs(rng, groups, n_diff, False) if n_diff else np.zeros((0, 2), np.int64)
    index = np.concatenate([same_idx, diff_idx]).astype(np.int64)
    same = np.concatenate([np.ones(n_same, bool), np.zeros(n_diff, bool)])
    return index, same


def _select_triples(y: np.ndarray, triples: int, seed: int) -> np.ndarray:
    """(K, 3) sample indices: three different labels when there are three classes, else three distinct samples."""
    if triples == 0:
        return np.zeros((0, 3), np.int64)
    n = len(y)
    if n < 3:
        raise UserError(f"a plane needs three samples, got {n}; set triples to 0 or give more samples")
    rng = np.random.default_rng([seed, 1])
    classes = np.unique(y)
    groups = [np.flatnonzero(y == c) for c in classes]
    out = np.zeros((triples, 3), np.int64)
    for k in range(triples):
        if len(classes) >= 3:
            for j, c in enumerate(rng.choice(len(classes), size=3, replace=False)):
                out[k, j] = groups[c][rng.integers(len(groups[c]))]
        else:
            out[k] = rng.choice(n, size=3, replace=False)
    return out


# --- the model as a batched function ------------------------------------------------------------


def _functional(model: nn.Module, dtype: torch.dtype, device: torch.device, output: OutputSelector) -> FunctionalModel:
    """Every parameter held fixed (detached; shared when dtype and device match), buffers copied."""
    def cast(t: Tensor, copy: bool) -> Tensor:
        t = t.detach()
        want = dtype if t.is_floating_point() else t.dtype
        if not copy and t.dtype == want and t.device == device:
            return t
        return t.to(device=device, dtype=want, copy=True)

    fixed = {n: cast(p, False) for n, p in model.named_parameters()}
    buffers = {n: cast(b, True) for n, b in model.named_buffers()}
    return FunctionalModel(model=model, params={}, fixed=fixed, buffers=buffers, dtype=dtype, device=device,
                           output=output)


def _logits(fm: FunctionalModel, xb: Tensor) -> Tensor:
    """(M, C) outputs of a batch, checked to be logits of the batch."""
    with torch.no_grad():
        out = fm(fm.params, xb)
    m = xb.shape[0]
    if out.dim() != 2 or out.shape[0] != m or out.shape[1] < 1:
        raise UserError(f"the model's output for a batch of {m} inputs has shape {tuple(out.shape)}; "
                        f"interpolation needs class logits of shape ({m}, C)")
    return out


class _Batches:
    """Runs generated inputs through the model in chunks, reporting progress over all of them."""

    def __init__(self, fm: FunctionalModel, batch_size: int, total: int, progress: Progress | None):
        self.fm, self.batch_size, self.total, self.done, self.progress = fm, batch_size, total, 0, progress

    def run(self, count: int, make) -> Tensor:
        """Outputs (count, C) of ``make(lo, hi)`` -> inputs (hi - lo, ...) for consecutive ranges
        (shared out over the ranks under ``torchrun``, :func:`probe.runtime.chunks.map_chunks`)."""
        from probe.runtime.dist import current
        from probe.runtime.chunks import map_chunks

        ddp = current()
        starts = list(range(0, count, self.batch_size))
        end = lambda i: min(count, starts[i] + self.batch_size)               # noqa: E731

        def chunk(i: int) -> Tensor:
            out = _logits(self.fm, make(starts[i], end(i)))
            return out.cpu() if ddp.active else out

        outs, _ = map_chunks(len(starts), chunk, piece=lambda i: f"batch-{i}", dist=ddp, progress=self.progress,
                             desc="interp", done_of=lambda i, d=self.done: d + end(i), total=self.total)
        self.done += count
        return torch.cat([o.to(self.fm.device) for o in outs])


# --- the measurements ---------------------------------------------------------------------------


def _chebyshev_q(steps: int, max_degree: int) -> np.ndarray:
    """(T, D + 1) orthonormal basis of the polynomials of degree <= d in its first d + 1 columns,
    on the grid s = 2 t - 1 (QR of the Chebyshev-Vandermonde matrix, so nested by degree)."""
    s = np.linspace(-1.0, 1.0, steps)
    q, r = np.linalg.qr(np.polynomial.chebyshev.chebvander(s, max_degree))
    return q * np.sign(np.diag(r))                      # (T, D + 1) fixed sign: reproducible


def _fit_errors(logits: np.ndarray, max_degree: int, eps: float) -> np.ndarray:
    """(P, D + 1) ``err_d = ||Y - Y_d||_F / ||Y - Y_0||_F`` of each path's logits (P, T, C); rows of
    paths without variation are 0."""
    P, T, _ = logits.shape
    q = _chebyshev_q(T, max_degree)                     # (T, D + 1)
    res = logits.astype(np.float64, copy=True)          # (P, T, C)
    errs = np.zeros((P, max_degree + 1))
    scale = np.sqrt((res ** 2).sum(axis=(1, 2)))        # (P,) ||Y||_F
    base = None
    for d in range(max_degree + 1):
        coef = np.einsum("t,ptc->pc", q[:, d], res)     # (P, C) projection on the d-th basis vector
        res -= q[None, :, d, None] * coef[:, None, :]
        norm = np.sqrt((res ** 2).sum(axis=(1, 2)))     # (P,)
        if d == 0:
            base = norm
        errs[:, d] = norm
    flat = base <= 100.0 * eps * scale                  # (P,) no variation along the path
    with np.errstate(invalid="ignore", divide="ignore"):
        errs = np.where(flat[:, None], 0.0, errs / np.where(flat, 1.0, base)[:, None])
    return errs


def _softmax_ce(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """float64 softmax (.., C) and cross-entropy (..) of logits against labels y (..)."""
    z = logits.to(torch.float64)
    logp = torch.log_softmax(z, dim=-1)
    return logp.exp(), -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


@takes_loader("x", "y")
@exact
def interpolation_paths(model: nn.Module, x: Tensor, y: Tensor, *, pairs: int = 64, steps: int = 33,
                        same_class_fraction: float = 0.5, degree_tol: float = 0.01, max_degree: int = 12,
                        triples: int = 3, plane_resolution: int = 41, plane_margin: float = 0.25,
                        seed: int = 0, batch_size: int = 512, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, output: OutputSelector = None,
                        progress: Progress | None = None) -> "InterpResult":
    """The model's outputs along mixup paths between seeded pairs of the samples ``x`` (N, ...)
    with labels ``y`` (N,) int, and over planes through seeded triples (definitions: the module
    docstring).

    ``dtype`` of the forward passes (``None``: the model's floating dtype; inputs are cast to it);
    ``device`` where they run (``None``: the model's); ``output`` selects the logits of a model
    returning a mapping or tuple (:func:`probe.functional.select_output`). Progress is reported as
    ``progress("interp", inputs_done, inputs_total)``. The model is not changed. Raises
    :class:`UserError` on bad options, too few samples for the pairs asked, labels outside the
    model's classes, outputs that are not ``(M, C)`` logits or are not finite.
    """
    t0 = time.perf_counter()
    check_options(pairs=pairs, same_class_fraction=same_class_fraction, steps=steps, degree_tol=degree_tol,
                  max_degree=max_degree, triples=triples, plane_resolution=plane_resolution,
                  plane_margin=plane_margin, batch_size=batch_size)
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() < 2 or not x.is_floating_point():
        raise UserError(f"x must be floating inputs (N, ...) with a sample axis, got {x.dtype} of shape "
                        f"{tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise UserError(f"y must be integer labels (N,) for the {x.shape[0]} samples, got {y.dtype} of shape "
                        f"{tuple(y.shape)}")
    n = int(x.shape[0])
    if n < 2:
        raise UserError(f"paths need at least two samples, got {n}")
    from probe.functional import resolve_model_device, resolve_model_dtype

    dt, dev = resolve_model_dtype(model, dtype), resolve_model_device(model, device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    y_np = y.detach().cpu().numpy().astype(np.int64)
    index, same = _select_pairs(y_np, pairs, same_class_fraction, seed)
    tri = _select_triples(y_np, triples, seed)

    fm = _functional(model, dt, dev, output)
    xs = x.detach().to(device=dev, dtype=dt)                      # (N, ...)
    notes = []
    fm, note = fix_batch_statistics(fm, xs, chunk=batch_size)
    if note:
        notes.append(note)
    _logits(fm, xs[:min(n, 4)])                                   # (M, C) logits, checked before anything else
    check_sample_independence(fm, xs)

    P, T, R = len(index), int(steps), int(plane_resolution)
    total = P * T + len(tri) * R * R
    batches = _Batches(fm, batch_size, total, progress)
    t = torch.linspace(0.0, 1.0, T, dtype=torch.float64)          # (T,)
    t_dev = t.to(device=dev, dtype=dt)
    ia = torch.as_tensor(index[:, 0], device=dev)
    ib = torch.as_tensor(index[:, 1], device=dev)
    shape = (1,) * (x.dim() - 1)

    def path_inputs(lo: int, hi: int) -> Tensor:
        g = torch.arange(lo, hi, device=dev)
        p, k = g // T, g % T
        tk = t_dev[k].reshape(-1, *shape)
        return (1 - tk) * xs[ia[p]] + tk * xs[ib[p]]              # (M, ...)

    logits_t = batches.run(P * T, path_inputs)                    # (P*T, C)
    C = int(logits_t.shape[1])
    if int(y_np.min()) < 0 or int(y_np.max()) >= C:
        raise UserError(f"labels must be class indices in [0, {C - 1}] for a model with {C} outputs, got "
                        f"labels from {int(y_np.min())} to {int(y_np.max())}")
    if not bool(torch.isfinite(logits_t).all()):
        raise UserError("the model's outputs along the paths are not finite: nothing to interpolate")
    logits_t = logits_t.reshape(P, T, C).cpu()
    ya = torch.as_tensor(y_np[index[:, 0]]).reshape(P, 1).expand(P, T)
    yb = torch.as_tensor(y_np[index[:, 1]]).reshape(P, 1).expand(P, T)
    probs, ce_a = _softmax_ce(logits_t, ya)
    _, ce_b = _softmax_ce(logits_t, yb)
    logits = logits_t.numpy()                                     # (P, T, C) compute dtype
    tt = t.numpy()                                                # (T,)
    loss = ((1 - tt) * ce_a.numpy() + tt * ce_b.numpy())          # (P, T) mixup loss
    chord_loss = (1 - tt) * loss[:, :1] + tt * loss[:, -1:]
    barrier = (loss - chord_loss).max(axis=1)                     # (P,)

    z = logits.astype(np.float64)
    fa, fb = z[:, :1, :], z[:, -1:, :]                            # (P, 1, C)
    chord = (1 - tt)[None, :, None] * fa + tt[None, :, None] * fb  # (P, T, C)
    gap = np.sqrt(((fb - fa) ** 2).sum(axis=(1, 2)))              # (P,)
    with np.errstate(invalid="ignore", divide="ignore"):
        deviation = np.sqrt(((z - chord) ** 2).sum(axis=2)) / np.where(gap > 0, gap, np.nan)[:, None]
    dtt = np.diff(tt)
    deviation_max = deviation.max(axis=1)                         # (P,) NaN for degenerate paths
    deviation_mean = ((deviation[:, 1:] + deviation[:, :-1]) / 2 * dtt).sum(axis=1)

    eps = float(torch.finfo(dt).eps)
    fit_error = _fit_errors(z, max_degree, eps)                   # (P, D + 1)
    fits = fit_error <= degree_tol
    degree = np.where(fits.any(axis=1), fits.argmax(axis=1), max_degree + 1).astype(np.int64)

    pred = logits_t.argmax(dim=-1).numpy().astype(np.int64)       # (P, T)
    changes = (pred[:, 1:] != pred[:, :-1]).sum(axis=1).astype(np.int64)
    required = (pred[:, 0] != pred[:, -1]).astype(np.int64)

    # planes
    K = len(tri)
    u = np.linspace(-plane_margin, 1.0 + plane_margin, R)         # (R,)
    if K:
        uv = torch.as_tensor(u, dtype=dt, device=dev)
        i0, i1, i2 = (torch.as_tensor(tri[:, j], device=dev) for j in range(3))

        def plane_inputs(lo: int, hi: int) -> Tensor:
            g = torch.arange(lo, hi, device=dev)
            k, iv, iu = g // (R * R), (g // R) % R, g % R         # [triple, v, u]
            a = xs[i0[k]]
            cu, cv = uv[iu].reshape(-1, *shape), uv[iv].reshape(-1, *shape)
            return a + cu * (xs[i1[k]] - a) + cv * (xs[i2[k]] - a)

        plane_logits = batches.run(K * R * R, plane_inputs).cpu().to(torch.float64)
        if not bool(torch.isfinite(plane_logits).all()):
            raise UserError("the model's outputs on the planes are not finite")
        pp = torch.softmax(plane_logits, dim=-1)
        plane_pred = pp.argmax(-1).reshape(K, R, R).numpy().astype(np.int64)
        plane_maxprob = pp.max(-1).values.reshape(K, R, R).numpy()
        flat = xs.reshape(n, -1).to(torch.float64).cpu().numpy()
        e1, e2 = flat[tri[:, 1]] - flat[tri[:, 0]], flat[tri[:, 2]] - flat[tri[:, 0]]
        n1, n2 = np.linalg.norm(e1, axis=1), np.linalg.norm(e2, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((n1 > 0) & (n2 > 0), (e1 * e2).sum(1) / (n1 * n2), np.nan)
        frame = np.stack([n1, n2, cos], 1)
    else:
        plane_pred = np.zeros((0, R, R), np.int64)
        plane_maxprob = np.zeros((0, R, R))
        frame = np.zeros((0, 3))

    return InterpResult(
        t=tt, pair_index=index, pair_same=same, pair_labels=y_np[index].reshape(P, 2),
        logits=logits, probs=probs.numpy().astype(logits.dtype), pred=pred, ce_a=ce_a.numpy(), ce_b=ce_b.numpy(),
        loss=loss, barrier=barrier, deviation=deviation, gap=gap, deviation_max=deviation_max,
        deviation_mean=deviation_mean, fit_error=fit_error, degree=degree, changes=changes, required=required,
        plane_index=tri, plane_labels=y_np[tri].reshape(K, 3), plane_u=u, plane_v=u.copy(), plane_pred=plane_pred,
        plane_maxprob=plane_maxprob, plane_frame=frame,
        n_samples=n, num_classes=C, degree_tol=float(degree_tol), max_degree=int(max_degree),
        same_class_fraction=float(same_class_fraction), plane_margin=float(plane_margin), seed=int(seed),
        dtype=str(dt).replace("torch.", ""), wall_time_s=time.perf_counter() - t0, notes=tuple(notes))

