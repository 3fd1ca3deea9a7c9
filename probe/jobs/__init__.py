"""Probe jobs: target resolution (``--model`` / ``--run`` / ``--checkpoint``, user factories) and the
one runner every probe goes through (data loaded once per sweep, BN statistics at initialisation,
per-target errors, one catalog row per target)."""
from probe.jobs.runner import Outcome, figure_entries, load_result, run_probe
from probe.jobs.targets import MAX_PROBE_INPUTS, DataSpec, ProbeTarget, iter_targets, probe_inputs, run_data_spec

__all__ = ["Outcome", "run_probe", "load_result", "figure_entries", "DataSpec", "ProbeTarget", "iter_targets",
           "run_data_spec", "probe_inputs", "MAX_PROBE_INPUTS"]
