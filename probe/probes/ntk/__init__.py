"""The NTK probe: empirical neural tangent kernel of any PyTorch model, its spectrum, matrix-free top-k.

For a model f(theta, x) with O outputs and the (selected) parameters theta (P elements), the
empirical NTK between inputs x1 (N1 samples) and x2 (N2 samples) is

    Theta[i, a, j, b] = < d f_a(x1_i) / d theta , d f_b(x2_j) / d theta >       (J1 J2^T)

Kinds (:class:`NtkKind`), with their axis conventions:

* ``full``      (N1*O, N2*O), **sample-major**: row ``i*O + a`` is (sample i, output a), i.e. the
                 (N1, O, N2, O) array reshaped; ``kernel.reshape(N1, O, N2, O)`` recovers the axes.
* ``trace``     (N1, N2): sum over outputs, ``Theta[i, :, j, :].trace()``.
* ``diagonal``  (O, N1, N2): one kernel per output, ``kernel[a] = Theta[:, a, :, a]``.

Every method evaluates the model in eval mode with explicit parameters and buffers
(``torch.func.functional_call``): BatchNorm uses its running statistics (``bn_mode="eval"``),
dropout is off, and the caller's module (parameters, buffers, ``requires_grad`` and train/eval
flags) is unchanged afterwards. Kernels are accumulated and returned in float64; Jacobians are
formed in ``dtype`` (the model's own dtype unless given; pass ``torch.float64`` for exact work on
small N, e.g. before eigen-decompositions and eigenlearning).

The methods (:class:`NtkMethod`) follow the cost analysis of neural-tangents (Novak et al. 2022) and
the PyTorch ``torch.func`` NTK tutorial; ``layerwise`` uses the per-sample-gradient identity of
linear maps (a Linear/Conv2d weight Jacobian is a sum over positions of outer products of the
back-propagated output gradient and the layer input; BatchNorm's affine Jacobian is a sum of
``g * x_hat``), contracted one layer at a time so the whole Jacobian is never stored.

Layout: :mod:`.api` (the public functions), :mod:`.result` (kinds, Lanczos operators, result types),
:mod:`.probe` (``probe ntk``), :mod:`._methods` (the kernel methods' table: name -> planner,
runner; :class:`NtkMethod` and the CLI choices come from it), :mod:`._plan` (measuring pass,
memory and cost models), :mod:`._jacobian`, :mod:`._ntvp`, :mod:`._layerwise` (the kernel
methods, assembled by :mod:`._blocks`), :mod:`._dist` (the kernel under ``torchrun``: per-rank
layer factors exchanged, or tiles), :mod:`._operators` (the two Lanczos operators); the per-layer closed forms live in :mod:`probe.autodiff`, the solver and
spectrum statistics in :mod:`probe.linalg`.
"""
from probe.probes.ntk.api import empirical_ntk, ntk_spectrum, ntk_topk_lanczos
from probe.probes.ntk.operator import ntk_operator
from probe.probes.ntk._methods import KERNEL_METHODS, KernelMethod, NtkMethod
from probe.probes.ntk.result import (LanczosMethod, LanczosResult, NtkKind, NtkResult, NTKProbeResult,
                                     SpectrumResult)

__all__ = ["NtkKind", "NtkMethod", "KernelMethod", "KERNEL_METHODS", "LanczosMethod", "NtkResult", "SpectrumResult",
           "LanczosResult", "NTKProbeResult", "empirical_ntk", "ntk_spectrum", "ntk_topk_lanczos", "ntk_operator"]

from probe.probes.ntk.probe import NTK_PROBE, NTKParams, compute  # noqa: E402  (registers `probe ntk`)

__all__ += ["NTK_PROBE", "NTKParams", "compute"]
