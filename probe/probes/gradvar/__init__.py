"""The gradient-variance probe: mini-batch gradient noise, per-sample gradient variance and signal
propagation, per layer, for any model.

Layout: :mod:`.api` (:func:`gradient_variance`, the definitions), :mod:`._minibatch`,
:mod:`._per_sample`, :mod:`._signal` (its three parts), :mod:`._common` (:class:`GradVarParams`,
the BatchNorm mode, shared helpers), :mod:`.result` (:class:`GradVarResult`), :mod:`.probe`
(``compute`` and the registration of ``probe gradvar``).

    >>> res = gradient_variance(model, x, y, GradVarParams(batches=8, batch_size=32))
    >>> print(res.text())
"""
from probe.probes.gradvar._common import GradVarParams, LossFn, bn_mode, cross_entropy_per_sample
from probe.probes.gradvar._minibatch import MinibatchStats, minibatch_gradient_stats, minibatch_indices
from probe.probes.gradvar._per_sample import PerSampleStats, _groups, per_sample_gradients, per_sample_variance  # noqa: F401
from probe.probes.gradvar._signal import SignalStats, find_blocks, signal_propagation
from probe.probes.gradvar.api import gradient_variance
from probe.probes.gradvar.result import GradVarResult

__all__ = ["GradVarParams", "GradVarResult", "MinibatchStats", "PerSampleStats", "SignalStats",
           "LossFn", "cross_entropy_per_sample", "minibatch_indices", "minibatch_gradient_stats",
           "per_sample_gradients", "per_sample_variance", "signal_propagation", "find_blocks",
           "bn_mode", "gradient_variance"]

from probe.probes.gradvar.probe import GRADVAR_PROBE, compute  # noqa: E402  (registers `probe gradvar`)

__all__ += ["GRADVAR_PROBE", "compute"]
