"""The training state a checkpoint holds besides the weights and the optimizer: the loader's and
mixup's generators, the global RNG (every rank's, for a distributed run), and restoring all of it
from a checkpoint read back from the store."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from probe.errors import StoreError, UserError, first_line

__all__ = ["rng_state", "set_rng_state", "restore", "one_line"]


def rng_state(loader_gen: torch.Generator, mix_rng: np.random.Generator, device: torch.device) -> dict:
    """The global, loader, mixup (and CUDA) random states, as plain tensors and ints."""
    state = {"torch": torch.get_rng_state(), "loader": loader_gen.get_state()}
    bg = mix_rng.bit_generator.state  # PCG64: ints only
    state["mixup"] = {"state": str(bg["state"]["state"]), "inc": str(bg["state"]["inc"]),
                      "has_uint32": int(bg["has_uint32"]), "uinteger": int(bg["uinteger"])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, loader_gen: torch.Generator, mix_rng: np.random.Generator,
                  device: torch.device) -> None:
    """Put back what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    m = state["mixup"]
    mix_rng.bit_generator.state = {"bit_generator": "PCG64",
                                   "state": {"state": int(m["state"]), "inc": int(m["inc"])},
                                   "has_uint32": m["has_uint32"], "uinteger": m["uinteger"]}
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def one_line(e: BaseException) -> str:
    """The first line of an error: the message alone for a UserError, else prefixed by its type."""
    text = first_line(e, default="")
    if isinstance(e, UserError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def restore(ckpt, where: str, model: nn.Module, opt: torch.optim.Optimizer, loader_gen: torch.Generator,
             mix_rng: np.random.Generator, device: torch.device, rank: int = 0):
    """Load checkpoint ``ckpt`` (described by ``where``) into the training state; (completed
    epochs, best_acc, best_epoch). Rank ``rank`` of a distributed run takes its own global RNG
    state from the checkpoint's ``rng["ranks"]``.

    A checkpoint that lacks a part or whose parts do not fit raises :class:`StoreError` naming it."""
    if not isinstance(ckpt, dict):
        raise StoreError(f"{where} is not a checkpoint dict; it cannot be resumed")
    for key, kind in (("model", dict), ("optimizer", dict), ("rng", dict), ("epoch", int)):
        if not isinstance(ckpt.get(key), kind):
            raise StoreError(f"{where} has no valid {key!r} entry; it cannot be resumed (train the run again, "
                             "or delete this checkpoint to resume from the one before)")
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise StoreError(f"{where} does not fit its model: {one_line(e)}") from None
    try:
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], loader_gen, mix_rng, device)
        ranks = ckpt["rng"].get("ranks")
        if ranks is not None:
            torch.set_rng_state(ranks[rank])
    except (RuntimeError, TypeError, KeyError, ValueError, IndexError, AttributeError) as e:
        raise StoreError(f"{where} has a malformed optimizer or RNG state ({one_line(e)}); "
                         "it cannot be resumed") from None
    best_acc, best_epoch = ckpt.get("best_acc"), ckpt.get("best_epoch")
    if not (best_acc is None or isinstance(best_acc, (int, float))):
        best_acc = None
    if not (best_epoch is None or isinstance(best_epoch, int)):
        best_epoch = None
    return int(ckpt["epoch"]), best_acc, best_epoch
