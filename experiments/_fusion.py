"""What the fusion-table experiments share: the protocols the seed's 59 rows are trained under,
the training of every (row, protocol, seed) run (reused when the store holds a finished run of
the same recipe), and the statistics (Spearman's rank correlation with a bootstrap interval,
paired differences with a bootstrap interval).

The network is the comparison pair's (WRN-10-2 with the seed's pre-activation block at 8x8):
row fmm01 under a protocol is ``add_resnet`` under it, row fmm18 ``mul_resnet``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._common import Context, train_many
from probe.companions import load

__all__ = ["Protocol", "protocols", "local_protocols", "seeds", "row_ids", "fusion_config", "train_table", "accuracy_table",
           "eval_train_accuracy", "spearman_ci", "paired_ci", "BASELINE"]

#: the additive baseline row, bn(r) + s
BASELINE = "fmm01"


@dataclass(frozen=True)
class Protocol:
    """A training recipe for every row: ``limit_train`` class-balanced digits samples (None: all
    1,347), ``epochs``, ``batch_size``; SGD momentum 0.9, lr 0.02 cosine, weight decay 5e-4."""

    name: str
    limit_train: int | None
    epochs: int
    batch_size: int
    why: str
    data: str = "digits"


_PROTOCOLS = (
    Protocol("data-limited", 128, 8, 32,
             "128 training samples, 8 epochs: the additive baseline stays near 88%, far from its ceiling"),
    Protocol("short", None, 3, 64,
             "all 1,347 samples but 3 epochs: the baseline near 95%, slow starters still behind"),
    Protocol("converged", None, 15, 64,
             "all samples, 15 epochs: the baseline near its 98% ceiling (full setting only)"),
)


def local_protocols(root: str | os.PathLike | None = None) -> tuple[Protocol, ...]:
    """Protocols on the data sets found locally (in ``root`` alone when given, else on the loaders'
    search path, :func:`probe.data.data_roots`): CIFAR-10 (binary or python batches) and
    Caltech-101 (``101_ObjectCategories``, the seed's own data, at its 64x64)."""
    from probe import find_data

    out = []
    if find_data("cifar10", root) is not None:
        out.append(Protocol("cifar10-limited", 2000, 10, 64, "CIFAR-10 found locally: 2,000 training samples, "
                            "10 epochs (the baseline far from its ceiling)", data="cifar10"))
    if find_data("caltech101", root) is not None:
        out.append(Protocol("caltech101", None, 30, 64, "Caltech-101 found locally: the seed's data and split, "
                            "30 epochs", data="caltech101"))
    return tuple(out)


def protocols(quick: bool) -> tuple[Protocol, ...]:
    """The protocols run: quick the first two (CPU minutes), full all three on digits and those
    of :func:`local_protocols` (GPU hours)."""
    return _PROTOCOLS[:2] if quick else _PROTOCOLS + local_protocols()


def seeds(quick: bool) -> tuple[int, ...]:
    """Seeds per cell: three in the quick setting (an interval over seeds needs them), five in full."""
    return (0, 1, 2) if quick else (0, 1, 2, 3, 4)


def row_ids() -> list[str]:
    SEED_FUSIONS = load("models.seed_table").SEED_FUSIONS

    return [r.id for r in SEED_FUSIONS]


def fusion_config(row: str, protocol: Protocol, seed: int):
    """The :class:`~probe.training.TrainConfig` of one seed row under one protocol."""
    from probe import TrainConfig

    return TrainConfig(model="wrn", fusion=row, model_kwargs={"depth": 10, "widen": 2}, data=protocol.data,
                       epochs=protocol.epochs, batch_size=protocol.batch_size, lr=0.02, momentum=0.9,
                       weight_decay=5e-4, schedule="cosine", seed=seed, limit_train=protocol.limit_train)


def train_table(ctx: Context, rows: Sequence[str], protos: Sequence[Protocol], seed_list: Sequence[int]
                ) -> dict[tuple[str, str, int], str]:
    """``{(row, protocol name, seed): run id}`` for every combination, trained where missing."""
    keys = [(r, p, s) for p in protos for s in seed_list for r in rows]
    ids = train_many(ctx, [fusion_config(r, p, s) for r, p, s in keys], desc="fusion table")
    return {(r, p.name, s): rid for (r, p, s), rid in zip(keys, ids)}


def accuracy_table(ctx: Context, runs: dict[tuple[str, str, int], str]) -> dict[tuple[str, str, int], dict]:
    """``{key: {"best": best test top-1, "final": final test top-1, "train_final": train top-1 of
    the last epoch}}`` from the store's run rows and per-epoch metrics."""
    out = {}
    for key, rid in runs.items():
        summary = ctx.store.get_run(rid).get("summary") or {}
        metrics = ctx.store.get_metrics(rid)
        out[key] = {"best": summary.get("best_acc"), "final": summary.get("final_acc"),
                    "train_final": metrics[-1].get("train_top1") if metrics else None}
    return out


def _rank_corr(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def spearman_ci(x: Sequence[float], y: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                seed: int = 0) -> dict:
    """Spearman's rho of the pairs (x_i, y_i) with a percentile bootstrap interval over the
    pairs (resampled with replacement; resamples with a constant side are dropped). Pairs with
    a missing value are left out; ``n`` is how many were used."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    rho = _rank_corr(x, y)
    lo = hi = float("nan")
    if np.isfinite(rho):
        rng = np.random.default_rng(seed)
        boots = [_rank_corr(x[i], y[i]) for i in rng.integers(0, len(x), size=(n_boot, len(x)))]
        boots = np.asarray([b for b in boots if np.isfinite(b)])
        if boots.size:
            lo, hi = (float(v) for v in np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]))
    return {"rho": rho, "lo": lo, "hi": hi, "n": int(len(x))}


def paired_ci(diffs: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean paired difference over pairs (rows of ``diffs``, one column per seed; NaN = missing)
    with a bootstrap interval that resamples pairs and, within each, seeds."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim == 1:
        d = d[:, None]
    d = d[np.isfinite(d).any(axis=1)]
    if d.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n_pairs": 0}
    mean = float(np.nanmean(np.nanmean(d, axis=1)))
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    with warnings.catch_warnings():      # a resampled pair whose seeds are all missing: left out
        warnings.simplefilter("ignore", RuntimeWarning)
        for b in range(n_boot):
            rows = d[rng.integers(0, len(d), size=len(d))]
            cols = rng.integers(0, d.shape[1], size=rows.shape)
            boots[b] = np.nanmean(np.nanmean(np.take_along_axis(rows, cols, axis=1), axis=1))
    lo, hi = (float(v) for v in np.nanquantile(boots, [(1 - level) / 2, (1 + level) / 2]))
    return {"mean": mean, "lo": lo, "hi": hi, "n_pairs": int(len(d))}


def eval_train_accuracy(ctx: Context, run_id: str) -> float:
    """Top-1 (percent) of a run's last checkpoint on its own training samples in eval mode (the
    BatchNorm running statistics, as at test time): the training fit that the test accuracy is
    compared with, free of the train-mode / eval-mode difference of the per-epoch train top-1."""
    from probe import evaluate, load_data, load_run_model
    from probe import TrainConfig

    model, run, _ = load_run_model(ctx.store, run_id, "last")
    cfg = TrainConfig.from_dict(run["config"])
    data = load_data(cfg.data, cfg.data_root, image_size=cfg.image_size, seed=cfg.seed, limit_train=cfg.limit_train,
                     limit_test=cfg.limit_test)
    return float(evaluate(model, data.x_train, data.y_train)["top1"])

