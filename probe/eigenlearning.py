"""Eigenlearning: closed-form predictions of kernel ridge regression (KRR) generalisation.

Implements the eigenframework of Simon, Dickens, Karkada & DeWeese, "The Eigenlearning Framework:
A Conservation Law Perspective on Kernel Regression and Wide Neural Networks" (TMLR 2023).
KRR with ridge delta on n samples, f_hat(x) = K(x, X) (K(X, X) + delta I)^-1 y, for a kernel with
eigenvalues lambda_i (multiplicities m_i) with respect to the data distribution, a target
f = sum_i v_i phi_i and label noise of variance eps^2:

* kappa > 0 solves   sum_i m_i lambda_i / (lambda_i + kappa) + delta / kappa = n
  (with delta = 0 and n >= the number of non-zero modes, kappa = 0: the kernel interpolates);
* mode learnability  L_i = lambda_i / (lambda_i + kappa);
* target learnability L(f) = sum_i v_i^2 L_i / sum_i v_i^2;
* overfitting coefficient E0 = n / (n - sum_i m_i L_i^2);
* test MSE  = E0 (sum_i (1 - L_i)^2 v_i^2 + eps^2)   -- against noisy test labels, i.e. the
  error against the clean target plus eps^2;
* train MSE = (delta / (n kappa))^2 * test MSE;
* conservation law: with delta = 0, the learnabilities of any orthonormal basis sum to n.

With multiplicities, ``target_coeffs[i]**2`` is the target's total power in eigenspace i.
Everything is numpy/scipy float64.

On a finite set of M points (the empirical measure, uniform on the points), :func:`kernel_eigensystem`
turns a kernel matrix and targets into (lambda_i, v_i); :func:`predict_from_kernel` predicts
learning curves and :func:`kernel_regression_mse` measures them by actual KRR with the same kernel.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import scipy.linalg
from scipy.optimize import brentq

from probe.errors import UserError

__all__ = ["solve_kappa", "learnabilities", "EigenlearningPrediction", "eigenlearning_predict",
           "LearningCurve", "eigenlearning_curve", "kernel_eigensystem", "predict_from_kernel",
           "KrrResult", "kernel_regression_mse", "measured_learnabilities"]


def _spectrum(eigenvalues, multiplicities) -> tuple[np.ndarray, np.ndarray]:
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size == 0:
        raise UserError("eigenvalues must not be empty")
    if not np.isfinite(lam).all():
        raise UserError("eigenvalues must be finite")
    scale = max(float(np.abs(lam).max()), 1e-300)
    if lam.min() < -1e-8 * scale:
        raise UserError(f"eigenvalues must be >= 0 (a PSD kernel); got {lam.min():.3g}")
    lam = np.clip(lam, 0.0, None)     # rounding-level negatives of a PSD kernel count as zero
    if multiplicities is None:
        m = np.ones_like(lam)
    else:
        m = np.asarray(multiplicities, dtype=np.float64).reshape(-1)
        if m.shape != lam.shape or (m <= 0).any():
            raise UserError("multiplicities must be positive, one per eigenvalue")
    return lam, m


def solve_kappa(eigenvalues, n: float, ridge: float = 0.0, multiplicities=None) -> float:
    """The effective regularisation kappa >= 0 for n samples and ridge delta (module docstring).

    Root of the decreasing function g(kappa) = sum_i m_i lambda_i/(lambda_i + kappa) + delta/kappa - n,
    found by Brent's method on log(kappa) inside a bracket derived in closed form:
    upper end (sum_i m_i lambda_i + delta)/n (where g < 0), lower end delta/(2n) when delta > 0
    (g > n there), otherwise r * min non-zero lambda with r = (N_nonzero/n - 1)/2 (each term is
    then > 1/(1 + r), so g > 0). Returns 0 when delta = 0 and n >= the number of non-zero modes.
    """
    lam, m = _spectrum(eigenvalues, multiplicities)
    n = float(n)
    if not n > 0:
        raise UserError(f"the number of samples n must be positive, got {n}")
    if ridge < 0 or not math.isfinite(ridge):
        raise UserError(f"ridge must be >= 0, got {ridge}")
    nz = lam > 0
    n_modes = float(m[nz].sum())
    if not nz.any():
        if ridge == 0:
            return 0.0
        return ridge / n                                  # g = delta/kappa - n
    if ridge == 0 and n >= n_modes:
        return 0.0
    lam_nz, m_nz = lam[nz], m[nz]

    def g(t: float) -> float:
        kappa = math.exp(t)
        return float((m_nz * lam_nz / (lam_nz + kappa)).sum()) + ridge / kappa - n

    hi = 2.0 * (float((m_nz * lam_nz).sum()) + ridge) / n
    if ridge > 0:
        lo = ridge / (2.0 * n)
    else:
        lo = 0.5 * min(1.0, n_modes / n - 1.0) * float(lam_nz.min())
    t_lo, t_hi = math.log(lo), math.log(hi)
    if t_lo >= t_hi:
        t_lo = t_hi - 1.0
    while g(t_lo) <= 0:                                   # defensive: the bound above guarantees g > 0
        t_lo -= 10.0
    t = brentq(g, t_lo, t_hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500)
    return math.exp(t)


def learnabilities(eigenvalues, kappa: float) -> np.ndarray:
    """Mode learnabilities L_i = lambda_i / (lambda_i + kappa); with kappa = 0, 1 for lambda_i > 0
    and 0 for lambda_i = 0 (a mode outside the kernel's range is never learned)."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    if kappa < 0:
        raise UserError(f"kappa must be >= 0, got {kappa}")
    if kappa == 0:
        return (lam > 0).astype(np.float64)
    return lam / (lam + kappa)


@dataclass(frozen=True, eq=False)
class EigenlearningPrediction:
    """Eigenframework prediction at one n. Multi-output targets (v of shape (M, C)): the
    learnability is power-weighted over outputs, sum_ic v_ic^2 L_i / sum_ic v_ic^2, and MSEs are
    summed over the C outputs (squared error of the vector output; noise_var per output)."""

    n: float
    ridge: float
    noise_var: float
    kappa: float
    mode_learnabilities: np.ndarray
    target_learnability: float
    e0: float
    test_mse: float
    train_mse: float

    def summary(self) -> dict[str, Any]:
        return {k: float(getattr(self, k)) for k in ("n", "ridge", "noise_var", "kappa",
                                                     "target_learnability", "e0", "test_mse",
                                                     "train_mse")}


def _power(target_coeffs, size: int) -> np.ndarray:
    v = np.asarray(target_coeffs, dtype=np.float64)
    if v.shape[0] != size:
        raise UserError(f"target_coeffs has {v.shape[0]} rows but there are {size} eigenvalues")
    return (v.reshape(size, -1) ** 2)                        # (M, C)


def eigenlearning_predict(eigenvalues, target_coeffs, n: float, ridge: float = 0.0,
                          noise_var: float = 0.0, multiplicities=None) -> EigenlearningPrediction:
    """Predicted kappa, learnabilities, E0 and test/train MSE of KRR with n samples.

    ``target_coeffs``: v_i, shape (M,) or (M, C) for C outputs (see
    :class:`EigenlearningPrediction` for how outputs are combined).
    """
    lam, m = _spectrum(eigenvalues, multiplicities)
    v2 = _power(target_coeffs, lam.size)
    if noise_var < 0:
        raise UserError(f"noise_var must be >= 0, got {noise_var}")
    kappa = solve_kappa(lam, n, ridge, m)
    L = learnabilities(lam, kappa)
    total = float(v2.sum())
    target_L = float((v2.sum(1) * L).sum() / total) if total > 0 else float("nan")
    denom = n - float((m * L * L).sum())
    # denom -> 0 at the interpolation threshold (delta = 0, n = number of modes): E0 diverges
    e0 = n / denom if denom > 1e-12 * n else math.inf
    bracket = float((v2.sum(1) * (1.0 - L) ** 2).sum()) + v2.shape[1] * noise_var
    test = e0 * bracket if bracket > 0 else 0.0
    if ridge == 0:
        train = 0.0
    else:
        train = (ridge / (n * kappa)) ** 2 * test
    return EigenlearningPrediction(n=float(n), ridge=float(ridge), noise_var=float(noise_var),
                                   kappa=kappa, mode_learnabilities=L, target_learnability=target_L,
                                   e0=e0, test_mse=test, train_mse=train)


@dataclass(frozen=True, eq=False)
class LearningCurve:
    """Predictions over a list of n (arrays aligned with ``ns``)."""

    ns: np.ndarray
    kappa: np.ndarray
    target_learnability: np.ndarray
    e0: np.ndarray
    test_mse: np.ndarray
    train_mse: np.ndarray
    ridge: float
    noise_var: float
    eigenvalues: np.ndarray
    target_power: np.ndarray            # v_i^2 summed over outputs, aligned with eigenvalues

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("ns", "kappa", "target_learnability", "e0", "test_mse",
                                              "train_mse", "eigenvalues", "target_power")}

    def summary(self) -> dict[str, Any]:
        return {"ridge": self.ridge, "noise_var": self.noise_var, "ns": self.ns.tolist(),
                "test_mse": self.test_mse.tolist(),
                "target_learnability": self.target_learnability.tolist()}


def eigenlearning_curve(eigenvalues, target_coeffs, ns: Sequence[float], ridge: float = 0.0,
                        noise_var: float = 0.0, multiplicities=None) -> LearningCurve:
    """:func:`eigenlearning_predict` for every n in ``ns`` (a learning curve)."""
    lam, m = _spectrum(eigenvalues, multiplicities)
    preds = [eigenlearning_predict(lam, target_coeffs, n, ridge, noise_var, m) for n in ns]
    v2 = _power(target_coeffs, lam.size).sum(1)
    return LearningCurve(ns=np.asarray(ns, dtype=np.float64),
                         kappa=np.array([p.kappa for p in preds]),
                         target_learnability=np.array([p.target_learnability for p in preds]),
                         e0=np.array([p.e0 for p in preds]),
                         test_mse=np.array([p.test_mse for p in preds]),
                         train_mse=np.array([p.train_mse for p in preds]),
                         ridge=float(ridge), noise_var=float(noise_var), eigenvalues=lam,
                         target_power=v2)


def _kernel_matrix(K) -> np.ndarray:
    try:
        import torch
        if isinstance(K, torch.Tensor):
            K = K.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(K, "kernel") and hasattr(K, "kind"):            # an NtkResult
        if K.kind != "trace" or not K.symmetric:
            raise UserError("eigenlearning needs a square trace kernel (empirical_ntk(..., kind='trace') "
                            "with x2=None)")
        K = K.kernel
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise UserError(f"the kernel must be a square (M, M) matrix, got shape {K.shape}")
    if not np.isfinite(K).all():
        raise UserError("the kernel has non-finite entries")
    return 0.5 * (K + K.T)


def _targets(Y, M: int) -> np.ndarray:
    Y = np.asarray(Y.detach().cpu().numpy() if hasattr(Y, "detach") else Y, dtype=np.float64)
    if Y.shape[0] != M:
        raise UserError(f"targets have {Y.shape[0]} rows but the kernel has {M} points")
    return Y.reshape(M, -1)


def kernel_eigensystem(K, Y) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues lambda (M,) descending and target coefficients v (M, C) on M points.

    The population is the empirical (uniform) measure on the M points. The integral operator
    (T f)(x) = (1/M) sum_m K(x, x_m) f(x_m) has the eigenfunctions phi_i(x_m) = sqrt(M) U[m, i]
    (orthonormal: (1/M) sum_m phi_i phi_j = delta_ij) for K = U diag(Lambda) U^T, with eigenvalues
    lambda_i = Lambda_i / M. The target's coefficients v_i = <f, phi_i> = U[:, i]^T Y / sqrt(M),
    so sum_i v_i^2 = ||Y||^2 / M, the mean squared target. Negative rounding-level eigenvalues are
    set to 0.
    """
    K = _kernel_matrix(K)
    M = K.shape[0]
    Y = _targets(Y, M)
    Lam, U = np.linalg.eigh(K)
    order = np.argsort(Lam)[::-1]
    lam = np.clip(Lam[order], 0.0, None) / M
    v = U[:, order].T @ Y / math.sqrt(M)
    return lam, v


def predict_from_kernel(K, Y, ns: Sequence[float], ridge: float = 0.0,
                        noise_var: float = 0.0) -> LearningCurve:
    """Eigenlearning learning curve for KRR with kernel K (M, M) on targets Y (M,) or (M, C).

    Uses :func:`kernel_eigensystem` (population = the M points). MSEs are summed over the C
    outputs (e.g. centred one-hot labels: the squared error of the vector output) and match
    :func:`kernel_regression_mse` with the same ``ridge`` and ``noise_var``.
    """
    lam, v = kernel_eigensystem(K, Y)
    return eigenlearning_curve(lam, v, ns, ridge, noise_var)


@dataclass(frozen=True, eq=False)
class KrrResult:
    """Measured KRR errors over random training sets (mean, std over trials, std of the mean)."""

    n: int
    ridge: float
    noise_var: float
    trials: int
    test_mse: float
    test_mse_std: float
    train_mse: float
    train_mse_std: float
    learnability: float
    learnability_std: float
    jitter: float               # largest diagonal jitter used (relative to mean diag K_nn), 0 if none

    @property
    def test_mse_sem(self) -> float:
        return self.test_mse_std / math.sqrt(self.trials)

    @property
    def learnability_sem(self) -> float:
        return self.learnability_std / math.sqrt(self.trials)

    def summary(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _krr_solve(Knn: np.ndarray, rhs: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """alpha = (K_nn + ridge I)^-1 rhs by Cholesky (``assume_a='pos'``).

    With ridge = 0 and a numerically singular K_nn (Cholesky fails or scipy warns that the
    matrix is ill-conditioned), a jitter j * mean(diag K_nn) I is added with j = 1e-12, 1e-11, ...
    up to 1e-6; the j used is returned so callers can report it.
    """
    n = Knn.shape[0]
    A = Knn + ridge * np.eye(n)
    scale = float(np.trace(Knn)) / n if n else 1.0
    for j in [0.0] + [10.0 ** e for e in range(-12, -5)]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
                return scipy.linalg.solve(A + j * scale * np.eye(n), rhs, assume_a="pos"), j
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning):
            if ridge > 0 and j == 0.0:
                raise UserError("K_nn + ridge*I is not positive definite: is the kernel PSD?") from None
    raise UserError("the training kernel K_nn is singular even with a 1e-6 relative jitter (repeated "
                    "or identical inputs?); use ridge > 0")


def kernel_regression_mse(K, Y, n: int, ridge: float = 0.0, noise_var: float = 0.0,
                          trials: int = 20, rng: np.random.Generator | int | None = None) -> KrrResult:
    """Measured test/train MSE and target learnability of KRR with kernel K on targets Y.

    Each trial draws n of the M points without replacement, adds N(0, noise_var) noise to their
    targets, fits alpha = (K_nn + ridge I)^-1 y_n (see :func:`_krr_solve` for the jitter used when
    ridge = 0 and K_nn is ill-conditioned) and predicts f_hat = K[:, train] alpha on all M points.
    The theory's population is the empirical measure on the M points, so the test error is taken
    over all of them (training points included, as a fresh draw would hit them with probability
    n/M): test MSE = mean_m ||f_hat(x_m) - Y_m||^2 + C * noise_var, the error against noisy test
    labels, as in the eigenframework; train MSE = mean over the n points of ||f_hat - y_noisy||^2;
    learnability = <f_hat, Y> / <Y, Y> on the M points. MSEs are summed over the C outputs.
    """
    K = _kernel_matrix(K)
    M = K.shape[0]
    Y = _targets(Y, M)
    n = int(n)
    if not 1 <= n <= M:
        raise UserError(f"n must be between 1 and the number of points {M}, got {n}")
    if trials < 1:
        raise UserError(f"trials must be >= 1, got {trials}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    yy = float((Y * Y).sum())
    tests, trains, learns, jit = [], [], [], 0.0
    for _ in range(int(trials)):
        idx = rng.choice(M, size=n, replace=False)
        y_tr = Y[idx] + (rng.standard_normal(Y[idx].shape) * math.sqrt(noise_var) if noise_var else 0.0)
        alpha, j = _krr_solve(K[np.ix_(idx, idx)], y_tr, ridge)
        jit = max(jit, j)
        f_hat = K[:, idx] @ alpha                                              # (M, C)
        tests.append(float(((f_hat - Y) ** 2).sum(1).mean()) + Y.shape[1] * noise_var)
        trains.append(float(((f_hat[idx] - y_tr) ** 2).sum(1).mean()))
        learns.append(float((f_hat * Y).sum()) / yy if yy > 0 else float("nan"))
    ddof = 1 if trials > 1 else 0
    return KrrResult(n=n, ridge=float(ridge), noise_var=float(noise_var), trials=int(trials),
                     test_mse=float(np.mean(tests)), test_mse_std=float(np.std(tests, ddof=ddof)),
                     train_mse=float(np.mean(trains)), train_mse_std=float(np.std(trains, ddof=ddof)),
                     learnability=float(np.mean(learns)),
                     learnability_std=float(np.std(learns, ddof=ddof)), jitter=jit)


def measured_learnabilities(K, F, train_idx, ridge: float = 0.0) -> np.ndarray:
    """Learnability <f_hat_j, f_j> / <f_j, f_j> (on all M points) of each target column F[:, j]
    for KRR trained, without noise, on the points ``train_idx``.

    With ridge 0 and F an orthogonal basis of all functions on the M points, the values sum to n
    (the conservation law): sum_j L_j = tr(K[:, S] K_SS^-1 E_S) = tr(I_n) = n.
    """
    K = _kernel_matrix(K)
    F = _targets(F, K.shape[0])
    idx = np.asarray(train_idx)
    alpha, _ = _krr_solve(K[np.ix_(idx, idx)], F[idx], ridge)
    f_hat = K[:, idx] @ alpha
    return (f_hat * F).sum(0) / (F * F).sum(0)
