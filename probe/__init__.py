"""landscape-probe: loss-landscape and generalization probes for any PyTorch model.

The public API, flat: every computation is one import (``apps/`` and ``experiments/`` import only
public names), grouped by role in ``_GROUPS`` (store, data, training, the probe framework, the
probes' functions, linear algebra, eigenlearning, functional models, figures). Each name loads its
module on first use, so ``import probe`` itself imports no torch::

    >>> import probe
    >>> h = probe.hessian_spectrum(model, x, y, k=5)
    >>> K = probe.empirical_ntk(model, x)
    >>> store = probe.RunStore("runs")
    >>> outcomes = probe.run_probe(store, "ntk", {"kind": "trace"}, model="mul_resnet", n=64)
"""
from __future__ import annotations

import importlib

from probe.errors import DataError, DiskFullError, OutOfMemory, StoreError, UserError, first_line

__version__ = "0.1.0"

# public name -> module that defines it, grouped by role; each loads on first use
_GROUPS: dict[str, dict[str, str]] = {
    "store": {name: "probe.store" for name in (
        "RunStore", "resolve_runs_root", "rebuild_catalog", "to_jsonable", "atomic_write_text", "atomic_write_bytes",
        "atomic_torch_save", "export_run", "run_metrics_frame")},
    "data": {name: "probe.data" for name in (
        "load_data", "DataSplits", "DATASETS", "data_roots", "find_data", "register_dataset", "unregister_dataset")},
    "training": {name: "probe.training" for name in (
        "train", "TrainConfig", "TrainResult", "TrainingDiverged", "resume", "load_run_model", "build_model", "lr_at",
        "evaluate", "resolve_device", "PRESETS", "load_weights")},
    "probe framework": {
        **{name: "probe.probes.registry" for name in (
            "Probe", "ProbeContext", "StoredResult", "Figure", "Measure", "register", "unregister", "get_probe",
            "list_probes")},
        **{name: "probe.jobs" for name in ("run_probe", "load_result", "figure_entries", "Outcome", "DataSpec")},
        "Progress": "probe.runtime.progress"},
    "probes": {
        "saturation": "probe.probes.saturation", "SaturationResult": "probe.probes.saturation",
        "gradient_variance": "probe.probes.gradvar", "per_sample_gradients": "probe.probes.gradvar",
        "signal_propagation": "probe.probes.gradvar", "GradVarResult": "probe.probes.gradvar",
        "hessian_spectrum": "probe.probes.hessian", "curvature_operator": "probe.probes.hessian",
        "HessianResult": "probe.probes.hessian",
        "empirical_ntk": "probe.probes.ntk", "ntk_spectrum": "probe.probes.ntk", "ntk_topk_lanczos": "probe.probes.ntk",
        "ntk_operator": "probe.probes.ntk", "NtkResult": "probe.probes.ntk", "SpectrumResult": "probe.probes.ntk",
        "loss_surface": "probe.probes.surface", "random_directions": "probe.probes.surface",
        "pca_directions": "probe.probes.surface", "SurfaceResult": "probe.probes.surface",
        "interpolation_paths": "probe.probes.interp", "InterpResult": "probe.probes.interp"},
    "linear algebra": {name: "probe.linalg" for name in (
        "SymmetricOperator", "DenseOperator", "CallableOperator", "block_lanczos", "extreme_eigenpairs",
        "hutchinson_trace", "hutchpp_trace", "slq_density", "spectrum_stats", "effective_rank")},
    "eigenlearning": {name: "probe.eigenlearning" for name in (
        "eigenlearning_predict", "eigenlearning_curve", "predict_from_kernel", "kernel_regression_mse")},
    "functional models": {name: "probe.functional" for name in (
        "functionalize", "calibrate_batchnorm", "eval_mode", "batchnorm_train_mode")},
    "figures": {"figures": "probe.figures", "write_html": "probe.figures"},
}
_EXPORTS = {name: module for group in _GROUPS.values() for name, module in group.items()}

__all__ = ["UserError", "DataError", "StoreError", "DiskFullError", "OutOfMemory", "first_line", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'probe' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"probe.{name}" else getattr(mod, name)   # a subpackage, or a name in it
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
