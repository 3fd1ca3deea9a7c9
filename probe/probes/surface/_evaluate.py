"""Loss and accuracy at the points of a grid: theta(a, b) = theta0 + a d1 + b d2.

The parameters are affine in the grid coordinates, so a chunk of B points is one (B, P) matrix
``theta0 + c[:, :1] d1 + c[:, 1:] d2`` (the same elementwise arithmetic however the points are
batched: a point's parameters do not depend on its chunk), evaluated either

* ``vmap``: one ``torch.func.vmap`` over ``functional_call`` for a batch of points (the inputs are
  shared, the weights batched: convolutions become grouped convolutions) -- pays while a point's
  forward pass is launch-bound (small models and inputs; on a GPU far longer), or
* ``loop``: one ``functional_call`` per point -- once the forward pass is compute-bound, grouped
  convolutions over batched weights are slower on CPU than one plain convolution per point.

``auto`` chooses by the measured working set of a point's pass (the rule and the measurements at
:data:`VMAP_MAX_POINT_BYTES`) and falls back to the loop, with a note, where vmap cannot run the
model (e.g. a forward that calls ``.item()``).

Every forward pass is in eval mode with explicit buffers (dropout off, BatchNorm with running
statistics); with ``bn="recalibrate"`` the running statistics of every BatchNorm are first
re-estimated at each point by a pass over the subset in train mode (batches of 256, the
cumulative average of the batch means and unbiased variances, as
:func:`probe.functional.calibrate_batchnorm`): twice the forward cost per point, point by point.

Per point: the mean cross-entropy over the n samples (logits cast to float64, summed, / n) and
the top-1 accuracy; a non-finite loss is stored as NaN and so is its accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from probe.errors import UserError
from probe.functional import FunctionalModel, batchnorm_train_mode, couples_samples, unflatten_like

__all__ = ["Plan", "plan_evaluation", "evaluate_points", "centre_point", "RECALIBRATE_BATCH",
           "VMAP_MAX_POINT_BYTES", "VMAP_CALL_BYTES"]

_BN = nn.modules.batchnorm._BatchNorm
RECALIBRATE_BATCH = 256       # samples per train-mode batch of a BatchNorm re-estimation
LOOP_CHUNK = 16               # grid points per saved chunk in the plain loop
VMAP_MAX_BATCH = 256          # grid points per vmap call at most
#: The ``auto`` rule, by the working set w of one point's forward pass (bytes per sample x samples
#: per pass): vmap where w is at most VMAP_MAX_POINT_BYTES[device type], with at most
#: VMAP_CALL_BYTES[device type] / w points per call (and what the memory budget allows); a loop
#: otherwise. Measured on this CPU (one thread, ms per point, 128 digits samples unless said):
#: tiny_mlp (w 32 KB) loop 0.41, vmap x16 0.10; tiny_add 8x8 (512 KB) loop 3.2, vmap x64 2.1;
#: resnet20 8x8 (2.6 MB) loop 14.2, vmap x4 14.7, x16 12.0; tiny_add 32x32 (8 MB) loop 25, vmap x4
#: 22, x16 46; resnet20 32x32, 64 samples (16 MB) loop 85, vmap x4 121, x16 269: on CPU batched
#: weights pay only while the forward is launch-bound (grouped convolutions lose once it is
#: compute-bound). Whole grids at the default 256 samples: tiny_mlp auto (vmap) 0.26, loop 0.64;
#: tiny_add (w 1 MB) auto (vmap x16) 3.6, loop 3.8, vmap x225 5.9; resnet20_add (3 MB) auto (loop)
#: 22, vmap x81 78. The CUDA thresholds are not measured here: kernels stay launch-bound far longer.
VMAP_MAX_POINT_BYTES = {"cpu": 1 << 20, "cuda": 64 << 20}
#: Samples per forward pass on CPU at most: ResNet-20 at 3x32x32, 2 threads, one pass over 1,000
#: samples takes 1.05 s in one batch and 0.51 s in batches of 128 (the activations of a batch of
#: 128 stay in cache), so the whole subset in one batch doubled a grid's time.
CPU_SAMPLE_BATCH = 128
VMAP_CALL_BYTES = {"cpu": 16 << 20, "cuda": 2 << 30}


@dataclass(frozen=True)
class Plan:
    """How a grid is evaluated: ``vmap`` or a loop, ``chunk`` grid points per saved chunk,
    ``vmap_batch`` points per vmap call, ``sample_batch`` samples per forward pass,
    ``bytes_per_sample`` the measured working set of one sample's forward pass."""

    vmap: bool
    chunk: int
    vmap_batch: int
    sample_batch: int
    bytes_per_sample: int

    def to_arrays(self) -> dict:
        return {k: np.asarray([int(v)], dtype=np.int64) for k, v in self.__dict__.items()}

    @classmethod
    def from_arrays(cls, a: dict) -> "Plan | None":
        try:
            p = cls(bool(int(a["vmap"][0])), int(a["chunk"][0]), int(a["vmap_batch"][0]),
                    int(a["sample_batch"][0]), int(a["bytes_per_sample"][0]))
        except (KeyError, IndexError, TypeError, ValueError):
            return None
        return p if min(p.chunk, p.vmap_batch, p.sample_batch) >= 1 else None


def _bytes_per_sample(fm: FunctionalModel, x: Tensor) -> int:
    from probe.runtime.memory import MemoryMeter

    s = min(int(x.shape[0]), 8)
    with torch.no_grad(), MemoryMeter(fm.device) as meter:
        fm(fm.params, x[:s])
    return max(1, int(meter.peak_bytes) // s)


def plan_evaluation(fm: FunctionalModel, x: Tensor, n_points: int, *, vectorize: str = "auto",
                    bn: str = "eval", memory_gb: float = 2.0, chunk: int = 0) -> Plan:
    """The evaluation plan under a memory budget of ``memory_gb``: the samples per forward pass
    (all n when one point's pass fits, at most CPU_SAMPLE_BATCH on CPU unless the model couples samples), vmap or a loop (``vectorize`` auto | vmap | loop; ``auto``
    by the rule above; BatchNorm re-estimation always runs point by point) and the points per
    vmap call, from the parameter bytes and the measured bytes per sample of a forward pass
    (x1.5 under vmap: the shared input is expanded per point). ``chunk`` > 0 fixes the points per
    saved chunk (default: one vmap call, or 16 points of the loop)."""
    if bn == "recalibrate" and vectorize == "vmap":
        raise UserError("BatchNorm re-estimation (bn recalibrate) runs point by point; use vectorize auto or loop")
    budget = float(memory_gb) * 2 ** 30
    elt = torch.empty((), dtype=fm.dtype).element_size()
    pbytes = fm.n_params * elt
    per_sample = _bytes_per_sample(fm, x)
    n = int(x.shape[0])
    fixed = 2 * pbytes                       # the point's parameter row, its weights as the forward uses them
    if fixed + per_sample > budget:
        need = (fixed + per_sample) / 2 ** 30
        raise UserError(f"a memory budget of {memory_gb:g} GB is too small: one grid point on one sample needs "
                        f"about {need:.3g} GB; raise the memory budget")
    nb = n if fixed + n * per_sample <= budget else max(1, int((budget - fixed) // per_sample))
    kind = "cuda" if fm.device.type == "cuda" else "cpu"
    if kind == "cpu" and not couples_samples(fm.model):   # activations that stay in cache (measured: see CPU_SAMPLE_BATCH)
        nb = min(nb, CPU_SAMPLE_BATCH)
    work = nb * per_sample                   # one point's forward working set
    if bn == "recalibrate" or vectorize == "loop":
        use = False
    elif vectorize == "vmap":
        use = True
    else:
        use = work <= VMAP_MAX_POINT_BYTES[kind]
    vb = 1
    if use:
        act = 1.5 * work
        cap = VMAP_CALL_BYTES[kind] // max(1, work)
        vb = max(1, min(VMAP_MAX_BATCH, n_points, int(cap), int(budget // (fixed + act))))
    c = int(chunk) if chunk else (vb if use else LOOP_CHUNK)
    return Plan(use, max(1, min(c, n_points)), vb, nb, per_sample)


# ---------------------------------------------------------------------------------------------
# The forward passes
# ---------------------------------------------------------------------------------------------


def _point_loss(fm: FunctionalModel, params: dict, buffers: dict, x: Tensor, y: Tensor, nb: int):
    """(sum of cross-entropies in float64, number correct) over x in batches of nb samples."""
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for lo in range(0, x.shape[0], nb):
        out = fm.apply(params, buffers, x[lo:lo + nb])                 # (b, C)
        out = out.reshape(out.shape[0], -1).to(torch.float64)
        yb = y[lo:lo + nb]
        loss = loss + F.cross_entropy(out, yb, reduction="sum")
        correct = correct + (out.argmax(1) == yb).sum()
    return loss, correct


def _recalibrated(fm: FunctionalModel, params: dict, x: Tensor) -> dict:
    """The buffers with every BatchNorm's running mean / variance re-estimated at ``params``."""
    bns = [(name, m) for name, m in fm.model.named_modules() if isinstance(m, _BN) and m.running_mean is not None]
    if not bns:
        return fm.buffers
    sums: dict[str, list] = {name: [0, 0.0, 0.0] for name, _ in bns}

    def hook_for(name: str) -> Callable:
        def hook(mod, inputs):
            a = inputs[0].detach().to(torch.float64)
            dims = [d for d in range(a.dim()) if d != 1]
            s = sums[name]
            s[0] += 1
            s[1] = s[1] + a.mean(dims)
            s[2] = s[2] + a.var(dims, correction=1)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in bns]
    try:
        with torch.no_grad(), batchnorm_train_mode(fm.model):
            for lo in range(0, x.shape[0], RECALIBRATE_BATCH):
                functional_call(fm.model, ({**fm.fixed, **params}, dict(fm.buffers)), (x[lo:lo + RECALIBRATE_BATCH],))
    finally:
        for h in handles:
            h.remove()
    buffers = dict(fm.buffers)
    for name, m in bns:
        k, s1, s2 = sums[name]
        if k:
            buffers[f"{name}.running_mean"] = (s1 / k).to(fm.dtype)
            buffers[f"{name}.running_var"] = (s2 / k).to(fm.dtype)
    return buffers


def centre_point(fm: FunctionalModel, x: Tensor, y: Tensor, nb: int) -> tuple[float, float]:
    """(mean loss, accuracy) of the model as it is (its own parameters and buffers)."""
    with torch.no_grad():
        loss, correct = _point_loss(fm, fm.params, fm.buffers, x, y, nb)
    n = int(x.shape[0])
    return float(loss) / n, float(correct) / n


def evaluate_points(fm: FunctionalModel, theta0: Tensor, D: Tensor, coords: np.ndarray, x: Tensor, y: Tensor,
                    plan: Plan, bn: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy (B,) float64 at ``coords`` (B, dims): theta0 (P,) and D (dims, P) in the
    model's dtype on its device; x / y the subset on the device."""
    n = int(x.shape[0])
    c = torch.as_tensor(coords, dtype=fm.dtype, device=theta0.device)            # (B, dims)

    def rows(lo: int, hi: int) -> Tensor:            # (hi - lo, P): the same elementwise ops for any batch
        t = theta0[None, :] + c[lo:hi, :1] * D[0][None, :]
        return t + c[lo:hi, 1:2] * D[1][None, :] if D.shape[0] > 1 else t

    nb, B = plan.sample_batch, c.shape[0]
    losses, correct = [], []
    with torch.no_grad():
        if plan.vmap:
            def one(theta):
                return _point_loss(fm, unflatten_like(theta, fm.params), fm.buffers, x, y, nb)

            for lo in range(0, B, plan.vmap_batch):
                l_, c_ = vmap(one)(rows(lo, min(B, lo + plan.vmap_batch)))
                losses.append(l_)
                correct.append(c_)
            loss, right = torch.cat(losses), torch.cat(correct)
        else:
            for k in range(B):
                params = unflatten_like(rows(k, k + 1)[0], fm.params)
                buffers = _recalibrated(fm, params, x) if bn == "recalibrate" else fm.buffers
                l_, c_ = _point_loss(fm, params, buffers, x, y, nb)
                losses.append(l_)
                correct.append(c_)
            loss, right = torch.stack(losses), torch.stack(correct)
    loss = loss.cpu().numpy() / n
    acc = right.cpu().numpy().astype(np.float64) / n
    bad = ~np.isfinite(loss)
    loss[bad] = np.nan
    acc[bad] = np.nan
    return loss, acc
