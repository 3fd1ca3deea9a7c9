"""Directions in weight space for a loss surface.

Every direction is one float64 CPU vector (P,) over the model's trainable parameters, flattened
in ``named_parameters`` order (the layout of :func:`probe.functional.flatten_params` and of the
eigenvectors ``probe hessian`` stores), together with what it is (:class:`Directions`).

* :func:`random_directions` -- Gaussian, seeded (``torch.Generator(seed)``, one draw per
  parameter tensor in order), then scaled per filter, per layer or not at all
  (:func:`normalize_direction`; Li et al. 2018, "Visualizing the loss landscape of neural nets",
  filter normalisation); biases and normalisation-layer parameters zeroed unless included.
* :func:`pca_directions` -- the top-2 principal directions of a training trajectory (the
  checkpoints' parameter vectors minus the final one's), and the trajectory projected onto them.
* :func:`towards_direction` -- from this point to another point of the same architecture.
* hessian eigenvectors come as (P, k) arrays (stored by ``probe hessian`` or computed) and are
  used as they are (unit vectors).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from probe.errors import UserError

__all__ = ["Directions", "trainable", "flat_params", "excluded_names", "normalize_direction",
           "random_directions", "pca_directions", "towards_direction", "flat_from_state", "NORMS"]

NORMS = ("filter", "layer", "none")
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True, eq=False)
class Directions:
    """One or two directions (``vectors``: float64 CPU tensors (P,)) and what they are.

    ``kind`` random | hessian | pca | towards | custom; ``info`` JSON-able facts about them (norm
    mode, seed, source, eigenvalues, explained variance, the other point); ``notes`` what the user
    should know; ``trajectory`` (E, dims) float64 coordinates of a trajectory in the plane
    (``pca``), with ``trajectory_epochs`` (E,)."""

    kind: str
    vectors: tuple[Tensor, ...]
    info: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    trajectory: np.ndarray | None = None
    trajectory_epochs: np.ndarray | None = None

    @property
    def dims(self) -> int:
        return len(self.vectors)


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of ``model`` (name -> tensor, ``named_parameters`` order), detached."""
    out = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not out:
        raise UserError("the model has no trainable parameters: there is no weight space to move in")
    return out


def flat_params(params: Mapping[str, Tensor]) -> Tensor:
    """float64 CPU vector (P,) of a parameter dict, in its order."""
    return torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for p in params.values()])


def excluded_names(model: nn.Module) -> set[str]:
    """Names of the parameters Li et al. leave out of random directions: biases and the parameters
    of normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) -- in their code, every
    parameter with fewer than 2 dimensions; both rules are applied here."""
    out = {n for n, p in model.named_parameters() if p.dim() <= 1}
    for mname, m in model.named_modules():
        if isinstance(m, _NORM_LAYERS):
            out.update(f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False))
    return out


def normalize_direction(d: Tensor, w: Tensor, norm: str) -> Tensor:
    """``d`` scaled like ``w`` (same shape): ``"filter"`` -- every filter (slice along dim 0: an
    output channel of a conv, a row of a linear layer; a single element of a 1-D tensor) rescaled
    to the norm of the same filter of ``w``; ``"layer"`` -- the whole tensor rescaled to the norm of
    ``w``; ``"none"`` -- unchanged. A zero filter of ``w`` gives a zero filter."""
    if norm == "none":
        return d
    if norm == "layer":
        return d * _ratio(w.norm(), d.norm())
    if norm != "filter":
        raise UserError(f"unknown direction normalisation {norm!r}; choose one of: {', '.join(NORMS)}")
    if d.dim() == 0:
        return d * _ratio(w.abs(), d.abs())
    d2, w2 = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)             # (filters, rest)
    scale = _ratio(w2.norm(dim=1, keepdim=True), d2.norm(dim=1, keepdim=True))
    return (d2 * scale).reshape(d.shape)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den is 0 (Li et al. add 1e-10 to den instead, which is off by 1e-10 / den)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def random_directions(model: nn.Module, dims: int = 2, *, norm: str = "filter", include_bn: bool = False,
                      seed: int = 123) -> Directions:
    """``dims`` Gaussian directions over the trainable parameters of ``model``, normalised by
    ``norm`` (:func:`normalize_direction`) against the model's current weights, with biases and
    normalisation-layer parameters zeroed unless ``include_bn`` (Li et al.'s defaults: filter,
    zeroed, seed 123). Draws: ``torch.Generator().manual_seed(seed)``, float64, parameter tensor by
    tensor in ``named_parameters`` order, the first direction entirely before the second."""
    if norm not in NORMS:
        raise UserError(f"unknown direction normalisation {norm!r}; choose one of: {', '.join(NORMS)}")
    params = trainable(model)
    skip = set() if include_bn else excluded_names(model)
    gen = torch.Generator().manual_seed(int(seed))
    vectors = []
    for _ in range(dims):
        parts = []
        for name, w in params.items():
            w64 = w.to(device="cpu", dtype=torch.float64)
            d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
            parts.append(torch.zeros_like(w64) if name in skip else normalize_direction(d, w64, norm))
        vectors.append(torch.cat([p.reshape(-1) for p in parts]))
    zeroed = sum(params[n].numel() for n in skip if n in params)
    notes = []
    if zeroed:
        notes.append(f"{zeroed} bias and normalisation-layer parameter elements are held fixed (zero in the "
                     f"directions, as Li et al.); include them with include_bn")
    if all(float(v.abs().max()) == 0.0 for v in vectors):
        raise UserError("the random directions are zero: every trainable parameter is a bias or a normalisation "
                        "parameter (include them with include_bn) or the weights are zero (use norm none)")
    info = {"norm": norm, "include_bn": bool(include_bn), "seed": int(seed), "zeroed_elements": int(zeroed)}
    return Directions("random", tuple(vectors), info, tuple(notes))


def flat_from_state(model: nn.Module, state: Mapping[str, Tensor], what: str) -> Tensor:
    """The trainable parameters of ``state`` (a state dict of the same architecture) as a float64
    vector (P,) in the order of ``model``'s; :class:`UserError` naming the first mismatch (a
    missing or extra parameter, a different shape) otherwise."""
    params = trainable(model)
    if not isinstance(state, Mapping):
        raise UserError(f"{what} has no parameter dict")
    theirs = {k: v for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()}
    missing = [n for n in params if n not in theirs]
    mine = set(model.state_dict())
    extra = [k for k in state if k not in mine]
    if missing:
        more = f"; it has {extra[0]} instead" if extra else ""
        raise UserError(f"{what} is a different architecture: it has no parameter {missing[0]} "
                        f"({len(missing)} of this model's {len(params)} parameters missing{more})")
    for n, p in params.items():
        if tuple(theirs[n].shape) != tuple(p.shape):
            raise UserError(f"{what} is a different architecture: parameter {n} is {tuple(theirs[n].shape)} "
                            f"there and {tuple(p.shape)} here")
    if extra:
        raise UserError(f"{what} is a different architecture: it has {extra[0]}, which this model lacks")
    return torch.cat([theirs[n].detach().reshape(-1).to(device="cpu", dtype=torch.float64) for n in params])


def towards_direction(theta0: Tensor, theta1: Tensor, what: str) -> Directions:
    """The 1D direction ``theta1 - theta0`` (coordinate 0 is this point, 1 the other one)."""
    d = theta1 - theta0
    if float(d.abs().max()) == 0.0:
        raise UserError(f"{what} has the same parameters as this target: there is no direction towards it")
    return Directions("towards", (d,), {"to": what, "distance": float(d.norm())})


def pca_directions(theta0: Tensor, checkpoints: Sequence[Tensor], epochs: Sequence[int], *,
                   mask: Tensor | None = None, dims: int = 2) -> Directions:
    """The top-``dims`` principal directions of a trajectory and its projection onto them.

    ``checkpoints`` (E >= 3) float64 vectors (P,) in epoch order, the last one the final point;
    the rows of the (E - 1, P) matrix are each earlier checkpoint minus the final one (masked by
    ``mask`` (P,) of 0/1: Li et al. leave biases and BatchNorm out here too); its right singular
    vectors are the directions (unit, orthogonal; an uncentred SVD, so that 3 checkpoints give 2
    directions -- Li et al.'s sklearn PCA centres the rows first). The trajectory coordinates are
    ``D^T mask(theta_e - theta0)`` for every checkpoint (E, dims), relative to this point
    ``theta0`` (the surface's centre)."""
    E = len(checkpoints)
    if E < 3:
        raise UserError(f"pca directions need a trajectory of at least 3 checkpoints; this run has {E}")
    final = checkpoints[-1]
    m = torch.ones_like(final) if mask is None else mask
    M = torch.stack([(c - final) * m for c in checkpoints[:-1]])                # (E-1, P)
    _, s, Vh = torch.linalg.svd(M, full_matrices=False)                          # Vh (E-1, P)
    rank = int((s > s[0] * 1e-12).sum()) if s.numel() and float(s[0]) > 0 else 0
    if rank < dims:
        raise UserError(f"the trajectory of {E} checkpoints spans {rank} direction(s) in weight space; "
                        f"pca needs {dims}")
    D = Vh[:dims]                                                               # (dims, P)
    for i in range(dims):            # sign: the trajectory starts at a negative coordinate
        ref = float(D[i] @ ((checkpoints[0] - final) * m))
        if ref > 0:
            D[i] = -D[i]
    coords = torch.stack([D @ ((c - theta0) * m) for c in checkpoints])         # (E, dims)
    var = (s ** 2) / float((s ** 2).sum())
    info = {"checkpoints": E, "epochs": [int(e) for e in epochs],
            "explained_variance": [float(v) for v in var[:dims]]}
    return Directions("pca", tuple(D[i].clone() for i in range(dims)), info,
                      trajectory=coords.detach().cpu().numpy(),
                      trajectory_epochs=np.asarray(epochs, dtype=np.int64))
