"""A module as a pure function ``f(params, x)`` with explicit parameters and buffers.

Every probe works on a :class:`FunctionalModel` built by :func:`functionalize`: detached copies of
the (selected) trainable parameters and of the buffers, optionally cast to another dtype/device,
and a call that runs :func:`torch.func.functional_call` with the module temporarily in eval mode.
The module itself is never changed: its parameters, buffers (BatchNorm running statistics),
``requires_grad`` flags and train/eval flags are the same afterwards, also when the call raises.

Parameter groups: ``param_filter`` selects the parameters a probe differentiates with respect to;
the others are held fixed at their current values (they still enter the forward pass).

    >>> fm = functionalize(model, dtype=torch.float64)
    >>> y = fm(fm.params, fm.prepare(x))          # (N, ...) model outputs, eval mode
    >>> v = flatten_params(fm.params)             # (P,)
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from probe.errors import UserError

#: ``None`` (all trainable parameters), a regular expression / list of them (a name is selected when
#: one of them matches at the start of the name, ``re.match``; plain prefixes such as ``"layer3."``
#: therefore work too), or a predicate on the parameter name.
ParamFilter = Union[None, str, Sequence[str], Callable[[str], bool]]

__all__ = ["FunctionalModel", "ParamFilter", "eval_mode", "functionalize", "flatten_params",
           "unflatten_like", "select_param_names", "calibrate_batchnorm"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the duration; restore each one's own flag afterwards.

    Flags are restored per submodule (not with ``model.train(flag)``, which would overwrite a
    deliberately mixed configuration such as a frozen BatchNorm inside a training model).
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def select_param_names(names: Sequence[str], param_filter: ParamFilter) -> list[str]:
    """The names in ``names`` (order kept) selected by ``param_filter`` (see :data:`ParamFilter`)."""
    if param_filter is None:
        return list(names)
    if callable(param_filter):
        return [n for n in names if param_filter(n)]
    patterns = [param_filter] if isinstance(param_filter, str) else list(param_filter)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise UserError(f"invalid parameter pattern in {patterns!r}: {exc}") from None
    return [n for n in names if any(c.match(n) for c in compiled)]


def _resolve_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype.replace("torch.", ""))
        except AttributeError:
            raise UserError(f"unknown dtype {dtype!r}; use float32 or float64") from None
    if dtype is None:
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"dtype must be a floating point type (float32 or float64), got {dtype!r}")
    return dtype


def _resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        for t in list(model.parameters()) + list(model.buffers()):
            return t.device
        return torch.device("cpu")
    return torch.device(device)


@dataclass(frozen=True, eq=False)
class FunctionalModel:
    """``f(params, x)`` view of a module (see the module docstring).

    ``params`` are the selected trainable parameters (detached copies, in ``dtype`` on ``device``),
    ``fixed`` the trainable parameters that were not selected and the frozen ones (held at their
    values), ``buffers`` copies of all buffers. Calls never track gradients into the module.
    """

    model: nn.Module
    params: dict[str, Tensor]
    fixed: dict[str, Tensor]
    buffers: dict[str, Tensor]
    dtype: torch.dtype
    device: torch.device

    @property
    def n_params(self) -> int:
        """Number of selected parameter elements P."""
        return sum(p.numel() for p in self.params.values())

    def apply(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Model output for a batch ``x`` (N, ...) with the given parameters and buffers, eval mode."""
        with eval_mode(self.model):
            return functional_call(self.model, ({**self.fixed, **params}, dict(buffers)), (x,))

    def __call__(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return self.apply(params, self.buffers, x)

    def single(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Flattened output (O,) for ONE sample ``x`` given without its batch axis (for vmap/jacrev)."""
        return self.apply(params, self.buffers, x.unsqueeze(0)).reshape(-1)

    def batched(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Outputs (N, O) evaluated sample by sample (``vmap`` of :meth:`single`).

        Identical to ``self(params, x).reshape(N, -1)`` for models whose eval-mode forward treats
        samples independently; for a model that couples samples (BatchNorm without running
        statistics) each sample is its own batch of one.
        """
        return vmap(self.single, in_dims=(None, 0))(params, x)

    def prepare(self, x: Tensor) -> Tensor:
        """``x`` on this model's device, floating inputs cast to its dtype."""
        x = torch.as_tensor(x)
        if x.is_floating_point():
            return x.to(device=self.device, dtype=self.dtype)
        return x.to(device=self.device)


def functionalize(model: nn.Module, *, param_filter: ParamFilter = None,
                  dtype: torch.dtype | str | None = None,
                  device: torch.device | str | None = None) -> FunctionalModel:
    """Build the :class:`FunctionalModel` of ``model``.

    ``dtype`` None keeps the model's parameter dtype; ``device`` None keeps the model's device.
    Raises :class:`UserError` when ``param_filter`` selects no trainable parameter.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    dtype = _resolve_dtype(model, dtype)
    device = _resolve_device(model, device)
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    chosen = set(select_param_names(trainable, param_filter))
    if not chosen:
        sample = ", ".join(trainable[:8]) + (" ..." if len(trainable) > 8 else "")
        raise UserError(f"parameter filter {param_filter!r} selects no trainable parameter; "
                        f"names look like: {sample or '(model has no trainable parameters)'}")

    def cast(t: Tensor) -> Tensor:
        t = t.detach()
        if t.is_floating_point():
            return t.to(device=device, dtype=dtype, copy=True)
        return t.to(device=device, copy=True)

    params = {n: cast(p) for n, p in named.items() if n in chosen}
    fixed = {n: cast(p) for n, p in named.items() if n not in chosen}
    buffers = {n: cast(b) for n, b in model.named_buffers()}
    return FunctionalModel(model=model, params=params, fixed=fixed, buffers=buffers, dtype=dtype,
                           device=device)


def flatten_params(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a parameter dict into one vector (P,), in the dict's order."""
    if not params:
        raise ValueError("empty parameter dict")
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten_like(vec: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_params`: split ``vec`` (P,) into tensors shaped like ``like``.

    The pieces are views of ``vec`` (no copy).
    """
    total = sum(p.numel() for p in like.values())
    if vec.dim() != 1 or vec.numel() != total:
        raise ValueError(f"vector of shape {tuple(vec.shape)} does not match {total} parameters")
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vec[start:start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the (cumulative) averages over
    ``x``. A model at initialisation has running stats (0, 1) that describe no data: in eval mode
    its BNs would not normalise, and a multiplicative network's outputs explode. Probes of models
    at init therefore use statistics estimated on the probe data; trained checkpoints keep theirs.
    Batches of ``x`` go to the device (and floating dtype) of the model's parameters.
    """
    import copy

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    m2 = copy.deepcopy(model)
    for bn in (b for b in m2.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    m2.train()
    first = next(m2.parameters(), None)
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        if first is not None:
            xb = xb.to(first.device, dtype=first.dtype if xb.is_floating_point() and first.is_floating_point()
                       else None)
        m2(xb)
    for bn, orig in zip((b for b in m2.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)), bns):
        bn.momentum = orig.momentum
    return m2.eval()
