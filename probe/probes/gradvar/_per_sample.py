"""Per-sample gradients (closed forms where they apply, vmap(grad) elsewhere) and their variance."""
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from probe import functional as _fn
from probe.checks import check_choice, check_int
from probe.probes.registry import Progress
from probe.probes.gradvar._common import (LossFn, _Fwd, _check_data, _norm64, _progress,
                                          bn_mode, cross_entropy_per_sample)
from probe.probes.gradvar._minibatch import _host, _layer_moments_init, _merged_moments
from probe.inputs import takes_loader


# ------------------------------------------------------------------------------------------------
# 2. Per-sample gradients and their variance
# ------------------------------------------------------------------------------------------------

def _groups(n: int, size: int, seed: int) -> list[Tensor]:
    """Consecutive groups of ``size`` of a seeded permutation of ``n`` (remainder left out; one
    group of all ``n`` when ``n < size``)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    if n < size:
        return [perm]
    return [perm[s:s + size] for s in range(0, n - size + 1, size)]


_METHODS = ("auto", "vmap", "closed_form")


@dataclass
class _Plan:
    """How per-sample gradients are formed: ``layers`` (structured layers whose closed form passed
    the self-check; their parameters ``closed``), the other parameters ``rest`` by vmap(grad), or
    ``grouped`` (batch statistics: VJP rows per group)."""

    grouped: bool
    layers: list = field(default_factory=list)
    closed: tuple[str, ...] = ()
    rest: tuple[str, ...] = ()
    out_shape: tuple[int, ...] = ()
    failed: tuple[str, ...] = ()        # parameters whose closed form failed the self-check


def _plan(fwd: _Fwd, x: Tensor, grouped: bool, method: str) -> _Plan:
    """Closed form (:mod:`probe.autodiff`) for the Linear / Conv2d / BatchNorm layers whose
    per-sample rows match autograd on two samples, ``vmap(grad)`` for every other parameter;
    ``method="vmap"`` forces vmap everywhere. Independent samples only."""
    check_choice("method", method, _METHODS)
    names = tuple(fwd.params)
    if grouped:
        return _Plan(grouped=True, rest=names)
    if method == "vmap":
        return _Plan(grouped=False, rest=names)
    try:
        from probe.autodiff import (check_closed_forms, find_structured_layers, record_layer_calls,
                                    set_layer_shapes)
    except ImportError:  # pragma: no cover - depends on the checkout
        return _Plan(grouped=False, rest=names)
    layers = find_structured_layers(fwd.fm)
    if not layers:
        return _Plan(grouped=False, rest=names)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(1) if x.is_floating_point() else \
        torch.ones(x.shape[0], dtype=torch.bool)
    pick = torch.nonzero(finite).reshape(-1)[:2]
    x0 = fwd.prepare(x[pick if len(pick) else torch.arange(min(2, x.shape[0]))])     # check on finite inputs
    params = {n: p.detach().requires_grad_() for n, p in fwd.params.items()}
    with record_layer_calls(layers) as calls, torch.enable_grad():
        out = fwd.fm(params, x0)
    set_layer_shapes(layers, calls, fwd.fm.params)
    good, failed = check_closed_forms(fwd.fm, x0, [lay for lay in layers if lay.calls > 0], int(out[0].numel()))
    closed = tuple(n for n in names if any(n in lay.names for lay in good))
    return _Plan(grouped=False, layers=good, closed=closed, rest=tuple(n for n in names if n not in closed),
                 out_shape=tuple(out.shape[1:]), failed=tuple(failed))


def _closed_form_rows(fwd: _Fwd, plan: _Plan, loss: LossFn, xb: Tensor, yb: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (c, numel)}`` of the closed-form parameters: one batched
    forward recording every structured layer's input a and output z, one backward pass of
    ``sum_i l_i`` giving ``g_i = d l_i / d z_i`` (samples independent), and the closed forms of
    :func:`probe.autodiff.per_sample_grad_parts` (Linear / Conv2d: ``sum_t g_t a_t^T``; BatchNorm:
    ``sum_t g_t x_hat_t``; biases ``sum_t g_t``), summed over a layer's calls."""
    from probe.autodiff import per_sample_grad_parts, record_forward

    c = xb.shape[0]
    params = {n: p.detach().requires_grad_() for n, p in fwd.params.items()}
    with torch.enable_grad():
        rec = record_forward(fwd.fm, params, xb, plan.layers)
        total = loss(rec.y.reshape((c,) + plan.out_shape), yb).sum()                 # sum_i l_i
        zs = [r.z for r in rec.recs]
        gz = torch.autograd.grad(total, zs, allow_unused=True)                        # d l_i / d z_i
    rows: dict[str, Tensor] = {}
    for r, g in zip(rec.recs, gz):
        if g is None:
            continue
        for name, part in per_sample_grad_parts(plan.layers[r.layer], r, g.detach().unsqueeze(0)):
            rows[name] = part[:, 0] if name not in rows else rows[name] + part[:, 0]  # (c, numel)
    for name in plan.closed:
        if name not in rows:
            p = fwd.params[name]
            rows[name] = torch.zeros((c, p.numel()), dtype=p.dtype, device=p.device)
    return rows


def _iter_per_sample(fwd: _Fwd, plan: _Plan, loss: LossFn, x: Tensor, y: Tensor, chunk: int,
                     batch_size: int, seed: int, groups: list[Tensor] | None = None
                     ) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """Yield ``(sample indices (c,), {name: per-sample gradients (c, *param shape)})`` chunk by chunk.

    Independent samples (eval-mode BatchNorm): the closed-form layers of ``plan`` from one batched
    forward/backward (:func:`_closed_form_rows`), the other parameters by ``vmap(grad(l_i))`` over
    ``chunk`` samples. Grouped (batch statistics): per group of ``batch_size`` samples, one VJP of
    the vector of per-sample losses (B,) and ``vmap`` over ``chunk`` rows of the identity as
    cotangents (``groups``: these groups instead of :func:`_groups`'s).
    """
    params = fwd.params
    if not plan.grouped:
        rest = {n: params[n] for n in plan.rest}
        held = {n: params[n] for n in plan.closed}

        def one(p, xi, yi):
            return loss(fwd({**held, **p}, xi.unsqueeze(0)), yi.unsqueeze(0)).sum()

        g_fn = vmap(grad(one), in_dims=(None, 0, 0))
        for s in range(0, x.shape[0], chunk):
            idx = torch.arange(s, min(s + chunk, x.shape[0]))
            xb, yb = fwd.prepare(x[idx]), fwd.prepare(y[idx])
            out: dict[str, Tensor] = {}
            if plan.closed:
                rows = _closed_form_rows(fwd, plan, loss, xb, yb)
                out.update({n: rows[n].reshape((len(idx),) + params[n].shape) for n in plan.closed})
            if rest:
                out.update(g_fn(rest, xb, yb))
            yield idx, {n: out[n] for n in params}
        return
    for gidx in (groups if groups is not None else _groups(x.shape[0], batch_size, seed)):
        xg, yg = fwd.prepare(x[gidx]), fwd.prepare(y[gidx])
        losses, vjp_fn = vjp(lambda p: loss(fwd(p, xg), yg), params)        # (b,)
        eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
        for s in range(0, losses.shape[0], chunk):
            yield gidx[s:s + chunk], vmap(vjp_fn)(eye[s:s + chunk])[0]


@takes_loader("x", "y")
def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor, *, loss: LossFn | None = None,
                         dtype: str | torch.dtype | None = None, device: torch.device | str | None = None,
                         bn: str = "eval", chunk: int = 64, batch_size: int = 32,
                         seed: int = 0, method: str = "auto", output: _fn.OutputSelector = None) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (N, *param shape)}`` of ``loss`` (sample order kept; with
    ``bn="train"`` rows of samples left out of every group are NaN). Materialises N x P: for
    small problems and tests; :func:`per_sample_variance` streams instead. ``method``: ``auto``
    (closed form where it applies, see :func:`per_sample_variance`), ``vmap`` or ``closed_form``
    (the same as auto: parameters without a closed form always use vmap)."""
    x, y = _check_data(x, y)
    loss = loss or cross_entropy_per_sample
    grouped = bn == "train" or _fn.couples_samples(model)
    with bn_mode(model, bn) as skip:
        fwd = _Fwd(model, dtype, device, skip, output)
        plan = _plan(fwd, x, grouped, method)
        out = {n: torch.full((x.shape[0], *p.shape), float("nan"), dtype=p.dtype, device=p.device)
               for n, p in fwd.params.items()}
        for idx, g in _iter_per_sample(fwd, plan, loss, x, y, chunk, batch_size, seed):
            for n in out:
                out[n][idx.to(out[n].device)] = g[n].detach()
    return out


@dataclass(frozen=True, eq=False)
class PerSampleStats:
    """Per-parameter-tensor per-sample statistics (arrays of length L, float64)."""

    names: tuple[str, ...]
    variance: np.ndarray        # tr(Sigma_1) = 1/(n-1) sum_i |g_i - gbar|^2
    mean_grad_norm: np.ndarray  # |gbar|, the mean of the finite per-sample gradients
    mean_sq_norm: np.ndarray    # mean_i |g_i|^2
    samples_used: int
    nonfinite_samples: int
    grouped: bool               # per-sample gradients through group batch statistics
    closed_form: tuple[str, ...] = ()   # parameters done by the closed form (probe.autodiff)
    failed_check: tuple[str, ...] = ()  # structured parameters whose closed form failed its self-check
    ranks: int = 0                      # ranks the samples were shared out over (0: computed whole here)


def per_sample_variance(model: nn.Module, x: Tensor, y: Tensor, *, chunk: int = 64, loss: LossFn | None = None,
                        dtype: str | torch.dtype | None = None, device: torch.device | str | None = None,
                        bn: str = "eval", batch_size: int = 32, seed: int = 0, method: str = "auto",
                        output: _fn.OutputSelector = None, progress: Progress | None = None) -> PerSampleStats:
    """Per layer, the variance over samples of per-sample gradients (the trace of the per-sample
    gradient covariance ``Sigma_1``, divisor ``n - 1``), streamed over chunks of ``chunk`` samples
    (memory ~ ``chunk * P`` for the gradients plus ``2 P`` float64 accumulators).

    For each layer with shift ``c`` (the first finite chunk's mean) and ``d_i = g_i - c``:
    ``gbar = c + mean_i d_i``, ``tr(Sigma_1) = (sum_i |d_i|^2 - n |mean_i d_i|^2) / (n - 1)``.
    A sample whose gradient has a non-finite entry in any layer is left out and counted.

    Per-sample gradients (``method="auto"``, samples independent): Linear / Conv2d / BatchNorm
    layers in closed form from one batched forward and backward pass per chunk
    (:mod:`probe.autodiff`, after its self-check against autograd on two samples), every other
    parameter by ``vmap(grad)``; ``method="vmap"`` uses vmap for all. With batch statistics
    (``bn="train"`` or BatchNorm without running statistics) per-group VJP rows (see
    :func:`_iter_per_sample`).

    The sums stay on the device (one read per chunk: how many of its samples are finite). Under
    ``torchrun`` each rank takes a contiguous share of the samples (with batch statistics: of the
    groups) and the ranks' moments are merged exactly
    (:func:`probe.runtime.moments.all_reduce_moments`), equal to one process up to float64 rounding.
    """
    from probe.runtime.dist import current

    x, y = _check_data(x, y, min_n=2)
    check_int("chunk", chunk, 1, 10 ** 7)
    loss = loss or cross_entropy_per_sample
    grouped = bn == "train" or _fn.couples_samples(model)
    ddp = current()
    groups = _groups(x.shape[0], batch_size, seed) if grouped else None
    units = len(groups) if grouped else x.shape[0]
    sharded = ddp.active and units >= ddp.world
    part = ddp.shard(units) if sharded else slice(0, units)
    if grouped:
        groups = groups[part]
        total = sum(len(g) for g in groups)
    else:
        total = part.stop - part.start
    xs, ys = (x, y) if grouped else (x[part], y[part])
    with bn_mode(model, bn) as skip:
        fwd = _Fwd(model, dtype, device, skip, output)
        names = list(fwd.params)
        plan = _plan(fwd, x, grouped, method)
        shift, s1, s2 = _layer_moments_init(fwd.params)
        used = bad = done = 0
        for idx, g in _iter_per_sample(fwd, plan, loss, xs, ys, chunk, batch_size, seed, groups):
            c = idx.shape[0]
            flat = {n: g[n].detach().reshape(c, -1) for n in names}                # (c, numel)
            if any(shift[n] is None for n in names):                               # first chunk: the shift
                ok = torch.ones(c, dtype=torch.bool, device=flat[names[0]].device)
                for n in names:
                    ok &= torch.isfinite(flat[n]).all(dim=1)
                if ok.any():
                    for n in names:
                        shift[n] = flat[n][ok].to(torch.float64).mean(0)
            if any(shift[n] is None for n in names):                               # no finite sample yet
                bad += c
            else:
                # one float64 pass per layer (one layer's float64 rows alive at a time):
                # d_i = g_i - c, |d_i|^2 per sample and sum_i d_i; a non-finite entry makes |d_i|^2
                # non-finite, so the finite test comes with it
                rsq, dsum = {}, {}
                for n in names:
                    d = flat[n].to(torch.float64) - shift[n]                        # (c, numel)
                    rsq[n], dsum[n] = d.square().sum(1), d.sum(0)                   # (c,), (numel,)
                    del d
                ok = torch.ones(c, dtype=torch.bool, device=flat[names[0]].device)
                for n in names:
                    ok &= torch.isfinite(rsq[n])
                k = int(ok.sum())
                bad += c - k
                used += k
                for n in names:
                    if k == c:
                        s1[n] += dsum[n]
                        s2[n] += rsq[n].sum()
                    elif k:                                                          # rare: recompute the finite rows
                        s1[n] += (flat[n][ok].to(torch.float64) - shift[n]).sum(0)
                        s2[n] += rsq[n][ok].sum()
                del rsq, dsum
            done += c
            _progress(progress, "gradvar: per-sample gradients", done, total)
    var, mgn, msq = (np.full(len(names), np.nan) for _ in range(3))
    if sharded:   # every rank's moments merged; sum_i |g_i|^2 = m2 + n |mean|^2
        dev = s1[names[0]].device if names else None
        bad = int(ddp.all_reduce_(torch.tensor([float(bad)], dtype=torch.float64, device=dev)).tolist()[0])
        used, mean, m2 = _merged_moments(ddp, used, names, shift, s1, s2)
        for j, n in enumerate(names):
            if used >= 1:
                mgn[j] = _norm64(mean[n])
                msq[j] = (m2[n] + used * float(mean[n] @ mean[n])) / used
            if used >= 2:
                var[j] = m2[n] / (used - 1)
    else:
        s2h = _host(s2, names)
        for j, n in enumerate(names):
            if used >= 1:
                mean_d = s1[n] / used
                mgn[j] = _norm64(shift[n] + mean_d)
                # sum_i |g_i|^2 = sum_i |d_i|^2 + 2 c . sum_i d_i + n |c|^2
                msq[j] = (s2h[n] + 2 * float(shift[n] @ s1[n]) + used * float(shift[n] @ shift[n])) / used
            if used >= 2:
                var[j] = max((s2h[n] - used * float(mean_d @ mean_d)) / (used - 1), 0.0)
    return PerSampleStats(names=tuple(names), variance=var, mean_grad_norm=mgn, mean_sq_norm=msq,
                          samples_used=used, nonfinite_samples=bad, grouped=grouped,
                          closed_form=plan.closed, failed_check=plan.failed, ranks=ddp.world if sharded else 0)
