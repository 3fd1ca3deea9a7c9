"""Probes: one module each, registered once (see :mod:`probe.probes.registry`)."""
from probe.probes.registry import (Probe, ProbeContext, Progress, get_probe, list_probes, load_probes,
                                   register)

__all__ = ["Probe", "ProbeContext", "Progress", "register", "get_probe", "list_probes", "load_probes"]
