"""Linear algebra shared by the probes: one symmetric-operator interface, one block Lanczos and the
extreme eigenpairs it gives, stochastic trace (Hutchinson, Hutch++) and density (stochastic
Lanczos quadrature) estimators, spectrum statistics of any PSD operator, and float64
accumulation of inner products.

An operator (an NTK, a Gram matrix J^T J, a Hessian, a GGN) implements
:class:`SymmetricOperator` -- ``size``, ``dtype``, ``device`` and ``matmat(V)`` on (size, b)
blocks -- and every solver here works with it alone.
"""
from probe.linalg._accumulate import dot64, norm64
from probe.linalg.eigenpairs import extreme_eigenpairs
from probe.linalg.lanczos import BlockLanczosResult, block_lanczos, multiplicity_note, unresolved_note
from probe.linalg.operator import CallableOperator, DenseOperator, SymmetricOperator
from probe.linalg.slq import DensityEstimate, slq_density
from probe.linalg.spectrum import (SpectrumStats, default_floor, dense_eigenvalues, effective_rank,
                                   participation_ratio, spectrum_stats)
from probe.linalg.trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = ["SymmetricOperator", "DenseOperator", "CallableOperator", "BlockLanczosResult", "block_lanczos",
           "extreme_eigenpairs", "TraceEstimate", "hutchinson_trace", "hutchpp_trace", "DensityEstimate",
           "slq_density", "unresolved_note", "multiplicity_note", "SpectrumStats", "spectrum_stats",
           "dense_eigenvalues", "default_floor", "effective_rank", "participation_ratio", "dot64", "norm64"]
