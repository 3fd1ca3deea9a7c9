"""Signal propagation at initialisation: activation variance and gradient norm per block."""
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from probe import functional as _fn

from probe.companions import load
from probe.checks import check_choice
from probe.errors import UserError
from probe.probes.registry import Progress
from probe.probes.gradvar._common import (LossFn, _BN_MODES, _Fwd, _check_data, _progress,
                                          bn_mode, cross_entropy_per_sample)
from probe.probes.gradvar._per_sample import _groups
from probe.inputs import takes_loader


# ------------------------------------------------------------------------------------------------
# 3. Signal propagation at initialisation
# ------------------------------------------------------------------------------------------------

def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual blocks of the WRN / ResNet families in forward order (modules that are a
    ``WideBasic`` / ``BasicBlock`` / ``Bottleneck`` or own a ``Fusion``), outermost only; for other
    models the top-level children (descending through a single container child)."""
    try:
        blocks = load("models.blocks")
        Fusion = load("models.fusion").Fusion
        kinds: tuple[type, ...] = (blocks.BasicBlock, blocks.Bottleneck, blocks.WideBasic)
    except ImportError:  # pragma: no cover
        kinds, Fusion = (), None

    def is_block(m: nn.Module) -> bool:
        return isinstance(m, kinds) or (Fusion is not None and any(isinstance(c, Fusion) for c in m.children()))

    blocks: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if name and is_block(m) and not any(name.startswith(p + ".") for p in inside):
            blocks.append((name, m))
            inside.append(name)
    if blocks:
        return blocks
    root, prefix = model, ""
    while True:
        kids = list(root.named_children())
        if len(kids) == 1 and len(list(kids[0][1].children())) > 0:
            prefix, root = prefix + kids[0][0] + ".", kids[0][1]
            continue
        return [(prefix + n, m) for n, m in kids]


@dataclass(frozen=True, eq=False)
class SignalStats:
    """Depth curves: one row per initialisation (S, D), float64; NaN where non-finite."""

    block_names: tuple[str, ...]
    act_var: np.ndarray         # (S, D) variance of the block output over all its entries
    grad_norm: np.ndarray       # (S, D) rms over samples of |d l_i / d h_i|
    seeds: tuple[int, ...]      # the seeds rebuilt (empty: the given model only)
    nonfinite: int              # (seed, block) values left out as non-finite
    ranks: int = 0              # ranks the chunks were shared out over (0: computed whole here)


def _signal_one(model: nn.Module, x: Tensor, y: Tensor, loss: LossFn, dtype, device, bn: str, chunk: int,
                batch_size: int, seed: int,
                output: _fn.OutputSelector = None, ddp=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(block names, act variance (D,), rms per-sample output-gradient norm (D,)) of one model.
    ``ddp`` (an active :class:`~probe.runtime.dist.Dist`): this rank takes a contiguous share of
    the chunks (groups with batch statistics; the same draw on every rank) and the sums are added
    over the ranks."""
    blocks = find_blocks(model)
    names = [n for n, _ in blocks]
    D = len(names)
    rec: dict[int, Tensor] = {}

    def hook_for(j: int):
        def hook(_m, _inp, out):
            if isinstance(out, Tensor):
                rec[j] = out
                return out.clone()      # a later in-place op downstream cannot rewrite the recorded h
        return hook

    handles = [m.register_forward_hook(hook_for(j)) for j, (_, m) in enumerate(blocks)]
    sums = None          # (5, D) float64 on the device: sum h, sum h^2, entries, sum |g|^2; [4, 0] rows
    try:
        with bn_mode(model, bn) as skip, torch.enable_grad():
            fwd = _Fwd(model, dtype, device, skip, output)
            sums = torch.zeros((5, D), dtype=torch.float64, device=fwd.fm.device)
            params = {n: p.requires_grad_(True) for n, p in fwd.params.items()}     # our copies
            grouped = bn == "train" or _fn.couples_samples(model)
            if grouped:
                parts = _groups(x.shape[0], batch_size, seed)
            else:
                parts = [torch.arange(s, min(s + chunk, x.shape[0])) for s in range(0, x.shape[0], chunk)]
            if ddp is not None:
                parts = parts[ddp.shard(len(parts))]
            for idx in parts:
                rec.clear()
                xb, yb = fwd.prepare(x[idx]), fwd.prepare(y[idx])
                if xb.is_floating_point():
                    xb.requires_grad_(True)
                total = loss(fwd(params, xb), yb).sum()                             # sum_i l_i
                hs = [rec.get(j) for j in range(D)]
                have = [j for j in range(D) if hs[j] is not None and hs[j].requires_grad]
                grads = dict(zip(have, torch.autograd.grad(total, [hs[j] for j in have], allow_unused=True)))
                for j in range(D):
                    if hs[j] is None:
                        continue
                    h = hs[j].detach().to(torch.float64)
                    sums[0, j] += h.sum()
                    sums[1, j] += (h * h).sum()
                    sums[2, j] += h.numel()
                    gj = grads.get(j)
                    if gj is not None:          # rows of d(sum_i l_i)/dh = d l_i / d h_i (eval BN)
                        sums[3, j] += gj.detach().to(torch.float64).pow(2).sum()
                sums[4, 0] += idx.shape[0]
                rec.clear()
        if ddp is not None:
            ddp.all_reduce_(sums)
    finally:
        for h in handles:
            h.remove()
    s1, s2, cnt, gsq, rows = sums.cpu().numpy()
    n_rows = int(rows[0]) if D else 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        act_var = np.maximum(s2 / cnt - mean * mean, 0.0)
        act_var[cnt == 0] = np.nan
        gnorm = np.sqrt(gsq / max(n_rows, 1))
    act_var[~np.isfinite(act_var)] = np.nan
    gnorm[~np.isfinite(gnorm)] = np.nan
    return names, act_var, gnorm


@takes_loader("x", "y")
def signal_propagation(model: nn.Module, x: Tensor, y: Tensor, *, rebuild: Callable[[int], nn.Module] | None = None,
                       seeds: Sequence[int] = (0, 1, 2), loss: LossFn | None = None,
                       dtype: str | torch.dtype | None = None, device: torch.device | str | None = None,
                       bn: str = "eval", chunk: int = 64, batch_size: int = 32,
                       output: _fn.OutputSelector = None, progress: Progress | None = None) -> SignalStats:
    """Forward activation variance of each block's output and the root-mean-square of the per-sample
    gradient norm of the loss w.r.t. it, ``sqrt(mean_i |d l_i / d h_i|^2)``, per block vs depth.

    With ``rebuild`` (``seed -> fresh model``) each of ``seeds`` gives one initialisation (its
    BatchNorm statistics estimated on ``x`` for ``bn="eval"``; the global RNG state is restored after
    each rebuild); without it the given ``model`` alone is measured (``seeds`` of the result empty).
    Gradient rows come from ``d(sum_i l_i)/dh``; with batch statistics (``bn="train"``) a row also
    carries the other samples' dependence on ``h_i`` through the group statistics. Under
    ``torchrun`` each rank measures every model on its share of the chunks (groups) and the sums
    are added over the ranks: equal to one process up to float64 rounding.
    """
    from probe.runtime.dist import current
    x, y = _check_data(x, y)
    loss = loss or cross_entropy_per_sample
    check_choice("bn", bn, _BN_MODES)
    if rebuild is None:
        models: list[tuple[int | None, Callable[[], nn.Module]]] = [(None, lambda: model)]
    else:
        def make(s: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                m = rebuild(s)
            if not isinstance(m, nn.Module):
                raise UserError(f"rebuild({s}) returned {type(m).__name__}, not a torch.nn.Module")
            # "auto" (like None elsewhere) means the given model's device; a rebuilt model goes there too
            dev = _fn.resolve_model_device(model, device) if device is not None else None
            if dev is not None:
                m = m.to(dev)
            if bn == "eval":
                m = _fn.calibrate_batchnorm(m, x)
            return m.eval()
        models = [(int(s), (lambda s=s: make(int(s)))) for s in seeds]
    ddp = current()
    ddp = ddp if ddp.active else None
    names0: list[str] | None = None
    av, gn = [], []
    for i, (s, get) in enumerate(models):
        m = get()
        names, a, g = _signal_one(m, x, y, loss, dtype, device, bn, chunk, batch_size, s or 0, output,
                                  ddp=ddp)
        if names0 is None:
            names0 = names
        elif names != names0:
            raise UserError(f"rebuild({s}) gave a model with other blocks ({len(names)} vs {len(names0)})")
        av.append(a)
        gn.append(g)
        _progress(progress, "gradvar: signal propagation", i + 1, len(models))
    act, gr = np.array(av, dtype=np.float64), np.array(gn, dtype=np.float64)
    return SignalStats(block_names=tuple(names0 or ()), act_var=act.reshape(len(models), -1),
                       grad_norm=gr.reshape(len(models), -1),
                       seeds=tuple(s for s, _ in models if s is not None),
                       nonfinite=int((~np.isfinite(act)).sum() + (~np.isfinite(gr)).sum()),
                       ranks=ddp.world if ddp is not None else 0)
