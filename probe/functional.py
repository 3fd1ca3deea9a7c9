"""A module as a pure function ``f(params, x)`` with explicit parameters and buffers.

Every probe works on a :class:`FunctionalModel` built by :func:`functionalize`: the (selected)
trainable parameters detached from the module (shared with it, read-only, when no cast is needed;
copies cast to another dtype/device otherwise), copies of the buffers, and a call that runs
:func:`torch.func.functional_call` with the module temporarily in eval mode. The module itself is
never changed: its parameters, buffers (BatchNorm running statistics), ``requires_grad`` flags and
train/eval flags are the same afterwards, also when the call raises.

Outputs: a model may return a tensor, a mapping (a dict or a HuggingFace ``ModelOutput``) or a
tuple; ``output=`` (:data:`OutputSelector`) says which tensor a probe differentiates
(:func:`select_output`).

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

#: Which tensor of a model's output a probe uses: ``None`` (a tensor as is; of a mapping its
#: ``"logits"`` entry, else its only tensor entry; of a tuple or list its first element), a key of
#: the mapping, or a callable taking the output and returning the tensor.
OutputSelector = Union[None, str, Callable[[object], Tensor]]

__all__ = ["couples_samples", "FunctionalModel", "OutputSelector", "ParamFilter", "eval_mode", "resolve_model_dtype",
           "resolve_model_device",
           "batchnorm_train_mode", "functionalize",
           "flatten_params", "unflatten_like", "select_param_names", "select_output",
           "calibrate_batchnorm", "fix_batch_statistics", "check_sample_independence"]


def _keys(out: Mapping) -> str:
    return ", ".join(repr(k) for k in list(out.keys())[:12]) + (" ..." if len(out) > 12 else "")


def select_output(out: object, output: OutputSelector = None) -> Tensor:
    """The tensor of a model output ``out`` selected by ``output`` (see :data:`OutputSelector`).

    Raises :class:`UserError` when the selection is ambiguous, names a missing key or does not
    give a tensor.
    """
    if callable(output):
        try:
            got = output(out)
        except Exception as exc:                    # the user's selector: report it in our words
            raise UserError(f"the output= selector raised {type(exc).__name__}: {exc}") from None
        what = "the output= selector"
    elif output is not None:
        if not isinstance(output, str):
            raise UserError(f"output= must be a key (str) or a callable, got {type(output).__name__}")
        if not isinstance(out, Mapping):
            raise UserError(f"output={output!r} selects a key, but the model returns a "
                            f"{type(out).__name__}, not a mapping")
        if output not in out:
            raise UserError(f"output={output!r}: the model's output has no such key; keys: {_keys(out)}")
        got, what = out[output], f"output={output!r}"
    elif isinstance(out, Tensor):
        return out
    elif isinstance(out, Mapping):
        tensors = [k for k, v in out.items() if isinstance(v, Tensor)]
        if "logits" in out:
            got, what = out["logits"], "the model output's 'logits' entry"
        elif len(tensors) == 1:
            got, what = out[tensors[0]], f"the model output's only tensor entry {tensors[0]!r}"
        else:
            raise UserError(f"the model returns a {type(out).__name__} with keys {_keys(out)} and no "
                            f"'logits' entry: pass output= (a key or a callable) to say which tensor "
                            f"to use")
    elif isinstance(out, (tuple, list)) and out:
        got, what = out[0], f"the first element of the model's {type(out).__name__} output"
    else:
        raise UserError(f"the model returns a {type(out).__name__}; expected a tensor, a mapping or a "
                        f"tuple (pass output= to select a tensor)")
    if not isinstance(got, Tensor):
        raise UserError(f"{what} is a {type(got).__name__}, not a tensor; pass output= to select one")
    return got


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


@contextmanager
def batchnorm_train_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode, except BatchNorm layers, which use batch statistics without
    reading or updating their running statistics (``training=True``, ``track_running_stats=False``:
    ``F.batch_norm`` then gets no running buffers). All flags are restored afterwards."""
    with eval_mode(model):
        saved = [(m, m.training, m.track_running_stats) for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        try:
            for m, _, _ in saved:
                m.training, m.track_running_stats = True, False
            yield model
        finally:
            for m, training, track in saved:
                m.training, m.track_running_stats = training, track


def couples_samples(model: nn.Module) -> bool:
    """Whether the eval-mode forward mixes samples: a BatchNorm without running statistics
    normalises every forward pass by its own batch."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None for m in model.modules())


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


def resolve_model_dtype(model: nn.Module, dtype: torch.dtype | str | None) -> torch.dtype:
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


def resolve_model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
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
    output: OutputSelector = None
    copied_bytes: int = 0

    # ``copied_bytes``: bytes of the parameter copies made (0 when the parameters are shared with
    # the module, i.e. no cast was needed); buffers are always copied and not counted.

    @property
    def n_params(self) -> int:
        """Number of selected parameter elements P."""
        return sum(p.numel() for p in self.params.values())

    def apply(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Model output for a batch ``x`` (N, ...) with the given parameters and buffers, eval mode."""
        with eval_mode(self.model):
            out = functional_call(self.model, ({**self.fixed, **params}, dict(buffers)), (x,))
        return select_output(out, self.output)

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
                  device: torch.device | str | None = None,
                  output: OutputSelector = None) -> FunctionalModel:
    """Build the :class:`FunctionalModel` of ``model``.

    ``dtype`` None keeps the model's parameter dtype; ``device`` None keeps the model's device.
    Parameters already in that dtype and on that device are shared with the module (detached,
    never written), others are copied. ``output`` selects the tensor of the model's output
    (:func:`select_output`). Raises :class:`UserError` when ``param_filter`` selects no trainable
    parameter.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    dtype = resolve_model_dtype(model, dtype)
    device = resolve_model_device(model, device)
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    chosen = set(select_param_names(trainable, param_filter))
    if not chosen:
        sample = ", ".join(trainable[:8]) + (" ..." if len(trainable) > 8 else "")
        raise UserError(f"parameter filter {param_filter!r} selects no trainable parameter; "
                        f"names look like: {sample or '(model has no trainable parameters)'}")

    copied = [0]

    def cast(t: Tensor, copy: bool) -> Tensor:
        t = t.detach()
        want = dtype if t.is_floating_point() else t.dtype
        if not copy and t.dtype == want and t.device == device:
            return t                                  # shared storage: read, never written
        out = t.to(device=device, dtype=want, copy=True)
        if not copy:                                  # a parameter cast (buffers are small)
            copied[0] += out.numel() * out.element_size()
        return out

    params = {n: cast(p, False) for n, p in named.items() if n in chosen}
    fixed = {n: cast(p, False) for n, p in named.items() if n not in chosen}
    buffers = {n: cast(b, True) for n, b in model.named_buffers()}
    return FunctionalModel(model=model, params=params, fixed=fixed, buffers=buffers, dtype=dtype,
                           device=device, output=output, copied_bytes=copied[0])


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


# --------------------------------------------------------------------------------------------
# Samples that are not independent
# --------------------------------------------------------------------------------------------


def _stat_free_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm modules without running statistics (they normalise every batch by its own)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None]


@torch.no_grad()
def fix_batch_statistics(fm: FunctionalModel, x: Tensor, chunk: int | None = None
                         ) -> tuple[FunctionalModel, str | None]:
    """``fm`` with the statistics of every BatchNorm that has none (``track_running_stats=False``)
    held fixed at those of the batch ``x``; and a note saying so (None when there was none).

    In eval mode such a BatchNorm normalises each batch by its own mean and biased variance, so
    a sample's output depends on the batch it is in. Here each one's statistics are the mean and
    biased variance of its input over all of ``x``, exactly what the forward pass of the full
    batch ``x`` uses; they are passed as explicit buffers (not differentiated), so outputs on ``x``
    are unchanged while every sample is treated independently. ``chunk`` bounds the samples per
    forward pass; with fewer than ``x.shape[0]`` one pass per such BatchNorm, in order, keeps
    the statistics exact. The module is not changed.
    """
    norms = _stat_free_norms(fm.model)
    if not norms:
        return fm, None
    n = x.shape[0]
    chunk = n if chunk is None else max(1, min(int(chunk), n))
    buffers = dict(fm.buffers)
    sums: dict[str, list] = {}

    def hook_for(name: str):
        def hook(mod, inputs):
            a = inputs[0].detach().to(torch.float64)
            dims = [d for d in range(a.dim()) if d != 1]
            cnt = a.numel() // a.shape[1]
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += cnt
            s[1] = s[1] + a.sum(dims)
            s[2] = s[2] + (a * a).sum(dims)
        return hook

    # one pass for all when the batch fits, else one pass per BatchNorm (later ones see the
    # statistics of earlier ones fixed)
    groups = [norms] if chunk >= n else [[nm] for nm in norms]
    for group in groups:
        handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in group]
        try:
            fmg = FunctionalModel(fm.model, fm.params, fm.fixed, buffers, fm.dtype, fm.device, fm.output,
                                  fm.copied_bytes)
            for lo in range(0, n, chunk):
                fmg.apply(fm.params, buffers, x[lo:lo + chunk])
        finally:
            for h in handles:
                h.remove()
        for name, m in group:
            cnt, s1, s2 = sums.pop(name)
            mean = s1 / cnt
            var = (s2 / cnt - mean * mean).clamp_min(0.0)
            buffers[f"{name}.running_mean"] = mean.to(fm.dtype)
            buffers[f"{name}.running_var"] = var.to(fm.dtype)
    names = ", ".join(name for name, _ in norms[:4]) + (" ..." if len(norms) > 4 else "")
    note = (f"{len(norms)} BatchNorm layer(s) without running statistics ({names}): their statistics "
            f"are held fixed at the mean and biased variance of the {n} probe inputs (what the "
            f"forward pass of that batch uses), not differentiated, so that samples are independent")
    return (FunctionalModel(fm.model, fm.params, fm.fixed, buffers, fm.dtype, fm.device, fm.output,
                            fm.copied_bytes), note)


def check_sample_independence(fm: FunctionalModel, x: Tensor, m: int = 3) -> None:
    """Raise :class:`UserError` when the model's forward couples the samples of a batch.

    Per-sample quantities (Jacobian rows, kernels, per-sample gradients) computed from batched
    passes are only right when each output depends on its own sample alone. Checked on the first
    ``m`` samples: the outputs of the batch equal those of each sample on its own, and (floating
    inputs) the gradient of a random combination of the first sample's outputs with respect to
    the other samples' inputs is zero. Tolerance: 1e-4 (float32) or 1e-9 (float64) relative to
    the largest output / input gradient.
    """
    m = min(int(m), x.shape[0])
    if m < 2:
        return
    xb = x[:m]
    tol = 1e-9 if fm.dtype == torch.float64 else 1e-4
    with torch.no_grad():
        yb = fm(fm.params, xb).reshape(m, -1)
        ys = torch.cat([fm(fm.params, xb[i:i + 1]).reshape(1, -1) for i in range(m)])
    if not (bool(torch.isfinite(yb).all()) and bool(torch.isfinite(ys).all())):
        return                          # non-finite outputs: the caller's finiteness check says so
    if yb.shape != ys.shape:
        raise UserError(f"the model's output for a batch of {m} has shape {tuple(yb.shape)} but "
                        f"{m} single samples give {tuple(ys.shape)}: its forward couples samples")
    scale = max(float(yb.abs().max()), float(ys.abs().max()), 1e-30)
    diff = float((yb - ys).abs().max())
    why = None
    if not diff <= tol * scale:
        why = (f"its outputs for a sample differ by {diff / scale:.2g} (relative) between a batch of "
               f"{m} and the sample on its own")
    elif xb.is_floating_point():
        leaf = xb.detach().requires_grad_()
        with torch.enable_grad():
            y = fm(fm.params, leaf).reshape(m, -1)
            w = torch.randn(y.shape[1], generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64).to(device=y.device, dtype=y.dtype)
            g, = torch.autograd.grad((y[0] * w).sum(), leaf, allow_unused=True)
        if g is not None:
            own, cross = float(g[0].abs().max()), float(g[1:].abs().max())
            if not cross <= tol * max(own, 1e-30) and cross > 0:
                why = (f"the gradient of sample 0's outputs with respect to other samples' inputs "
                       f"is {cross:.3g} (against {own:.3g} for its own input)")
    if why is not None:
        raise UserError(f"the model's forward couples samples in eval mode ({why}), e.g. a "
                        f"statistic over the batch such as x - x.mean(0): per-sample Jacobians of "
                        f"batched passes would be wrong. Make the forward treat samples "
                        f"independently (BatchNorm with running statistics is handled)")
