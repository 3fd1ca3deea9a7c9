"""The regime grid of the ``regimes`` experiment and its statistics.

A *regime* is a data set, a training-set size and a network depth (WRN-depth-2 with the seed's
pre-activation block) with a training recipe. In every regime the additive baseline ``fmm01``
(``bn(r) + s``), the plain product ``fmm18`` (``bn(r) * bn(s)``) and the rows that recover most of
the seed's gap are trained over several seeds. Each run is then measured in **eval mode on its
own training samples** as well as on the test split, so that a variant's test error splits into

    test error = training error (optimisation) + generalisation gap (test - train)

and the add-vs-mul difference in test error splits the same way; the *optimisation share* is
the part of the difference that the training errors already show (near 1: the variant fails to
fit; near 0: it fits as well and generalises worse).

The statistics here are deliberately plain and tested against closed forms: a percentile
bootstrap over seeds for the gap and its optimisation share (seeds resampled jointly: seed ``s``
of the variant and of the baseline share the data order), Spearman's rank correlation with its
p-value, Holm's step-down correction over the measures tested together, and the
matched-training-loss reading (:func:`matched_reading`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

__all__ = ["Regime", "Settings", "settings", "regime_config", "extended_config", "VARIANTS", "BASELINE",
           "holm", "gap_split", "matched_reading", "spearman_p", "TRAINED_LOSS_FRACTION", "is_trained",
           "answer_for", "MATCH_TOLERANCE"]

#: the additive baseline row, bn(r) + s
BASELINE = "fmm01"
#: the pair (fmm01 vs fmm18) and the rows that recover most of the seed's gap
VARIANTS = ("fmm01", "fmm18", "fmm08", "fmm14", "fmm30", "fmm38")


@dataclass(frozen=True)
class Regime:
    """One cell of the grid: ``data`` (a :func:`probe.load_data` name), ``n_train`` class-balanced
    training samples (None: all), WRN ``depth`` (widen 2), ``image_size`` (None: native), and the
    recipe (SGD momentum 0.9, cosine from ``lr``, weight decay 5e-4, dropout the WRN default)."""

    data: str
    n_train: int | None
    depth: int
    epochs: int
    batch_size: int = 64
    image_size: int | None = None
    limit_test: int | None = None
    lr: float = 0.02

    @property
    def name(self) -> str:
        short = {"fashion-mnist": "fmnist"}.get(self.data, self.data)
        n = "all" if self.n_train is None else (f"{self.n_train // 1000}k" if self.n_train % 1000 == 0
                                                  else str(self.n_train))
        return f"{short}-{n}-d{self.depth}"


@dataclass(frozen=True)
class Settings:
    """What one call of the experiment trains and measures. ``extend``: the epoch factors a run
    of the worse-fitting side of a pair is re-trained with for the matched-loss comparison (the
    smallest that reaches the other side's training loss is used); ``matched``: the variants whose
    pair with the baseline gets that comparison (None: every variant)."""

    regimes: tuple[Regime, ...]
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    extend: tuple[int, ...] = (2,)
    matched: tuple[str, ...] | None = ("fmm18",)
    init_probes: tuple[str, ...] = ("gradvar", "saturation", "hessian", "ntk")
    n_boot: int = 2000


_DEPTHS = (10, 16, 22)


def settings(quick: bool) -> Settings:
    """``quick``: digits (128 samples / all 1,347) and Fashion-MNIST at 16x16 (1k samples for 8
    epochs, 2k for 4; 1,000 class-balanced test samples), depths 10, 16 and 22, 3 seeds: about an
    hour on 2 CPU cores. Full:
    Fashion-MNIST at 28x28 with 1k, 10k and all 60k samples and the whole test set, 5 seeds, the
    matched-loss comparison for every variant (GPU hours)."""
    digits = [Regime("digits", 128, d, epochs=8, batch_size=32) for d in _DEPTHS]
    digits += [Regime("digits", None, d, epochs=12) for d in _DEPTHS]
    if quick:
        fm = [Regime("fashion-mnist", n, d, epochs=e, image_size=16, limit_test=1000)
              for n, e in ((1000, 8), (2000, 4)) for d in _DEPTHS]
        return Settings(tuple(digits + fm))
    fm = [Regime("fashion-mnist", n, d, epochs=e) for n, e in ((1000, 30), (10000, 15), (None, 10)) for d in _DEPTHS]
    return Settings(tuple(digits + fm), seeds=(0, 1, 2, 3, 4), extend=(2, 4), matched=None)


def regime_config(regime: Regime, variant: str, seed: int):
    """The :class:`~probe.training.TrainConfig` of one variant in one regime."""
    from probe import TrainConfig

    return TrainConfig(model="wrn", fusion=variant, model_kwargs={"depth": regime.depth, "widen": 2},
                       data=regime.data, epochs=regime.epochs, batch_size=regime.batch_size, lr=regime.lr,
                       momentum=0.9, weight_decay=5e-4, schedule="cosine", seed=seed, image_size=regime.image_size,
                       limit_train=regime.n_train, limit_test=regime.limit_test)


def extended_config(regime: Regime, variant: str, seed: int, factor: int):
    """The same run re-trained over ``factor`` times the epochs (its cosine schedule stretched)."""
    return replace(regime_config(regime, variant, seed), epochs=regime.epochs * factor)


# --- training: trained or not ---------------------------------------------------------------

#: a run counts as trained when its eval-mode training loss ends below this fraction of the loss
#: of a uniform guess, ln(K): a run that has not brought its loss 10% below a guess has not started
#: to fit (the plain product at depth 16 ends at 0.98 ln 10; a slow but real start, e.g. 0.66, trains)
TRAINED_LOSS_FRACTION = 0.9


def is_trained(train_loss: float | None, num_classes: int = 10) -> bool:
    """Whether a run with eval-mode training loss ``train_loss`` trained (None / NaN: it did not,
    e.g. it diverged)."""
    return train_loss is not None and math.isfinite(train_loss) and train_loss < TRAINED_LOSS_FRACTION * math.log(num_classes)


# --- statistics -------------------------------------------------------------------------------


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (family-wise error) of the hypotheses tested together;
    a missing p-value (None / NaN) is left out of the family and stays None. With ``m`` p-values
    sorted ``p_(1) <= ... <= p_(m)``, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    out: list[float | None] = [None] * len(pvalues)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def spearman_p(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman's rho with its two-sided p-value (scipy's t approximation) over the pairs where
    both are finite; rho and p are None with fewer than 4 pairs or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "p": None, "n": int(len(x))}
    r = spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": int(len(x))}


def _mean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def gap_split(base_test: Sequence[float], base_train: Sequence[float], var_test: Sequence[float],
              var_train: Sequence[float], *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """The variant-minus-baseline difference in test error (points) and its split.

    Arguments are per-seed errors (percent; index ``s`` = seed ``s`` of both sides; NaN = missing,
    e.g. a diverged run). ``test_gap`` = mean variant test error - mean baseline test error;
    ``train_gap`` the same on the eval-mode training error; ``gen_gap`` = ``test_gap - train_gap``
    (the difference in generalisation gaps); ``opt_share`` = ``train_gap / test_gap``. Intervals:
    percentile bootstrap resampling the seeds (jointly for both sides); the share's interval is
    given only when the test gap's interval excludes 0 (a share of no gap means nothing), and the
    share is clipped to no bound: a share above 1 means the variant fits worse than it tests."""
    bt, br, vt, vr = (np.asarray(a, dtype=np.float64) for a in (base_test, base_train, var_test, var_train))
    if not (bt.shape == br.shape == vt.shape == vr.shape) or bt.ndim != 1:
        raise ValueError("gap_split needs four per-seed arrays of one length")
    test_gap = _mean(vt) - _mean(bt)
    train_gap = _mean(vr) - _mean(br)
    out = {"n_seeds": int(bt.size), "test_gap": test_gap, "train_gap": train_gap, "gen_gap": test_gap - train_gap,
           "opt_share": train_gap / test_gap if test_gap != 0 and math.isfinite(test_gap) else float("nan")}
    rng = np.random.default_rng(seed)
    tg, sh = np.full(n_boot, np.nan), np.full(n_boot, np.nan)
    for b in range(n_boot):
        i = rng.integers(0, bt.size, size=bt.size)
        t = _mean(vt[i]) - _mean(bt[i])
        r = _mean(vr[i]) - _mean(br[i])
        tg[b] = t
        sh[b] = r / t if t != 0 else np.nan
    q = [(1 - level) / 2, (1 + level) / 2]
    ok = np.isfinite(tg)
    out["test_gap_lo"], out["test_gap_hi"] = ((float(v) for v in np.quantile(tg[ok], q)) if ok.any()
                                              else (float("nan"), float("nan")))
    excludes_zero = ok.any() and (out["test_gap_lo"] > 0 or out["test_gap_hi"] < 0)
    oks = np.isfinite(sh)
    if excludes_zero and oks.any():
        out["opt_share_lo"], out["opt_share_hi"] = (float(v) for v in np.quantile(sh[oks], q))
    else:
        out["opt_share_lo"] = out["opt_share_hi"] = float("nan")
    out["gap_excludes_zero"] = bool(excludes_zero)
    return out


#: the extended run's training loss counts as matched within this factor of the target
MATCH_TOLERANCE = 1.1


def matched_reading(target_loss: float, tries: Sequence[tuple[int, float, float]], original_gap: float,
                    base_test: float) -> dict:
    """The matched-training-loss comparison of one pair.

    ``target_loss``: the better-fitting side's mean eval-mode training loss; ``tries``: for each
    epoch factor (ascending), ``(factor, mean training loss, mean test error)`` of the worse-fitting
    side re-trained that long; ``original_gap`` the test-error gap (worse-fitting minus
    better-fitting side) before; ``base_test`` the better side's mean test error. Returns the first
    try whose loss is within :data:`MATCH_TOLERANCE` of the target (status ``matched``), else the
    longest (status ``not reached``), with the gap at that point and the fraction of the original
    gap that remains (``remaining``: near 0, the gap closes at matched loss: optimisation; near 1
    or above, it persists: generalisation)."""
    if not tries:
        return {"status": "not run", "factor": None, "train_loss": None, "matched_gap": None, "remaining": None}
    chosen, status = tries[-1], "not reached"
    for t in tries:
        if math.isfinite(t[1]) and t[1] <= target_loss * MATCH_TOLERANCE:
            chosen, status = t, "matched"
            break
    gap = chosen[2] - base_test
    remaining = gap / original_gap if original_gap and math.isfinite(original_gap) else float("nan")
    return {"status": status, "factor": chosen[0], "train_loss": chosen[1], "matched_gap": gap, "remaining": remaining}


def answer_for(split: dict, matched: dict | None) -> str:
    """One word for a pair in a regime, from its gap split and matched-loss reading:
    ``no gap`` (the test gap's interval covers 0), ``optimisation`` (the gap closes at matched
    training loss, the worse side does not train at all, or it cannot reach the other's loss and
    the training errors carry most of the gap), ``generalisation`` (the gap persists at matched loss, or without a matched comparison
    the training errors carry under a third of it), else ``mixed``."""
    if not split.get("gap_excludes_zero"):
        return "no gap"
    share = split.get("opt_share")
    if matched and matched.get("status") == "matched":
        rem = matched.get("remaining")
        if rem is not None and math.isfinite(rem):
            if rem <= 1 / 3:
                return "optimisation"
            if rem >= 2 / 3:
                return "generalisation"
            return "mixed"
    if matched and matched.get("status") == "does not train":
        return "optimisation"
    if matched and matched.get("status") == "not reached" and share is not None and share >= 2 / 3:
        return "optimisation"
    if share is not None and math.isfinite(share):
        if share >= 2 / 3:
            return "optimisation"
        if share <= 1 / 3:
            return "generalisation"
    return "mixed"
