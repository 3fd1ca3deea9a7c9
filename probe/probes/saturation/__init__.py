"""The saturation probe: how far into the flat tails of their squashing functions the gates of a
model sit.

Layout: :mod:`.api` (:func:`saturation`, the pure function, and its definitions), :mod:`.result`
(:class:`SaturationResult`), :mod:`.probe` (:class:`SaturationParams`, ``compute`` and the
registration of ``probe saturation``).

    >>> r = saturation(models.create_model("tiny_triplet"), torch.randn(64, 1, 8, 8))
    >>> r.frac_output_sat          # (G,) per gate
    >>> r.summary()["model"]       # model-wide numbers
"""
from probe.probes.saturation.api import GATE_KINDS, check_options, saturation
from probe.probes.saturation.result import NO_GATES_NOTE, OUTPUT_BANDS, SaturationResult

__all__ = ["saturation", "check_options", "SaturationResult", "GATE_KINDS", "OUTPUT_BANDS", "NO_GATES_NOTE"]

from probe.probes.saturation.probe import SATURATION_PROBE, SaturationParams, compute  # noqa: E402  (registers `probe saturation`)

__all__ += ["SATURATION_PROBE", "SaturationParams", "compute"]
