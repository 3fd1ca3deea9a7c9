"""A model's weights from a file of one's own: a ``state_dict`` saved by ``torch.save``, a
checkpoint dict holding one, or a ``.safetensors`` file.

Stored content is data, never code: ``torch.load`` runs with ``weights_only=True`` (a pickle that
needs any class or function beyond tensors and plain containers is refused before anything in it
runs), and a ``.safetensors`` file holds nothing but tensors. Every mismatch between the file and
the model (missing, unexpected or mis-shaped entries) is refused in one line naming the first few.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from probe.errors import UserError, first_line

__all__ = ["load_weights", "read_state_dict", "file_sha256", "STATE_DICT_KEYS", "MAX_WEIGHTS_BYTES"]

#: The entries of a checkpoint dict looked for (in this order) when no key is given.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")

#: Largest weights file read (64 GiB): a guard against reading a device or a runaway file.
MAX_WEIGHTS_BYTES = 64 << 30

_SHOWN = 3  # entries named per kind of mismatch


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _few(names: list[str]) -> str:
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _select(obj: Any, key: str | None, where: str) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The state dict in ``obj`` (itself, or its entry ``key``, or the first of STATE_DICT_KEYS)."""
    if not isinstance(obj, Mapping):
        raise UserError(f"{where}: holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    if key is not None:
        if key not in obj:
            keys = [str(k) for k in obj.keys()]
            raise UserError(f"{where}: no entry {key!r} (entries: {_few(keys) or 'none'})")
        sub = obj[key]
        if not _is_state_dict(sub):
            raise UserError(f"{where}: entry {key!r} is not a state dict (name -> tensor)")
        return sub, key
    if _is_state_dict(obj):
        return obj, None
    for k in STATE_DICT_KEYS:
        if k in obj and _is_state_dict(obj[k]):
            return obj[k], k
    keys = [str(k) for k in obj.keys()]
    raise UserError(f"{where}: neither a state dict nor a checkpoint with one of {', '.join(STATE_DICT_KEYS)} "
                    f"(entries: {_few(keys) or 'none'}); name the entry with the weights key")


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a weights file, on the CPU, and the checkpoint entry they came from (None:
    the file is the state dict itself). See :func:`load_weights`."""
    p = Path(path)
    where = f"weights file {p}"
    try:
        size = p.stat().st_size
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror or e})") from None
    if not p.is_file():
        raise UserError(f"{where}: not a file")
    if size > MAX_WEIGHTS_BYTES:
        raise UserError(f"{where}: {size} bytes, above the {MAX_WEIGHTS_BYTES}-byte limit; refused")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{where}: reading .safetensors needs the safetensors package "
                            "(pip install safetensors)") from None
        if key is not None:
            raise UserError(f"{where}: a .safetensors file holds one flat set of tensors; drop the weights key")
        try:
            return dict(load_file(str(p), device="cpu")), None
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{where}: not a readable .safetensors file ({first_line(e)})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses a pickle with anything beyond tensors and plain containers before running it
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n", 1)[0]
        detail = detail.split(" Please use", 1)[0].strip() or first_line(e)
        raise UserError(f"{where}: refused, not a weights-only torch.save file (nothing in it was run): "
                        f"{detail[:200]}") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, TypeError) as e:
        raise UserError(f"{where}: not a torch.save file ({type(e).__name__}: {first_line(e)[:200]})") from None
    sd, used = _select(obj, key, where)
    return dict(sd), used


def _strip_prefix(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """A DistributedDataParallel / DataParallel state dict (every name under ``module.``) for the bare model."""
    prefix = "module."
    if sd and all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in model_keys):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path: str | os.PathLike, key: str | None = None) -> dict:
    """Load the weights in file ``path`` into ``model`` (in place) and say what was loaded.

    ``path``: a state dict saved by ``torch.save`` (read with ``weights_only=True``), a checkpoint
    dict holding one (entry ``key``; by default the first of ``state_dict``, ``model``,
    ``model_state_dict`` that is one), or a ``.safetensors`` file (needs the ``safetensors``
    package). Names under ``module.`` (a DistributedDataParallel model) are matched without it.
    Every parameter and persistent buffer of the model must be in the file with its shape, and
    nothing else may be: a :class:`UserError` names the first few missing, unexpected and
    mis-shaped entries, and the model is left as it was.

    Returns ``{"file": the file's name, "sha256": of its bytes, "key": the entry used or None,
    "tensors": how many were loaded}``."""
    sd, used = read_state_dict(path, key)
    target = model.state_dict()
    sd = _strip_prefix(sd, set(target))
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k} {tuple(sd[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in target.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {_few(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped {_few(shapes)}")
    if problems:
        raise UserError(f"weights file {Path(path).name} does not fit the model: {'; '.join(problems)}")
    bad = [k for k, v in sd.items() if target[k].is_floating_point() and not v.is_floating_point()]
    if bad:
        raise UserError(f"weights file {Path(path).name}: non-float values for float entries {_few(bad)}")
    model.load_state_dict(sd, strict=True)
    return {"file": Path(path).name, "sha256": file_sha256(path), "key": used, "tensors": len(sd)}
