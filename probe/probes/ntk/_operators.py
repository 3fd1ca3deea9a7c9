"""The two NTK operators of the matrix-free top-k, as :class:`probe.linalg.SymmetricOperator`.

Both have the NTK's non-zero eigenvalues; they differ in the space they act on:

* :class:`_NtkOperator` (``ntvp``): K itself in sample space, ``size`` N (trace) or N*O (full,
  sample-major), vectors float64 (short: N or N*O elements), K v = J (J^T v) by VJPs then JVPs
  in the model's dtype, accumulated in float64.
* :class:`_GramOperator` (``gram``): M = J^T J in parameter space, ``size`` O*P (trace) or P
  (full), vectors in the model's dtype (long: a float64 basis of millions of elements would
  double the memory), one pass over the data per block.

Both follow the interface's column convention, ``matmat(V)`` for V (size, b) -> (size, b).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor
from torch.func import vjp, vmap

from probe.autodiff import (LayerCall, StructuredLayer, conv_patches, input_leaf, per_sample_grad_parts,
                            record_forward)
from probe.functional import FunctionalModel
from probe.probes.ntk._util import _GRAM_ROW_BYTES, _Pushforward, _SampleJacobian, _attempt, _ranges
from probe.probes.ntk.result import NtkKind


class _NtkOperator:
    """V -> K V for the trace (N) or full (N*O, sample-major) NTK, by VJP then JVP, sample blocks.

    A :class:`probe.linalg.SymmetricOperator` in sample space: ``size`` N (trace) or N*O (full),
    vectors float64 on the model's device; they are cast to the model's dtype as cotangents and
    the products come back accumulated in float64.
    Full:  u = J^T v (one VJP per block, summed), K v = J u (one JVP per block).
    Trace: K_trace = sum_o J_o J_o^T with J_o (N, P) the Jacobian of output o, so
           K_trace v = sum_o J_o u_o with u_o = J_o^T v: the VJP with cotangent v e_o^T for each o
           and the JVP of each u_o keeping only output o. Note that (sum_o J_o)(sum_o J_o)^T v,
           a single cotangent v 1^T, would be a different kernel.
    For s vectors at once (block Lanczos) that is s (full) or s*O (trace) cotangents and as many
    tangents. ``vectorize`` says how they are applied: ``"loop"`` (the default on the CPU, where
    vmapping cotangents hits slow batching rules of the convolution backward, and a loop of JVPs
    beats vmap's by ~2x) reuses one forward pass per sample block for a loop of VJPs and loops
    the JVPs; ``"vmap"`` (the default on other devices, where one batched kernel replaces up to
    s*O small ones) vmaps the VJPs over chunks of at most O cotangents and the JVPs over chunks
    of at most O tangents. Where vmap does not apply to the model (a missing batching rule), the
    operator falls back to the loop for that and every later product (``looped`` says why).
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, kind: NtkKind, O: int, block: int, dist=None):
        self.fm, self.x, self.kind, self.O, self.block = fm, x, kind, O, block
        self.size = x.shape[0] * (O if kind == NtkKind.FULL else 1)
        # under torchrun: this rank's samples; u = J^T v is summed over the ranks (all-reduce)
        # and each rank pushes its own rows forward, gathered in sample order
        self.dist = dist if dist is not None and dist.active and x.shape[0] >= dist.world else None
        self.part = self.dist.shard(x.shape[0]) if self.dist is not None else slice(0, x.shape[0])
        self.dtype = torch.float64
        self.device = fm.device
        self.matvecs = 0
        # samples are independent (checked by the caller): the plain batched forward
        self.f = lambda p, xb: fm(p, xb).reshape(xb.shape[0], -1)
        self.pushforward: _Pushforward | None = None     # J t: jvp, or a VJP of the VJP
        self.vectorize = "loop" if fm.device.type == "cpu" else "vmap"
        self.looped = ""                                 # why vmap was given up ("" while it was not)

    def _vmapped(self, fn, args: dict[str, Tensor] | Tensor, what: str):
        """``vmap(fn)(args)``, or None after switching this operator to loops when vmap does not
        apply to the model; running out of memory is raised, never taken for that."""
        out, why = _attempt(lambda: vmap(fn)(args), f"the NTK products (vmap over {what})")
        if why:
            self.vectorize, self.looped = "loop", f"vmap over {what}: {why}"
        return out

    def _pullback(self, fn, cots: Tensor, U: dict[str, Tensor], step: int) -> None:
        """U[k][j] += (J^T cots[j])[k] for the cotangents cots (m, b, O) of one sample block."""
        j = 0
        if self.vectorize == "vmap":
            for a, b in _ranges(cots.shape[0], step):
                G = self._vmapped(lambda c: fn(c)[0], cots[a:b], "the cotangents")
                if G is None:
                    break
                for k, g in G.items():
                    U[k][a:b] += g
                j = b
        for i in range(j, cots.shape[0]):
            for k, g in fn(cots[i])[0].items():
                U[k][i] += g

    def _push(self, push, U: dict[str, Tensor], step: int) -> Tensor:
        """(m, b, O): J u_j for every tangent u_j of U ({name: (m, *shape)}) of one sample block."""
        m = next(iter(U.values())).shape[0]
        if self.vectorize == "vmap":
            parts = []
            for a, b in _ranges(m, step):
                JU = self._vmapped(push, {k: u[a:b] for k, u in U.items()}, "the tangents")
                if JU is None:
                    break
                parts.append(JU)
            else:
                return torch.cat(parts)
        return torch.stack([push({k: u[j] for k, u in U.items()}) for j in range(m)])

    def matmat(self, V: Tensor) -> Tensor:
        """K V for V (size, s) (a tensor or array); returns (size, s) float64."""
        fm, O, N, f = self.fm, self.O, self.x.shape[0], self.f
        s = V.shape[1]
        self.matvecs += s
        Vt = torch.as_tensor(V, dtype=fm.dtype, device=fm.device).T.contiguous()   # (s, size) rows
        eye = torch.eye(O, dtype=fm.dtype, device=fm.device)
        trace = self.kind == NtkKind.TRACE
        m = s * O if trace else s                      # cotangents / tangents
        U = {k: torch.zeros((m,) + p.shape, dtype=p.dtype, device=p.device)
             for k, p in fm.params.items()}
        step = O if trace else max(1, O)
        r0, r1 = self.part.start, self.part.stop
        mine = [(lo + r0, hi + r0) for lo, hi in _ranges(r1 - r0, self.block)]
        for lo, hi in mine:
            xb = self.x[lo:hi]
            _, fn = vjp(lambda p: f(p, xb), fm.params)
            if trace:                                  # cotangent j: v_{j // O} e_{j % O}^T
                cots = (Vt[:, None, lo:hi, None] * eye[None, :, None, :]).reshape(m, hi - lo, O)
            else:
                cots = Vt[:, lo * O:hi * O].reshape(s, hi - lo, O)
            self._pullback(fn, cots, U, step)
            del cots
        if self.dist is not None:
            flat = self.dist.all_reduce_(torch.cat([u.reshape(-1) for u in U.values()]))
            U = dict(zip(U, (c.view_as(u) for c, u in zip(flat.split([u.numel() for u in U.values()]),
                                                          U.values()))))
        out = torch.empty((N if trace else N * O, s), dtype=torch.float64, device=fm.device)
        if self.pushforward is None:
            self.pushforward = _Pushforward(f, fm.params, self.x)
        for lo, hi in mine:
            JU = self._push(self.pushforward.at(self.x[lo:hi]), U, step)               # (m, b, O)
            if trace:
                JU = JU.reshape(s, O, hi - lo, O).diagonal(dim1=1, dim2=3)          # (s, b, O)
                out[lo:hi] = JU.sum(-1).T.to(torch.float64)
            else:
                out[lo * O:hi * O] = JU.reshape(s, -1).T.to(torch.float64)
        if self.dist is not None:
            per = 1 if trace else O
            rows = self.dist.all_gather((r0, out[r0 * per:r1 * per].cpu()))
            for a, block in rows:
                out[a * per:a * per + block.shape[0]] = block.to(out.device)
        return out


class _GramOperator:
    """V -> M V for M = J^T J, the parameter-space twin of the NTK, one data sweep per block.

    A :class:`probe.linalg.SymmetricOperator` in parameter space: ``size`` F = O*P (trace) or P
    (full), vectors in the model's dtype on its device (``F`` and ``size`` are the same number).

    J stacks per-sample Jacobian rows: for ``trace`` one row per sample, the outputs side by side
    (N x O*P, so K_trace = J J^T = sum_o J_o J_o^T); for ``full`` one row per (sample, output)
    (N*O x P). M = J^T J = sum_i J_i^T J_i has the NTK's non-zero eigenvalues, and, unlike
    K v = J (J^T v), a block product needs only one pass over the data: per chunk of samples one
    forward pass and O backward passes, then per sub-chunk of ``sub`` samples the per-sample layer
    rows R (the closed forms of :func:`probe.autodiff.per_sample_grad_parts`; parameters outside
    structured layers by ``vmap(jacrev)``) are formed once and used twice, w = R V (the
    sub-chunk's rows of J V) and M V += R^T w. Internally the s vectors are the rows of
    P = V^T (s, F), contiguous when V is the transposed view of a row basis as the Lanczos solver
    passes it.

    Parameter-space layout of a vector (F,): per selected parameter tensor, in ``fm.params``
    order, a block of O*numel (trace, output-major) or numel (full) elements.
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, kind: NtkKind, O: int, layers: list[StructuredLayer],
                 fallback: Sequence[str], block: int, sub: int, pbar=None):
        self.fm, self.x, self.kind, self.O, self.layers = fm, x, kind, O, layers
        self.block, self.sub, self.pbar = max(1, block), max(1, sub), pbar
        self.fallback = list(fallback)
        width = O if kind == NtkKind.TRACE else 1
        self.seg: dict[str, tuple[int, int]] = {}
        off = 0
        for name, p in fm.params.items():
            self.seg[name] = (off, off + width * p.numel())
            off += width * p.numel()
        self.F = self.size = off
        self.dtype, self.device = fm.dtype, fm.device
        self.n_units = x.shape[0] * (1 if kind == NtkKind.TRACE else O)
        self.sweeps = self.matvecs = self.row_blocks = 0
        self._row_bytes = _GRAM_ROW_BYTES if fm.device.type == "cpu" else None
        self.batch_outputs, self.outputs_looped = fm.device.type != "cpu", ""
        self.params = {n: p.detach().requires_grad_() for n, p in fm.params.items()}
        if self.fallback:
            self._jac = _SampleJacobian(fm, self.fallback)

    def _fast(self, layer: StructuredLayer) -> bool:
        """Rows in cache-sized blocks of (sample, output): single-call Linear, ungrouped Conv2d and
        BatchNorm; anything else goes through :func:`per_sample_grad_parts`."""
        if layer.calls != 1:
            return False
        return layer.kind in ("linear", "bn") or (layer.kind == "conv" and layer.module.groups == 1)

    def _chunks(self):
        """Per block of samples: one forward pass, O backward passes (:meth:`_output_gradients`);
        yields (lo, hi, records, output gradients per record (O, b, ...))."""
        fm, O, layers = self.fm, self.O, self.layers
        for lo, hi in _ranges(self.x.shape[0], self.block):
            xb = self.x[lo:hi]
            recs, grads = [], []
            if layers:
                leaf = input_leaf(xb)
                ctx = record_forward(fm, self.params, leaf if leaf is not None else xb, layers)
                zs = [r.z for r in ctx.recs]
                per_out = self._output_gradients(ctx.y, zs)
                # per record, the O output gradients (b, ...); a layer output that no output
                # depends on gets zeros
                grads = [[g if g is not None else torch.zeros_like(z) for g in gs]
                         for z, gs in zip(zs, zip(*per_out))]
                # keep the layer inputs, let the graph go
                recs = [LayerCall(r.layer, r.src.detach(), None, 0, r.norm) for r in ctx.recs]
                del ctx, zs, per_out
            yield lo, hi, recs, grads
            if self.pbar is not None:
                self.pbar.update(hi - lo)

    def _output_gradients(self, y: Tensor, zs: list[Tensor]) -> list:
        """Per output o, the gradients of sum_i y[i, o] with respect to the layer outputs zs (None
        for one that no output depends on). On the CPU one backward pass per output (batching
        the cotangents hits slow batching rules of the convolution backward there); elsewhere
        the O passes batched (``is_grads_batched``), falling back to the loop where the model's
        backward has no batching rule (``outputs_looped`` says why)."""
        O = self.O
        if self.batch_outputs and O > 1:
            eye = torch.eye(O, dtype=y.dtype, device=y.device)
            cot = eye[:, None, :].expand((O,) + tuple(y.shape))          # (O, b, O): output o
            gs, why = _attempt(lambda: torch.autograd.grad(y, zs, grad_outputs=cot, retain_graph=True,
                                                           allow_unused=True, is_grads_batched=True),
                               "the output gradients (O backward passes batched)")
            if not why:
                return [[None if g is None else g[o] for g in gs] for o in range(O)]
            self.batch_outputs, self.outputs_looped = False, why
        return [torch.autograd.grad(y[:, o].sum(), zs, retain_graph=o < O - 1, allow_unused=True)
                for o in range(O)]

    def _groups(self, xb: Tensor, recs: list[LayerCall], grads: list[list[Tensor]]):
        """The chunk's rows of J, per sub-chunk of ``sub`` samples: yields for each the list of its
        blocks (o, c0, c1, s0, s1, R), R (s1 - s0, c1 - c0) the rows of samples s0:s1 (of the
        chunk) for output o in columns c0:c1 of the parameter-space layout. Every block is formed
        once (``row_blocks`` counts them); a sub-chunk's blocks together hold its rows of J,
        ``sub`` * O * P elements, as the memory plan counts."""
        O, layers, trace = self.O, self.layers, self.kind == NtkKind.TRACE

        def cols(name: str, o: int, numel: int) -> tuple[int, int]:
            c0 = self.seg[name][0] + (o * numel if trace else 0)
            return c0, c0 + numel

        generic: dict[int, list[int]] = defaultdict(list)            # layer -> its records
        for k, rec in enumerate(recs):
            if not self._fast(layers[rec.layer]):
                generic[rec.layer].append(k)
        for g0, g1 in _ranges(xb.shape[0], self.sub):
            blocks = []
            for k, rec in enumerate(recs):
                layer = layers[rec.layer]
                if self._fast(layer):
                    blocks.extend(self._fast_rows(layer, rec.src[g0:g1], [g[g0:g1] for g in grads[k]],
                                                  rec.norm, g0, cols))
            rows: dict[str, Tensor] = {}
            for li, ks in generic.items():
                for k in ks:
                    rec = recs[k]
                    part_rec = LayerCall(rec.layer, rec.src[g0:g1], None, 0, rec.norm)
                    g = torch.stack([gk[g0:g1] for gk in grads[k]])         # (O, m, ...)
                    for name, part in per_sample_grad_parts(layers[li], part_rec, g):
                        rows[name] = part if name not in rows else rows[name] + part
            if self.fallback:
                jac = self._jac({n: self.fm.params[n] for n in self.fallback}, xb[g0:g1])
                for name in self.fallback:
                    rows[name] = jac[name].reshape(g1 - g0, O, -1)
            for name, R in rows.items():                                    # (m, O, numel)
                for o in range(O):
                    blocks.append((o, *cols(name, o, R.shape[-1]), g0, g1, R[:, o]))
            self.row_blocks += len(blocks)
            yield blocks
            del blocks, rows

    def _fast_rows(self, layer: StructuredLayer, a: Tensor, gs: list[Tensor], norm, g0: int, cols) -> list:
        """The blocks of a single-call Linear, ungrouped Conv2d or BatchNorm for the samples
        g0:g0 + len(a): ``a`` their layer inputs, ``gs`` their O output gradients. On the CPU the
        weight rows come in blocks of about ``_GRAM_ROW_BYTES`` (they stay in the cache between
        being formed and used); on other devices in one batched product per output."""
        O, b, out = self.O, a.shape[0], []
        if layer.kind == "bn":      # d/dw = sum_pos g * x_hat, d/db = sum_pos g
            mean, var, eps = norm
            C = a.shape[1]
            inv = torch.rsqrt(var + eps)
            xhat = ((a.reshape(b, C, -1) - mean[:, None]) * inv[:, None])       # (b, C, pos)
            for o in range(O):
                g = gs[o].reshape(b, C, -1)
                if layer.w is not None:
                    out.append((o, *cols(layer.w, o, C), g0, g0 + b, (g * xhat).sum(-1)))
                if layer.b is not None:
                    out.append((o, *cols(layer.b, o, C), g0, g0 + b, g.sum(-1)))
            return out
        if layer.kind == "conv":
            A = conv_patches(layer.module, a).transpose(1, 2)          # (b, T, D)
        else:
            A = a.reshape(b, -1, a.shape[-1])                           # (b, T, d_in)
        numel = layer.module.weight.numel() if layer.w is not None else 0
        m = b if self._row_bytes is None else int(min(b, max(4, self._row_bytes // (max(numel, 1)
                                                                                   * A.element_size()))))
        for o in range(O):
            if layer.kind == "conv":
                G = gs[o].reshape(b, gs[o].shape[1], -1)                # (b, C, T)
            else:
                G = gs[o].reshape(b, -1, gs[o].shape[-1]).transpose(1, 2)   # (b, d_out, T)
            if layer.w is not None:
                c0, c1 = cols(layer.w, o, numel)
                for s0, s1 in _ranges(b, m):
                    out.append((o, c0, c1, g0 + s0, g0 + s1,
                                torch.bmm(G[s0:s1], A[s0:s1]).reshape(s1 - s0, numel)))
            if layer.b is not None:                                     # bias: sum over positions
                out.append((o, *cols(layer.b, o, G.shape[1]), g0, g0 + b, G.sum(-1)))
        return out

    def _unit_view(self, w: Tensor, o: int) -> Tensor:
        """Rows of w (units, s) that belong to output o: all (trace) or every O-th (full)."""
        return w if self.kind == NtkKind.TRACE else w.view(-1, self.O, w.shape[-1])[:, o]

    def matmat(self, V: Tensor) -> Tensor:
        """M V for V (F, s); returns (F, s), the transposed view of a contiguous (s, F) array.
        Per sub-chunk its rows R are formed once and used twice: w = R V, then (M V)^T += w^T R."""
        P = V.T                                                            # (s, F) rows
        out = torch.zeros((P.shape[0], self.F), dtype=P.dtype, device=P.device)
        self.sweeps += 1
        self.matvecs += P.shape[0]
        per = 1 if self.kind == NtkKind.TRACE else self.O
        for lo, hi, recs, grads in self._chunks():
            xb = self.x[lo:hi]
            w = torch.zeros(((hi - lo) * per, P.shape[0]), dtype=P.dtype, device=P.device)
            for blocks in self._groups(xb, recs, grads):
                for o, c0, c1, s0, s1, R in blocks:                          # w = R V
                    self._unit_view(w, o)[s0:s1].addmm_(R, P[:, c0:c1].T)
                for o, c0, c1, s0, s1, R in blocks:                          # (M V)^T += w^T R
                    out[:, c0:c1].addmm_(self._unit_view(w, o)[s0:s1].T, R)
        return out.T

    def rows_times(self, V: Tensor) -> Tensor:
        """J V for V (F, s): (units, s), units = samples (trace) or (sample, output) sample-major
        (full)."""
        P = V.T                                                            # (s, F) rows
        per = 1 if self.kind == NtkKind.TRACE else self.O
        out = torch.zeros((self.n_units, P.shape[0]), dtype=P.dtype, device=P.device)
        for lo, hi, recs, grads in self._chunks():
            w = out[lo * per:hi * per]
            for blocks in self._groups(self.x[lo:hi], recs, grads):
                for o, c0, c1, s0, s1, R in blocks:
                    self._unit_view(w, o)[s0:s1].addmm_(R, P[:, c0:c1].T)
        return out


class _ShardedGram:
    """J^T J over all samples under ``torchrun`` when each rank holds the gram operator of its
    contiguous part of them: a product is the ranks' parts summed by an all-reduce (every rank
    then holds it and the Lanczos iterations go on in step), ``rows_times`` the ranks' rows
    gathered in sample order."""

    def __init__(self, local: _GramOperator, dist):
        self.local, self.dist = local, dist
        self.size, self.F, self.dtype, self.device = local.size, local.F, local.dtype, local.device

    def __getattr__(self, name: str):           # sweeps, matvecs: this rank's operator's
        return getattr(self.__dict__["local"], name)

    def matmat(self, V: Tensor) -> Tensor:
        rows = self.local.matmat(V).T           # (s, F), contiguous
        return self.dist.all_reduce_(rows.contiguous()).T

    def rows_times(self, V: Tensor) -> Tensor:
        part = self.local.rows_times(V)
        return torch.cat([p.to(part.device) for p in self.dist.all_gather(part.cpu())], dim=0)
