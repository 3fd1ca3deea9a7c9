"""Probe jobs: resolve a model (by name at init, or a run's checkpoints), draw the probe data,
run a probe library function, and save the result in the run store.

The CLI and ``probe demo`` call these; the maths lives in the probe modules (``probe.ntk``,
``probe.eigenlearning``).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from probe.errors import UserError

__all__ = ["DataSpec", "ProbeTarget", "iter_targets", "run_data_spec", "probe_inputs", "run_ntk_probe",
           "calibrate_batchnorm"]


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the (cumulative) averages over
    ``x``. A model at initialisation has running stats (0, 1) that describe no data: in eval mode
    its BNs would not normalise, and a multiplicative network's outputs explode. Probes of models
    at init therefore use statistics estimated on the probe data; trained checkpoints keep theirs.
    """
    import copy

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    m2 = copy.deepcopy(model)
    for bn in (b for b in m2.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    m2.train()
    for i in range(0, x.shape[0], batch_size):
        m2(x[i:i + batch_size])
    for bn, orig in zip((b for b in m2.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)), bns):
        bn.momentum = orig.momentum
    return m2.eval()


@dataclass(frozen=True)
class DataSpec:
    """Which data a probe reads: a data set name with the settings a run was trained with (local
    ``root``, ``image_size``, and the ``seed`` that only ``synthetic`` uses), so a run is probed on
    inputs shaped and normalised as in its training."""

    name: str = "digits"
    root: str | None = None
    image_size: int | None = None
    seed: int = 0

    def load(self, **limits):
        from probe.data import load_data

        return load_data(self.name, self.root, image_size=self.image_size, seed=self.seed, **limits)


@dataclass
class ProbeTarget:
    """One model to probe: a registered model at init, or a run at a checkpoint (0 = init)."""

    model: nn.Module
    model_name: str
    run_id: str | None
    epoch: int | None
    data: str
    data_spec: DataSpec | None = None


def _parse_checkpoint(text: str | int | None) -> str | int:
    if text is None or text in ("last", "all", "init"):
        return text or "last"
    try:
        epoch = int(text)
    except (TypeError, ValueError):
        raise UserError(f"checkpoint {text!r}: expected an epoch number, last, init or all") from None
    if epoch < 0:
        raise UserError(f"checkpoint {text!r}: an epoch number is 0 or more")
    return epoch


def run_data_spec(run: dict, *, data: str | None = None, data_root: str | None = None,
                  image_size: int | None = None) -> DataSpec:
    """The data a run was trained on (its stored name, root, image size and seed). ``data_root``
    replaces the stored root (the files moved); a ``data`` or ``image_size`` that differs from the
    run's is refused."""
    cfg = run.get("config") or {}
    name, size = cfg.get("data") or run.get("data"), cfg.get("image_size")
    if data is not None and data != name:
        raise UserError(f"run {run['run_id']} was trained on {name!r}; probe it on that data (drop the data "
                        "option)")
    if image_size is not None and image_size != size:
        raise UserError(f"run {run['run_id']} was trained at image size {size or 'native'}; probe it at that "
                        "size (drop the image size option)")
    root = data_root if data_root is not None else cfg.get("data_root")
    seed = cfg.get("seed", 0)
    if not isinstance(name, str) or not (root is None or isinstance(root, str)) \
            or not (size is None or (isinstance(size, int) and 1 <= size <= 4096)) or not isinstance(seed, int):
        raise UserError(f"run {run['run_id']} has a malformed data config ({name!r}, root {root!r}, "
                        f"size {size!r}, seed {seed!r})")
    return DataSpec(name, root, size, seed)


def iter_targets(store, *, model: str | None = None, run: str | None = None, checkpoint=None,
                 data: str | None = None, seed: int = 0, model_args: dict | None = None,
                 data_root: str | None = None, image_size: int | None = None,
                 factory: str | None = None, trust_factory: bool = False) -> Iterator[ProbeTarget]:
    """Yield the models a probe command should look at.

    ``model``: a registered name or a user's ``package.module:factory``, at its seeded init, on
    ``data`` (default digits; ``data_root``, ``image_size``). ``run``: a stored run at ``checkpoint``
    (an epoch, ``last``, ``init`` or ``all``), probed on the data it was trained on; a run built by a
    user factory needs ``factory`` or ``trust_factory`` (stored names are never imported)."""
    from probe.train import build_model, check_model, load_run_model

    if (model is None) == (run is None):
        raise UserError("give exactly one of a model name or a run")
    if model is not None:
        if checkpoint not in (None, "init"):
            raise UserError("a checkpoint needs a run (a model given by name is probed at its initialisation)")
        if factory is not None or trust_factory:
            raise UserError("a factory option applies to a stored run; give the factory itself as the model")
        spec = DataSpec(data or "digits", data_root, image_size, seed)
        d = spec.load(limit_train=16, limit_test=16)
        torch.manual_seed(seed)
        m = build_model(model, num_classes=d.num_classes, in_chans=d.in_channels, image_size=d.image_size[0],
                        model_kwargs=model_args)
        check_model(m, d.x_train[:2], d.num_classes, model)
        yield ProbeTarget(m.eval(), model, None, None, spec.name, spec)
        return
    if model_args:
        raise UserError("model arguments apply to a model given by name; a run rebuilds its model from its config")
    ckpt = _parse_checkpoint(checkpoint)
    run_id = store.resolve_run(run)
    info = store.get_run(run_id)
    spec = run_data_spec(info, data=data, data_root=data_root, image_size=image_size)
    if ckpt == "all":
        epochs: list = ["init"] + [c["epoch"] for c in store.list_checkpoints(run_id)]
    else:
        epochs = [ckpt]
    for ep in epochs:
        m, info, loaded = load_run_model(store, run_id, ep, factory=factory, trust_factory=trust_factory)
        yield ProbeTarget(m, info["model"], run_id, loaded or 0, spec.name, spec)


def probe_inputs(data: DataSpec | str, n: int, *, split: str = "train", seed: int = 0):
    """``n`` class-balanced samples (x, y, num_classes) of a data set split, deterministic.

    ``data`` is a :class:`DataSpec` (a bare name means that data set with default settings and
    ``seed`` for ``synthetic``)."""
    spec = data if isinstance(data, DataSpec) else DataSpec(data, seed=seed)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_PROBE_INPUTS:
        raise UserError(f"n must be an integer in [2, {MAX_PROBE_INPUTS}], got {n!r}")
    d = spec.load(limit_train=n if split == "train" else None, limit_test=n if split == "test" else None)
    x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)
    if x.shape[0] < n:
        raise UserError(f"data set {spec.name!r} has only {x.shape[0]} {split} samples; use n = {x.shape[0]} "
                        "or less")
    return x[:n], y[:n], d.num_classes


#: Most inputs a probe takes (the NTK's Lanczos path scales to this; kernels are bounded by memory).
MAX_PROBE_INPUTS = 10 ** 6


def _eigenlearning(K: np.ndarray, y: np.ndarray, num_classes: int, ns: list[int], trials: int, seed: int) -> dict:
    from probe.eigenlearning import kernel_regression_mse, predict_from_kernel

    Y = np.eye(num_classes)[y] - 1.0 / num_classes  # centred one-hot (M, C)
    curve = predict_from_kernel(K, Y, ns)
    rows = []
    for i, n in enumerate(ns):
        meas = kernel_regression_mse(K, Y, n, trials=trials, rng=seed + i)
        rows.append({"n": int(n), "predicted_test_mse": float(curve.test_mse[i]),
                     "measured_test_mse": meas.test_mse, "measured_test_mse_std": meas.test_mse_std,
                     "predicted_learnability": float(curve.target_learnability[i]),
                     "measured_learnability": meas.learnability, "kappa": float(curve.kappa[i]),
                     "e0": float(curve.e0[i])})
    return {"targets": "centred one-hot", "rows": rows}


def run_ntk_probe(store, *, model: str | None = None, run: str | None = None, checkpoint=None,
                  data: str | None = None, n: int = 128, kind: str = "trace", method: str = "auto",
                  topk: int = 10, lanczos_operator: str = "auto", device: str = "auto",
                  memory_budget_gb: float = 2.0, seed: int = 0,
                  eigenlearning: bool = True, trials: int = 10, dtype: str = "float64", quiet: bool = False,
                  save: bool = True, model_args: dict | None = None, data_root: str | None = None,
                  image_size: int | None = None, factory: str | None = None,
                  trust_factory: bool = False) -> list[dict]:
    """Empirical NTK spectra (and eigenlearning predictions) for each target; one catalog row each.

    Over several targets (``checkpoint="all"``) a target that fails with a :class:`UserError`
    (e.g. a diverged checkpoint whose kernel overflows) becomes a result with an ``error`` and
    the others go on; when every target fails, the first error is raised."""
    from probe.train import MAX_SEED, resolve_device

    _check_int("n", n, 2, MAX_PROBE_INPUTS)
    _check_int("topk", topk, 1, 100_000)
    _check_int("trials", trials, 1, 10_000)
    _check_int("seed", seed, 0, MAX_SEED)
    if isinstance(memory_budget_gb, bool) or not isinstance(memory_budget_gb, (int, float)) \
            or not math.isfinite(memory_budget_gb) or not 1e-6 <= memory_budget_gb <= 1e6:
        raise UserError(f"memory budget must be a number of GiB in [1e-6, 1e6], got {memory_budget_gb!r}")
    if dtype not in ("float32", "float64"):
        raise UserError(f"dtype must be float32 or float64, got {dtype!r}")
    dev = resolve_device(device)
    budget = int(memory_budget_gb * 2 ** 30)
    results: list[dict] = []
    errors: list[UserError] = []
    for target in iter_targets(store, model=model, run=run, checkpoint=checkpoint, data=data, seed=seed,
                               model_args=model_args, data_root=data_root, image_size=image_size,
                               factory=factory, trust_factory=trust_factory):
        try:
            results.append(_ntk_target(store, target, n=n, kind=kind, method=method, topk=topk,
                                       lanczos_operator=lanczos_operator, dev=dev, budget=budget,
                                       memory_budget_gb=memory_budget_gb, seed=seed,
                                       eigenlearning=eigenlearning, trials=trials, dtype=dtype,
                                       quiet=quiet, save=save))
        except UserError as e:
            if not quiet:
                print(f"[ntk] {target.model_name} epoch {target.epoch}: {e}", file=sys.stderr)
            errors.append(e)
            results.append({"model": target.model_name, "epoch": target.epoch, "data": target.data,
                             "n": n, "kind": kind, "error": str(e)})
    if errors and len(errors) == len(results):
        raise errors[0]
    return results


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UserError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def _ntk_target(store, target: "ProbeTarget", *, n, kind, method, topk, lanczos_operator, dev, budget,
                memory_budget_gb, seed, eigenlearning, trials, dtype, quiet, save) -> dict:
    from probe.ntk import empirical_ntk, ntk_spectrum, ntk_topk_lanczos

    x, y, num_classes = probe_inputs(target.data_spec or target.data, n, seed=seed)
    if not target.epoch:  # at initialisation: BN statistics from the probe data
        target.model = calibrate_batchnorm(target.model, x)
    label = f"{target.model_name}" + (f" epoch {target.epoch}" if target.run_id else " (init)")
    if not quiet:
        print(f"[ntk] {label}: {kind} kernel on {n} {target.data} samples ({method})", file=sys.stderr)
    arrays: dict[str, np.ndarray] = {"labels": y.numpy()}
    summary: dict = {"model": target.model_name, "epoch": target.epoch, "data": target.data, "n": n,
                     "kind": kind}
    if method == "lanczos":
        lz = ntk_topk_lanczos(target.model, x, k=topk, kind=kind, method=lanczos_operator, dtype=dtype,
                              device=dev, memory_budget_bytes=budget, seed=seed, progress=not quiet)
        arrays["eigenvalues"] = np.asarray(lz.eigenvalues)
        summary.update({"method": "lanczos", "lanczos": lz.summary(),
                        "top_eigenvalues": [float(v) for v in lz.eigenvalues[:topk]]})
        if eigenlearning and not quiet:
            print("[ntk] eigenlearning needs the whole spectrum: skipped with --method lanczos", file=sys.stderr)
    else:
        res = empirical_ntk(target.model, x, kind=kind, method=method, memory_budget_bytes=budget,
                            dtype=dtype, device=dev, progress=not quiet)
        K = res.kernel
        summary.update(res.summary())
        spec_kernel = K if kind != "diagonal" else K.sum(0)
        yy = np.eye(num_classes)[y.numpy()] - 1.0 / num_classes if kind != "full" else None
        spec = ntk_spectrum(spec_kernel, yy)
        summary["spectrum"] = spec.summary()
        summary["top_eigenvalues"] = [float(v) for v in spec.eigenvalues[:topk]]
        arrays["kernel"] = K
        arrays["eigenvalues"] = spec.eigenvalues
        if eigenlearning and kind == "trace":
            # per-output kernel: the trace kernel sums O output kernels
            Kper = K / res.n_outputs
            ns = sorted({max(2, n // 8), max(2, n // 4), max(2, n // 2)})
            el = _eigenlearning(Kper, y.numpy(), num_classes, ns, trials, seed)
            summary["eigenlearning"] = el
            arrays["el_n"] = np.array([r["n"] for r in el["rows"]])
            arrays["el_predicted"] = np.array([r["predicted_test_mse"] for r in el["rows"]])
            arrays["el_measured"] = np.array([r["measured_test_mse"] for r in el["rows"]])
    params = {"n": n, "kind": kind, "method": method, "topk": topk, "data": target.data, "seed": seed,
              "data_root": target.data_spec.root if target.data_spec else None,
              "image_size": target.data_spec.image_size if target.data_spec else None,
              "lanczos_operator": lanczos_operator,
              "dtype": dtype, "memory_budget_gb": memory_budget_gb}
    if save:
        summary["probe_id"] = store.add_probe("ntk", model=target.model_name, run_id=target.run_id,
                                              checkpoint_epoch=target.epoch, params=params, summary=summary,
                                              arrays=arrays)
    return summary
