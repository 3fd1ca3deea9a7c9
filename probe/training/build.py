"""Building a model for a run and rebuilding a stored run's model: the registered or user-factory
name, the data's classes and channels, a size limit, a check of the model's output, and loading
a checkpoint's weights."""
from __future__ import annotations

import torch
from torch import nn

from probe.errors import StoreError, UserError, first_line
from probe.runtime.memory import out_of_memory
from probe.companions import load
from probe.training.config import TrainConfig

__all__ = ["build_model", "MAX_MODEL_ELEMENTS", "check_model", "model_name_for_run", "sync_batchnorm",
           "load_run_model"]


def build_model(name: str, *, num_classes: int, in_chans: int, image_size: int | None = None,
                fusion: str | None = None, model_kwargs: dict | None = None) -> nn.Module:
    """``models.create_model`` with the data's classes / channels passed where the builder takes them.

    A ``package.module:factory`` name imports and runs that module: pass only names the user gave
    (a stored run goes through :func:`model_name_for_run` first)."""
    models = load("models")

    kw = dict(model_kwargs or {})
    try:
        accepted = models.accepted_kwargs(name)
        extra = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
        for key, value in extra.items():
            open_kw = accepted is None and key != "image_size"  # image_size only where named explicitly
            if value is not None and key not in kw and (open_kw or (accepted is not None and key in accepted)):
                kw[key] = value
        if fusion is not None:
            if accepted is not None and "fusion" not in accepted:
                raise UserError(f"model {name!r} has no fusion to set (a fusion applies to the residual families)")
            kw["fusion"] = fusion
        if not models.is_factory_name(name):  # sizes may come from a stored config: count them first
            with torch.device("meta"):
                size = sum(t.numel() for t in _tensors(models.create_model(name, **kw)))
            if size > MAX_MODEL_ELEMENTS:
                raise UserError(f"model {name!r} with {kw} would hold {size:.3g} parameter and buffer elements "
                                f"(more than {MAX_MODEL_ELEMENTS:.3g}); refused")
        return models.create_model(name, **kw)
    except (models.ModelNameError, models.ModelConfigError, models.FusionSpecError) as e:
        raise UserError(str(e)) from None


#: Most parameter and buffer elements a registered model may be built with (16 GiB of float32).
MAX_MODEL_ELEMENTS = 2 ** 32


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def check_model(model: nn.Module, x: torch.Tensor, num_classes: int, name: str = "model") -> None:
    """One forward on the probe batch ``x`` (eval mode, no gradients, RNG state kept) to check that
    ``model`` has trainable parameters and returns float logits of shape ``(B, num_classes)``.

    Raises :class:`UserError` naming what is wrong; the model is left as it was."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"model {name!r} has no trainable parameters")
    was_training = model.training
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            out = model(x)
    except torch.OutOfMemoryError as e:   # the model may well work: the batch does not fit
        raise out_of_memory(e, f"the check of model {name!r} on a batch of shape {tuple(x.shape)}") from e
    except Exception as e:  # a user model may raise anything
        first = first_line(e, default="")
        raise UserError(f"model {name!r} failed on a batch of shape {tuple(x.shape)}: "
                        f"{type(e).__name__}{': ' + first if first else ''}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise UserError(f"model {name!r} returned a {type(out).__name__}; it must return a tensor of "
                        f"logits (batch, {num_classes})")
    if tuple(out.shape) != (x.shape[0], num_classes):
        raise UserError(f"model {name!r} returned shape {tuple(out.shape)} for a batch of {x.shape[0]} "
                        f"inputs; expected ({x.shape[0]}, {num_classes}), one logit per class")
    if not out.is_floating_point():
        raise UserError(f"model {name!r} returned {out.dtype} logits; expected floating point")


def model_name_for_run(run: dict, factory: str | None = None, trust_factory: bool = False) -> str:
    """The model name to rebuild a stored run with, without trusting stored content.

    A run of a registered model is rebuilt by its stored name. A run whose model came from a user
    factory (``package.module:factory``) is rebuilt only with a factory the caller names again
    (``factory``), or with the stored name when ``trust_factory`` is set: a stored name is data and
    is never imported on its own."""
    is_factory_name = load("models").is_factory_name

    stored = (run.get("config") or {}).get("model")
    if not isinstance(stored, str) or not stored:
        raise UserError(f"run {run['run_id']} has no model name in its config")
    if factory is not None:
        if not is_factory_name(factory):
            raise UserError(f"factory {factory!r}: expected package.module:factory")
        if not is_factory_name(stored):
            raise UserError(f"run {run['run_id']} is a registered model ({stored!r}); a factory applies only "
                            "to runs built by a user factory")
        return factory
    if not is_factory_name(stored) or trust_factory:
        return stored
    raise UserError(f"run {run['run_id']} was built by the user factory {stored!r}; a name stored in a runs "
                    f"folder is never imported. If you trust that code, name the factory again (factory={stored!r}) "
                    "or trust the stored name (trust_factory)")


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by :class:`torch.nn.SyncBatchNorm` (statistics over
    the global batch; CUDA only), sharing the parameters and buffers. A BN with a pinned
    (``fixed:v``) weight or bias has no synchronised form and is refused."""
    PinnedBatchNorm2d = load("models.fusion").PinnedBatchNorm2d

    def convert(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, PinnedBatchNorm2d) and (module.weight_mode.is_fixed or module.bias_mode.is_fixed):
            raise UserError(f"--sync-bn: {name or 'the model'} is a BatchNorm with a pinned weight or bias; "
                            "it has no synchronised form (train without --sync-bn)")
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, PinnedBatchNorm2d):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        for child_name, child in list(module.named_children()):
            setattr(module, child_name, convert(child, f"{name}.{child_name}" if name else child_name))
        return module

    return convert(model, "")


def load_run_model(store, run_ref: str, epoch: int | str | None = "last",
                   device: str | torch.device = "cpu", *, factory: str | None = None,
                   trust_factory: bool = False, init_seed: int | None = None) -> tuple[nn.Module, dict, int | None]:
    """Rebuild a run's model and load a checkpoint (``"last"``, an epoch, or ``None``/``"init"`` for
    the seeded initialisation; ``init_seed`` replaces the run's seed for that initialisation).
    Returns (model in eval mode, run dict, epoch loaded).

    A run built by a user factory needs ``factory`` or ``trust_factory`` (see
    :func:`model_name_for_run`); a registered model is rebuilt by its stored name."""
    run = store.get_run(run_ref)
    name = model_name_for_run(run, factory, trust_factory)
    config = TrainConfig.from_dict(run["config"]).validate()
    data = (run["config"].get("resolved") or {}).get("data") or {}
    try:
        in_chans, num_classes = int(data["in_channels"]), int(data["num_classes"])
        image_size = int(data["image_size"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"run {run['run_id']} has no valid resolved data description; it cannot rebuild "
                        "its model") from None
    if not (1 <= in_chans <= 4096 and 1 <= num_classes <= 10 ** 6 and 1 <= image_size <= 4096):
        raise UserError(f"run {run['run_id']}: stored data shape out of range ({in_chans} channels, "
                        f"{num_classes} classes, size {image_size})")
    torch.manual_seed(config.seed if init_seed is None else init_seed)
    model = build_model(name, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                        fusion=config.fusion, model_kwargs=config.model_kwargs)
    loaded = None
    if config.weights is not None and epoch in (None, "init", 0) and init_seed is None:
        _initial_weights(model, run, config)
    if epoch not in (None, "init", 0):
        if isinstance(epoch, str) and epoch.lower() in ("last", "latest"):
            epoch = store.latest_checkpoint(run["run_id"])
            if epoch is None:
                raise UserError(f"run {run['run_id']} has no checkpoints")
        ckpt = store.load_checkpoint(run["run_id"], epoch)
        where = f"checkpoint epoch {epoch} of run {run['run_id']}"
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise StoreError(f"{where} has no valid 'model' entry; it cannot be loaded")
        try:
            model.load_state_dict(ckpt["model"])
        except torch.OutOfMemoryError as e:       # a RuntimeError, but not a checkpoint that does not fit
            raise out_of_memory(e, f"loading the weights of {where}") from e
        except (RuntimeError, TypeError, KeyError, ValueError) as e:
            lines = str(e).strip().splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0] if lines else type(e).__name__
            raise UserError(f"{where} does not fit model {config.model!r}: {detail}") from None
        loaded = int(epoch)
    return model.to(device).eval(), run, loaded


def _initial_weights(model: nn.Module, run: dict, config: TrainConfig) -> None:
    """A run that started from a weights file starts there: its initialisation is that file, which
    must still hold the bytes recorded (same sha256)."""
    from probe.training.weights import load_weights

    recorded = ((run["config"].get("resolved") or {}).get("weights") or {}).get("sha256")
    try:
        info = load_weights(model, config.weights, config.weights_key)
    except UserError as e:
        raise UserError(f"run {run['run_id']} started from the weights in {config.weights}, needed for its "
                        f"initialisation: {e}") from None
    if recorded is not None and info["sha256"] != recorded:
        raise UserError(f"run {run['run_id']} started from weights with sha256 {recorded[:12]}; "
                        f"{config.weights} now has sha256 {info['sha256'][:12]}")

