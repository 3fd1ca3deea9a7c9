"""The ``ntvp`` method: NTK-vector products, a VJP per kernel column then JVPs over the row
samples; no Jacobian is stored (see :class:`~probe.probes.ntk.NtkMethod`)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vjp, vmap

from probe.probes.ntk._plan import _Ctx, _Plan
from probe.probes.ntk._util import _Pushforward, _attempt, _ranges
from probe.probes.ntk.result import NtkKind


def _run_ntvp(c: _Ctx, plan: _Plan, K: Tensor, pbar) -> None:
    """Fill K (zeros), ``plan.chunk`` columns (sample j, output b) at a time: their parameter
    tangents d f_b(x2_j) / d theta by VJPs vmapped over the columns (a loop over the columns'
    samples, vmapped over their outputs, where the model does not batch under vmap, e.g. RNNs),
    then JVPs of the batched forward pass over blocks of ``plan.block`` rows, vmapped over the
    tangents (samples are independent: checked by the caller; by the double-VJP identity where
    the model has no forward-mode AD, :class:`_Pushforward`)."""
    fm, O, params = c.fm, c.O, c.fm.params
    n2 = c.n2
    col_j = torch.arange(n2, device=K.device).repeat_interleave(O)
    col_o = torch.arange(O, device=K.device).repeat(n2)
    eye = torch.eye(O, dtype=fm.dtype, device=c.x1.device)
    state = {"looped": False}

    def f(p, xb):
        return fm(p, xb).reshape(xb.shape[0], -1)

    def vjp_one(xj, e):                      # d f_e(x_j) / d theta as a parameter dict
        _, fn = vjp(lambda p: fm.single(p, xj), params)
        return fn(e)[0]

    def tangents(js: Tensor, os_: Tensor) -> dict[str, Tensor]:
        if not state["looped"]:
            out, why = _attempt(lambda: vmap(vjp_one)(c.x2[js.to(c.x2.device)], eye[os_.to(eye.device)]),
                                "the ntvp method's per-sample VJPs (vmap)")
            if not why:
                return out
            state["looped"] = True
        parts = []
        for j in torch.unique_consecutive(js).tolist():
            sel = os_[js == j].to(eye.device)
            _, fn = vjp(lambda p: f(p, c.x2[j:j + 1]), params)
            parts.append(vmap(fn)(eye[sel][:, None, :])[0])
        return {k: torch.cat([u[k] for u in parts]) for k in params}

    pushforward = _Pushforward(f, params, c.x1)
    for lo, hi in _ranges(n2 * O, plan.chunk):
        js, os_ = col_j[lo:hi], col_o[lo:hi]
        U = tangents(js, os_)                                                          # (c, ...)
        ar = torch.arange(hi - lo, device=K.device)
        for r in _ranges(c.n1, plan.block):
            JV = vmap(pushforward.at(c.x1[r[0]:r[1]]))(U).to(torch.float64)             # (c, b, O)
            if c.kind == NtkKind.FULL:
                K[r[0]:r[1], :, js, os_] = JV.permute(1, 2, 0)
            elif c.kind == NtkKind.TRACE:
                K[r[0]:r[1]].index_add_(1, js, JV[ar, :, os_].T)
            else:
                K[os_, r[0]:r[1], js] = JV[ar, :, os_]
            pbar.update(1)
