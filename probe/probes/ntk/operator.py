"""The NTK as a :class:`probe.linalg.SymmetricOperator` in sample space: the VJP/JVP operator
(``ntvp``) that :func:`probe.probes.ntk.ntk_topk_lanczos` runs block Lanczos on, for other solvers
and for measuring what one product costs.

    >>> op = ntk_operator(model, x)              # trace kernel, size N
    >>> KV = op.matmat(V)                        # (N, b) float64
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from probe.errors import UserError
from probe.functional import (OutputSelector, ParamFilter, check_sample_independence, fix_batch_statistics,
                              functionalize)
from probe.linalg import SymmetricOperator
from probe.runtime.precision import exact, exact_products
from probe.probes.ntk._operators import _NtkOperator
from probe.probes.ntk._util import _LANCZOS_MAX_BLOCK, _enum, _out_of_range
from probe.probes.ntk.result import NtkKind

__all__ = ["ntk_operator"]

_PASS = 500              # samples per forward pass of the range check


@exact
def ntk_operator(model: nn.Module, x: Tensor, kind: NtkKind | str = "trace", *,
                 param_filter: ParamFilter = None, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, output: OutputSelector = None,
                 block_size: int | None = None) -> SymmetricOperator:
    """The empirical NTK of ``model`` on ``x`` as a matrix-free operator, K V = J (J^T V) by VJPs
    then JVPs in blocks of ``block_size`` samples (default min(N, 512)), accumulated in float64.

    ``kind``: ``"trace"`` (``size`` N) or ``"full"`` (``size`` N*O, sample-major); vectors are
    float64 on the model's device, ``matvecs`` counts the products. ``dtype`` None: the model's
    own, unless its outputs on ``x`` put the kernel beyond that precision's range (then float64,
    as :func:`~probe.probes.ntk.ntk_topk_lanczos` decides). Products evaluate the model in eval
    mode with explicit parameters and buffers, on this process alone; the module is not changed.
    Raises :class:`UserError` when the model's forward couples samples. The products run with TF32
    off whenever they are called (:func:`probe.runtime.precision.exact_products`).
    """
    kind = _enum(NtkKind, kind, "NTK kind")
    if kind == NtkKind.DIAGONAL:
        raise UserError("ntk_operator supports kind='trace' or 'full'")
    if block_size is not None and int(block_size) < 1:
        raise UserError(f"block_size must be a positive integer, got {block_size!r}")
    fm = functionalize(model, param_filter=param_filter, dtype=dtype, device=device, output=output)
    xs = fm.prepare(x)
    fm, _ = fix_batch_statistics(fm, xs)
    check_sample_independence(fm, xs)
    n = xs.shape[0]
    with torch.no_grad():
        outs = [fm(fm.params, xs[lo:lo + _PASS]).reshape(min(_PASS, n - lo), -1) for lo in range(0, n, _PASS)]
    y_max = float(torch.stack([o.abs().max() for o in outs]).max())     # one transfer to the host
    if dtype is None and fm.dtype != torch.float64 and _out_of_range(fm.dtype, y_max):
        return ntk_operator(model, x, kind, param_filter=param_filter, dtype=torch.float64, device=device,
                            output=output, block_size=block_size)
    return exact_products(_NtkOperator(fm, xs, kind, outs[0].shape[1], min(n, int(block_size or _LANCZOS_MAX_BLOCK))))
