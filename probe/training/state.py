"""The training state a checkpoint holds besides the weights and the optimizer: the loader's and
mixup's generators, the global and CUDA RNGs (every rank's, for a distributed run), the loss
scaler's state, and restoring all of it from a checkpoint read back from the store."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from probe.errors import StoreError, UserError, first_line
from probe.runtime.memory import out_of_memory

__all__ = ["rng_state", "set_rng_state", "rank_rng_state", "per_rank_states", "own_rank_state", "restore",
           "one_line"]


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


def rank_rng_state(device: torch.device) -> dict:
    """This rank's own generators: the global CPU one (``torch``) and, on CUDA, its device's (``cuda``)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def per_rank_states(states: list[dict]) -> dict:
    """The checkpoint's entries for every rank's :func:`rank_rng_state` (a list in rank order):
    ``ranks`` (the CPU generators) and, when every rank has one, ``cuda_ranks``."""
    out = {"ranks": [s["torch"] for s in states]}
    if states and all("cuda" in s for s in states):
        out["cuda_ranks"] = [s["cuda"] for s in states]
    return out


def own_rank_state(rng: dict, rank: int) -> dict:
    """Rank ``rank``'s generator states in a checkpoint's ``rng`` (what :func:`per_rank_states`
    stored): ``torch`` and ``cuda`` where the checkpoint has them (nothing for a single process).
    A checkpoint of fewer ranks raises :class:`IndexError`."""
    own = {}
    for key, out in (("ranks", "torch"), ("cuda_ranks", "cuda")):
        states = rng.get(key)
        if states is not None:
            if not isinstance(states, (list, tuple)) or not 0 <= rank < len(states):
                raise IndexError(f"rng[{key!r}] holds no state of rank {rank}")
            own[out] = states[rank]
    return own


def one_line(e: BaseException) -> str:
    """The first line of an error: the message alone for a UserError, else prefixed by its type."""
    text = first_line(e, default="")
    if isinstance(e, UserError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def restore(ckpt, where: str, model: nn.Module, opt: torch.optim.Optimizer, loader_gen: torch.Generator,
             mix_rng: np.random.Generator, device: torch.device, rank: int = 0,
             scaler: torch.amp.GradScaler | None = None):
    """Load checkpoint ``ckpt`` (described by ``where``) into the training state; (completed
    epochs, best_acc, best_epoch). Rank ``rank`` of a distributed run takes its own global (and
    CUDA) RNG state from the checkpoint's ``rng["ranks"]`` (``rng["cuda_ranks"]``). An enabled
    ``scaler`` takes the checkpoint's ``scaler`` state where it has one (a run saved without loss
    scaling, on another device or in another precision, starts a fresh scaler).

    A checkpoint that lacks a part or whose parts do not fit raises :class:`StoreError` naming it."""
    if not isinstance(ckpt, dict):
        raise StoreError(f"{where} is not a checkpoint dict; it cannot be resumed")
    for key, kind in (("model", dict), ("optimizer", dict), ("rng", dict), ("epoch", int)):
        if not isinstance(ckpt.get(key), kind):
            raise StoreError(f"{where} has no valid {key!r} entry; it cannot be resumed (train the run again, "
                             "or delete this checkpoint to resume from the one before)")
    try:
        model.load_state_dict(ckpt["model"])
    except torch.OutOfMemoryError as e:           # a RuntimeError, but not a checkpoint that does not fit
        raise out_of_memory(e, f"loading the weights of {where}") from e
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise StoreError(f"{where} does not fit its model: {one_line(e)}") from None
    try:
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], loader_gen, mix_rng, device)
        own = own_rank_state(ckpt["rng"], rank)
        if "torch" in own:
            torch.set_rng_state(own["torch"])
        if "cuda" in own and device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"], device)
        if scaler is not None and scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(_scaler_state(ckpt["scaler"]))
    except torch.OutOfMemoryError as e:
        raise out_of_memory(e, f"loading the optimizer state of {where}") from e
    except (RuntimeError, TypeError, KeyError, ValueError, IndexError, AttributeError) as e:
        raise StoreError(f"{where} has a malformed optimizer, RNG or loss-scaler state ({one_line(e)}); "
                         "it cannot be resumed") from None
    best_acc, best_epoch = ckpt.get("best_acc"), ckpt.get("best_epoch")
    if not (best_acc is None or isinstance(best_acc, (int, float))):
        best_acc = None
    if not (best_epoch is None or isinstance(best_epoch, int)):
        best_epoch = None
    return int(ckpt["epoch"]), best_acc, best_epoch


def _scaler_state(state) -> dict:
    """A checkpoint's loss-scaler state, checked to be what ``GradScaler.state_dict`` writes."""
    keys = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int,
            "_growth_tracker": int}
    if not isinstance(state, dict) or not set(keys) <= set(state) or not all(
            isinstance(state[k], (int, float)) and not isinstance(state[k], bool) for k in keys):
        raise ValueError(f"expected the numbers {', '.join(keys)}")
    return {k: kind(state[k]) for k, kind in keys.items()}
