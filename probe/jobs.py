"""Probe jobs: resolve a model (by name at init, or a run's checkpoints), draw the probe data,
run a probe library function, and save the result in the run store.

The CLI and ``probe demo`` call these; the maths lives in the probe modules (``probe.ntk``,
``probe.eigenlearning``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from probe.errors import UserError

__all__ = ["ProbeTarget", "iter_targets", "probe_inputs", "run_ntk_probe", "calibrate_batchnorm"]


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


@dataclass
class ProbeTarget:
    """One model to probe: a registered model at init, or a run at a checkpoint (0 = init)."""

    model: nn.Module
    model_name: str
    run_id: str | None
    epoch: int | None
    data: str


def _parse_checkpoint(text: str | int | None) -> str | int:
    if text is None or text in ("last", "all", "init"):
        return text or "last"
    try:
        return int(text)
    except (TypeError, ValueError):
        raise UserError(f"--checkpoint {text!r}: expected an epoch number, last, init or all") from None


def iter_targets(store, *, model: str | None = None, run: str | None = None, checkpoint=None,
                 data: str | None = None, seed: int = 0, model_args: dict | None = None) -> Iterator[ProbeTarget]:
    """Yield the models a probe command should look at."""
    from probe.data import load_data
    from probe.train import build_model, load_run_model

    if (model is None) == (run is None):
        raise UserError("give exactly one of --model NAME or --run RUN")
    if model is not None:
        if checkpoint not in (None, "init"):
            raise UserError("--checkpoint needs --run (a model given by name is probed at its initialisation)")
        name = data or "digits"
        d = load_data(name, limit_train=16, limit_test=16)
        torch.manual_seed(seed)
        m = build_model(model, num_classes=d.num_classes, in_chans=d.in_channels, image_size=d.image_size[0],
                        model_kwargs=model_args)
        yield ProbeTarget(m.eval(), model, None, None, name)
        return
    ckpt = _parse_checkpoint(checkpoint)
    run_id = store.resolve_run(run)
    run_data = store.get_run(run_id)["data"]
    if data is not None and data != run_data:
        raise UserError(f"run {run_id} was trained on {run_data!r}; probe it on that data (drop --data)")
    if ckpt == "all":
        epochs: list = ["init"] + [c["epoch"] for c in store.list_checkpoints(run_id)]
    else:
        epochs = [ckpt]
    for ep in epochs:
        m, info, loaded = load_run_model(store, run_id, ep)
        yield ProbeTarget(m, info["model"], run_id, loaded or 0, run_data)


def probe_inputs(data: str, n: int, *, split: str = "train", seed: int = 0):
    """``n`` class-balanced samples (x, y, num_classes) of a data set split, deterministic."""
    from probe.data import load_data

    if n < 2:
        raise UserError(f"--n must be at least 2, got {n}")
    d = load_data(data, limit_train=n if split == "train" else None, limit_test=n if split == "test" else None,
                  seed=seed)
    x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)
    if x.shape[0] < n:
        raise UserError(f"data set {data!r} has only {x.shape[0]} {split} samples; use --n {x.shape[0]} or less")
    return x[:n], y[:n], d.num_classes


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
                  save: bool = True, model_args: dict | None = None) -> list[dict]:
    """Empirical NTK spectra (and eigenlearning predictions) for each target; one catalog row each.

    Over several targets (``checkpoint="all"``) a target that fails with a :class:`UserError`
    (e.g. a diverged checkpoint whose kernel overflows) becomes a result with an ``error`` and
    the others go on; when every target fails, the first error is raised."""
    from probe.train import resolve_device

    dev = resolve_device(device)
    budget = int(memory_budget_gb * 2 ** 30)
    results: list[dict] = []
    errors: list[UserError] = []
    for target in iter_targets(store, model=model, run=run, checkpoint=checkpoint, data=data, seed=seed,
                               model_args=model_args):
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


def _ntk_target(store, target: "ProbeTarget", *, n, kind, method, topk, lanczos_operator, dev, budget,
                memory_budget_gb, seed, eigenlearning, trials, dtype, quiet, save) -> dict:
    from probe.ntk import empirical_ntk, ntk_spectrum, ntk_topk_lanczos

    x, y, num_classes = probe_inputs(target.data, n, seed=seed)
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
              "lanczos_operator": lanczos_operator,
              "dtype": dtype, "memory_budget_gb": memory_budget_gb}
    if save:
        summary["probe_id"] = store.add_probe("ntk", model=target.model_name, run_id=target.run_id,
                                              checkpoint_epoch=target.epoch, params=params, summary=summary,
                                              arrays=arrays)
    return summary
