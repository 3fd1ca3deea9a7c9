"""The input-space interpolation probe: the shape of the fitted function along mixup paths between
real samples and over planes through three of them.

Layout: :mod:`.api` (:func:`interpolation_paths`, the pure function, and the definitions),
:mod:`.result` (:class:`InterpResult`), :mod:`.probe` (:class:`InterpParams`, ``compute`` and the
registration of ``probe interp``).

    >>> r = interpolation_paths(model, x_test, y_test, pairs=64, steps=33)
    >>> r.deviation_max        # (P,) per path
    >>> r.summary()["different_class"]["deviation_max_mean"]
"""
from probe.probes.interp.api import check_options, interpolation_paths
from probe.probes.interp.result import GROUPS, InterpResult

__all__ = ["interpolation_paths", "check_options", "InterpResult", "GROUPS"]

from probe.probes.interp.probe import INTERP_PROBE, InterpParams, compute  # noqa: E402  (registers `probe interp`)

__all__ += ["INTERP_PROBE", "InterpParams", "compute"]
