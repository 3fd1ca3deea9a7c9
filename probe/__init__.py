"""landscape-probe: loss-landscape and generalization probes for any PyTorch model.

The public API (``apps/`` and ``experiments/`` import only these names). Most submodules load on first
use::

    >>> import probe
    >>> store = probe.RunStore("runs")
    >>> outcomes = probe.run_probe(store, "ntk", {"kind": "trace"}, model="mul_resnet", n=64)
"""
from __future__ import annotations

import importlib

from probe.errors import DataError, DiskFullError, StoreError, UserError

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # run store
    "RunStore": "probe.store", "resolve_runs_root": "probe.store", "to_jsonable": "probe.store",
    # data
    "load_data": "probe.data", "DataSplits": "probe.data", "DATASETS": "probe.data",
    # training
    "train": "probe.training", "TrainConfig": "probe.training", "TrainResult": "probe.training",
    "TrainingDiverged": "probe.training", "resume": "probe.training", "load_run_model": "probe.training",
    "lr_at": "probe.training", "evaluate": "probe.training", "PRESETS": "probe.training",
    # probes: registry, runner, targets
    "Probe": "probe.probes.registry", "ProbeContext": "probe.probes.registry", "register": "probe.probes.registry",
    "get_probe": "probe.probes.registry", "list_probes": "probe.probes.registry",
    "run_probe": "probe.jobs", "load_result": "probe.jobs", "Outcome": "probe.jobs", "DataSpec": "probe.jobs",
    "calibrate_batchnorm": "probe.functional", "functionalize": "probe.functional", "eval_mode": "probe.functional",
    # eigenlearning
    "predict_from_kernel": "probe.eigenlearning", "kernel_regression_mse": "probe.eigenlearning",
    # figures
    "figures": "probe.figures",
}

__all__ = ["UserError", "DataError", "StoreError", "DiskFullError", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'probe' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith(name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
