"""The loss-surface probe (library layer): loss and accuracy over 1D / 2D weight-space directions.

For a model f(theta, x) with trainable parameters theta0 (P elements, flattened in
``named_parameters`` order) and directions d1, d2 (P,), the surface is the mean cross-entropy
L(theta0 + a d1 + b d2) (and the top-1 accuracy) over one fixed data subset, on a grid of
coordinates (a, b) (Li et al. 2018, "Visualizing the loss landscape of neural nets").

Directions (:mod:`._directions`): :func:`random_directions` (Gaussian, filter / layer / no
normalisation, biases and normalisation parameters zeroed by default), :func:`pca_directions`
(the trajectory of a run's checkpoints), :func:`towards_direction` (to another point), or any
vectors (e.g. Hessian eigenvectors). :func:`loss_surface` evaluates the grid (:mod:`._evaluate`:
chunks of points by ``vmap`` over ``functional_call`` or a loop, each chunk saved so that a grid
resumes) and returns a :class:`SurfaceResult` (:mod:`.result`) with its diagnostics: the centre loss, direction
norms and cosine, the loss scale.

    >>> d = random_directions(model, 2)                     # filter-normalised, seed 123
    >>> res = loss_surface(model, x, y, d, "-1:1:51")
    >>> res.loss.shape, res.centre_loss, res.cosine          # (51, 51) ...
"""
from probe.probes.surface._directions import (NORMS, Directions, excluded_names, normalize_direction,
                                              pca_directions, random_directions, towards_direction)
from probe.probes.surface._evaluate import Plan
from probe.probes.surface._grid import Grid, parse_grid
from probe.probes.surface.api import as_directions, loss_surface
from probe.probes.surface.result import SurfaceProbeResult, SurfaceResult, mean_rise

__all__ = ["loss_surface", "SurfaceResult", "Directions", "as_directions", "random_directions", "pca_directions",
           "towards_direction", "normalize_direction", "excluded_names", "parse_grid", "Grid", "Plan", "NORMS",
           "SurfaceProbeResult", "mean_rise"]

from probe.probes.surface.probe import SURFACE_PROBE, SurfaceParams, compute  # noqa: E402  (registers `probe surface`)

__all__ += ["SURFACE_PROBE", "SurfaceParams", "compute"]
