"""The ``jacobian`` method: per-sample Jacobians by ``vmap(jacrev)`` (a loop over the samples
where vmap cannot go), contracted block pair by block pair (see :class:`~probe.probes.ntk.NtkMethod`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from probe.probes.ntk._blocks import _block_shape, _schedule
from probe.probes.ntk._plan import _Ctx, _Plan
from probe.probes.ntk._util import _SampleJacobian, _ranges
from probe.probes.ntk.result import NtkKind


def _run_jacobian(c: _Ctx, plan: _Plan, names: Sequence[str], K: Tensor, pbar) -> None:
    """K += the kernel of the parameters ``names`` (per parameter group of the plan, if any)."""
    fm, O = c.fm, c.O
    for group in plan.groups or [list(names)]:
        sub = {n: fm.params[n] for n in group}
        jac = _SampleJacobian(fm, group)

        def feats(x):
            n = x.shape[0]
            if n <= plan.chunk:
                return {k: v.reshape(n, O, -1) for k, v in jac(sub, x).items()}      # (n, O, p)
            out = {k: torch.empty((n, O, p.numel()), dtype=p.dtype, device=p.device)
                   for k, p in sub.items()}
            for lo, hi in _ranges(n, plan.chunk):
                for k, v in jac(sub, x[lo:hi]).items():
                    out[k][lo:hi] = v.reshape(hi - lo, O, -1)
            return out

        def contract(f1, f2):
            n1, n2 = next(iter(f1.values())).shape[0], next(iter(f2.values())).shape[0]
            blk = torch.zeros(_block_shape(c.kind, n1, n2, O), dtype=torch.float64, device=K.device)
            for k in f1:
                j1, j2 = f1[k], f2[k]                                                # (n, O, p)
                if c.kind == NtkKind.TRACE:
                    blk += (j1.reshape(n1, -1) @ j2.reshape(n2, -1).T).to(torch.float64)
                elif c.kind == NtkKind.DIAGONAL:
                    blk += torch.bmm(j1.transpose(0, 1), j2.permute(1, 2, 0)).to(torch.float64)
                else:
                    blk += (j1.reshape(n1 * O, -1) @ j2.reshape(n2 * O, -1).T).view(
                        n1, O, n2, O).to(torch.float64)
            return blk

        _schedule(c, K, plan.block, feats, contract, pbar)

