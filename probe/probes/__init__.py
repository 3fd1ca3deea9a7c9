"""Probes: one package each (api, result, probe), registered once (see :mod:`probe.probes.registry`)."""
from probe.probes.registry import (Figure, Measure, Probe, ProbeContext, Progress, StoredResult, get_probe,
                                   list_probes, load_probes, register, summary_number, unregister)

__all__ = ["Probe", "ProbeContext", "Progress", "StoredResult", "Figure", "Measure", "summary_number", "register",
           "unregister", "get_probe", "list_probes", "load_probes"]
