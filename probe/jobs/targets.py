"""Probe targets: a model by name at its initialisation, or a stored run at its checkpoints, and
the data it is probed on (the run's own settings).

Stored content is data: a run built by a user factory is rebuilt only with a factory the caller
names again or with an explicit trust flag (see :func:`probe.training.build.model_name_for_run`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from probe.errors import UserError

__all__ = ["DataSpec", "ProbeTarget", "iter_targets", "run_data_spec", "probe_inputs", "MAX_PROBE_INPUTS"]


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
    lr: float | None = None                                 # the run's learning rate at this checkpoint
    rebuild: Callable[[int], nn.Module] | None = None       # same architecture, fresh init from a seed
    weights: dict | None = None                             # a model given by name with weights from a file:
                                                            # the file's name, sha256 and entry


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
                 factory: str | None = None, trust_factory: bool = False, weights: str | None = None,
                 weights_key: str | None = None) -> Iterator[ProbeTarget]:
    """Yield the models a probe command should look at.

    ``model``: a registered name or a user's ``package.module:factory``, at its seeded init (or
    with the weights in file ``weights``, entry ``weights_key``: :func:`probe.training.load_weights`),
    on ``data`` (default digits; ``data_root``, ``image_size``). ``run``: a stored run at ``checkpoint``
    (an epoch, ``last``, ``init`` or ``all``), probed on the data it was trained on; a run built by a
    user factory needs ``factory`` or ``trust_factory`` (stored names are never imported)."""
    from probe.training import TrainConfig, build_model, check_model, load_run_model, load_weights, lr_at

    if (model is None) == (run is None):
        raise UserError("give exactly one of a model name or a run")
    if weights is None and weights_key is not None:
        raise UserError("a weights key selects an entry of a weights file; give the file too")
    if weights is not None and model is None:
        raise UserError("weights from a file apply to a model given by name; a run loads its own checkpoints")
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
        loaded = None
        if weights is not None:
            loaded = load_weights(m, weights, weights_key)
        check_model(m, d.x_train[:2], d.num_classes, model)

        def rebuild(s: int) -> nn.Module:
            torch.manual_seed(s)
            return build_model(model, num_classes=d.num_classes, in_chans=d.in_channels,
                               image_size=d.image_size[0], model_kwargs=model_args).eval()

        yield ProbeTarget(m.eval(), model, None, None, spec.name, spec, rebuild=rebuild, weights=loaded)
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
    config = TrainConfig.from_dict(info["config"])

    def rebuild(s: int) -> nn.Module:
        return load_run_model(store, run_id, "init", factory=factory, trust_factory=trust_factory,
                              init_seed=s)[0]

    for ep in epochs:
        m, info, loaded = load_run_model(store, run_id, ep, factory=factory, trust_factory=trust_factory)
        epoch = loaded or 0
        yield ProbeTarget(m, info["model"], run_id, epoch, spec.name, spec,
                          lr=lr_at(config, min(epoch, config.epochs - 1)), rebuild=rebuild)


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



