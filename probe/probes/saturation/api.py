"""Gate saturation (the library function): how far into the flat tails of their squashing functions the gates of a model sit.

The seed's hypothesis is that the sigmoids of the multiplicative fusions saturate ("it feels like a
learning rate that is too small"): a gate whose logits ``z`` sit at ``|z| >> 1`` passes almost no
gradient, ``d sigma / dz = sigma (1 - sigma) -> 0``. For every gate of a model this probe streams
the distribution of its input logits over a fixed batch and reports

* ``frac_logit_sat``  fraction of finite logits with ``|z| > threshold`` (default 3),
* ``frac_output_sat`` fraction of gate outputs ``g(z)`` outside the band ``[0.05, 0.95]``
  (tanh: outside ``[-0.9, 0.9]``; hard sigmoid / hard swish: the gate part
  ``h = relu6(z + 3) / 6`` outside ``[0.05, 0.95]``, i.e. ``|z| > 2.7``),
* ``gain``           the mean local gain relative to the origin, ``E[g'(z) / g'(0)]``:
  sigmoid ``sigma(z) sigma(-z) / (1/4)``, tanh ``1 - tanh(z)^2``, hard sigmoid / hard swish
  (gate part) ``1`` inside ``(-3, 3)`` and ``0`` outside. 1 means "as steep as at z = 0", 0 means
  "no gradient passes"; it is the factor by which saturation shrinks the effective learning rate
  of everything upstream of the gate,
* the logit ``mean`` and ``std`` (population, ``ddof = 0``), and a fixed-bin histogram of the logits:
  ``bins`` equal bins ``[e_k, e_k+1)`` over ``[-hist_max, hist_max)``, an underflow count
  (``z < -hist_max``) and an overflow count (``z >= hist_max``); columns ``[under, bins..., over]``.

Everything is computed from the logits in float64 (the gate function is known per kind; since the
gates are monotone and symmetric about their centre, "output outside the band" is the cut
``|z| > log 19`` for sigmoid, ``|z| > log(19) / 2`` for tanh, ``|z| > 2.7`` for the hard gates), so
the numbers do not depend on the model's rounding of the outputs near the band edges, and in-place
gates are read before they overwrite their input.

**Which gates.** Every :class:`models.Gate` (the toolkit's fusion sigmoids, SE, CBAM, Triplet,
Coordinate Attention incl. the hard sigmoid inside its h_swish, NAM, the in-branch gate), every
``nn.Sigmoid`` / ``nn.Tanh`` / ``nn.Hardsigmoid`` / ``nn.Hardswish`` module (forward pre-hooks read
``inputs[0]``), and functional ``torch.sigmoid`` / ``torch.special.expit`` / ``torch.tanh`` /
``F.hardsigmoid`` / ``F.hardswish`` calls and the ``Tensor.sigmoid`` / ``Tensor.tanh`` methods (and
their in-place ``_`` variants) anywhere inside the model's forward, seen through a
:class:`torch.overrides.TorchFunctionMode`. A functional call is attributed to the innermost module
running at the time (a stack kept by pre/post hooks on every submodule) and named
``<module path>:<function>#<k>``, ``k`` counting the calls of that function within one call of that
module (the root module's path is ``""``, so a call in the model's own forward is ``:sigmoid#0``; a
model that is itself a gate module is named ``"(root)"``); a gate module is named by its path. Calls
inside a hooked gate module (``Gate.forward`` calls ``torch.sigmoid``) and gate modules nested
inside another gate module are not counted again.
Note that ``nn.Sigmoid`` / ``nn.Tanh`` used as plain activations (the Triplet ``activation="sigmoid"``
option, the tanh MLP) multiply nothing but are reported too: they saturate the same way.

**Grouping.** ``stage``: the gate's block, the module path up to and including the child of the
first ``nn.Sequential`` / ``nn.ModuleList`` met walking down from the model (``layer1.0`` for
``layer1.0.fusion.r.act``; ``block1.layer.0`` for a WRN written with ``block1.layer``); a gate
outside any such container is staged by the model's top-level child it sits in, a call at the root
by ``"(root)"``. ``role``: ``Gate.role`` where set (``fusion.r``, ``se.channel``, ``ca.h`` ...);
otherwise ``<family>.module`` / ``<family>.functional`` inside a known attention or fusion module
(family ``se``, ``cbam``, ``triplet``, ``ca``, ``nam``, ``fusion``, ``resgate``), else ``module`` /
``functional``. ``group`` is the role's first dotted component (``fusion``, ``se``, ``cbam``,
``triplet``, ``ca``, ``nam``, ``resgate``, ``module``, ``functional``). Aggregates (per stage, per
kind, per group, model-wide) weight every finite logit equally.

**Streaming.** The batch ``x`` is run in chunks of ``batch_size``; per gate only running counts,
float64 sums (shifted by the gate's first slice mean, so the variance does not cancel) and an int64
histogram are kept, and every logit tensor is reduced in flat slices of at most 2^18 (CPU) / 2^23 (GPU)
elements, so the extra memory is a few slices, never a whole activation tensor. Non-finite logits are
counted per gate (``nonfinite``) and excluded from every fraction, mean and histogram.
On a GPU the sums stay on the device and are read once at the end (no wait per gate or slice).

**Over ranks.** Under ``torchrun`` (:mod:`probe.runtime.dist`) each rank streams its contiguous
share of ``x`` and the ranks' sums are gathered and merged (counts and histograms added, the shifted
moments merged exactly by :func:`probe.runtime.moments.merge_moments`): the same numbers as one
process, up to float64 rounding of the means and deviations.

The model is run in eval mode (every submodule's flag restored afterwards) under ``torch.no_grad``;
when its parameters are not on ``device`` it runs through ``torch.func.functional_call`` on copies
there. All hooks and the mode are removed afterwards, also when the forward raises.

    >>> r = saturation(models.create_model("tiny_triplet"), torch.randn(64, 1, 8, 8))
    >>> r.frac_output_sat          # (G,) per gate
    >>> r.summary()["model"]       # model-wide numbers
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from probe.checks import check_int, check_number
from probe.companions import load
from probe.errors import UserError
from probe.runtime.dist import current
from probe.runtime.moments import from_shifted, merge_moments
from probe.runtime.precision import exact
from probe.functional import eval_mode
from probe.probes.registry import Progress
from probe.probes.saturation.result import SaturationResult
from probe.inputs import takes_loader

__all__ = ["saturation", "check_options", "GATE_KINDS"]

_attention = load("models.attention")
CBAM, NAM, SE, CoordAtt, TripletAttention = (_attention.CBAM, _attention.NAM, _attention.SE, _attention.CoordAtt,
                                             _attention.TripletAttention)
LastConv = load("models.blocks").LastConv
Fusion = load("models.fusion").Fusion
Gate = load("models.gates").Gate

#: Kinds of gate this probe knows (``hard_swish`` reports its gate part ``relu6(z + 3) / 6``).
GATE_KINDS = ("sigmoid", "tanh", "hard_sigmoid", "hard_swish")

# Module classes that are gates by themselves (models.Gate reads its own kind).
_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Hardsigmoid, "hard_sigmoid"), (nn.Hardswish, "hard_swish"))

# Functional gates seen by the TorchFunctionMode: func -> (label used in the name, kind).
_FUNCTIONS: dict[Any, tuple[str, str]] = {
    torch.sigmoid: ("sigmoid", "sigmoid"),
    torch.sigmoid_: ("sigmoid_", "sigmoid"),
    torch.special.expit: ("expit", "sigmoid"),
    torch.Tensor.sigmoid: ("Tensor.sigmoid", "sigmoid"),
    torch.Tensor.sigmoid_: ("Tensor.sigmoid_", "sigmoid"),
    torch.tanh: ("tanh", "tanh"),
    torch.tanh_: ("tanh_", "tanh"),
    torch.Tensor.tanh: ("Tensor.tanh", "tanh"),
    torch.Tensor.tanh_: ("Tensor.tanh_", "tanh"),
    F.hardsigmoid: ("hardsigmoid", "hard_sigmoid"),
    F.hardswish: ("hardswish", "hard_swish"),
}

# Modules whose gates belong to one family (innermost match wins: CA inside TripletCA is "ca").
_FAMILIES: tuple[tuple[type, str], ...] = (
    (SE, "se"), (CBAM, "cbam"), (CoordAtt, "ca"), (TripletAttention, "triplet"), (NAM, "nam"),
    (Fusion, "fusion"), (LastConv, "resgate"))

# |z| beyond which g(z) leaves its band: sigmoid(z) > 0.95 <=> z > log 19, tanh(z) > 0.9 <=> z > log(19) / 2,
# relu6(z + 3) / 6 > 0.95 <=> z > 2.7 (and symmetrically below).
_BAND_CUTS = {"sigmoid": math.log(19.0), "tanh": 0.5 * math.log(19.0), "hard_sigmoid": 2.7, "hard_swish": 2.7}

# Elements per reduction slice: bounds the temporaries (a few float64 / int64 copies of a slice).
_SLICE_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 23}

# Devices whose statistics stay on the device until the end (no read per slice; any device not
# listed does so too): on the CPU a read costs nothing and the compacting path is cheaper.
_SYNC_FREE = {"cpu": False, "cuda": True}



def check_options(*, batch_size: int, bins: int, threshold: float, hist_max: float) -> None:
    """Raise :class:`UserError` on a bad option of :func:`saturation` (the messages name the option)."""
    check_int("batch_size", batch_size, 1, 1 << 20)
    check_int("bins", bins, 1, 4096)
    check_number("threshold", threshold, 0, 1e6, lo_open=True)
    check_number("hist_max", hist_max, 0, 1e6, lo_open=True)


# --- streaming statistics -----------------------------------------------------------------------


def _flat_slices(z: Tensor, size: int):
    """1-D views / copies of ``z`` with at most ``size`` elements each (copies only where ``z`` is not
    contiguous, and then only one group of rows at a time)."""
    if z.dim() == 0:
        yield z.reshape(1)
        return
    if z.is_contiguous():
        flat = z.view(-1)
        for i in range(0, flat.numel(), size):
            yield flat[i:i + size]
        return
    rows = max(1, size // max(1, z[0].numel()))
    for i in range(0, z.shape[0], rows):
        flat = z[i:i + rows].reshape(-1)
        for j in range(0, flat.numel(), size):
            yield flat[j:j + size]


class _Acc:
    """Running statistics of one gate.

    ``count`` (finite logits) and ``nonfinite``, ``shift`` (``c``, the mean of the gate's first
    slice with a finite logit) and ``s1 = sum (z - c)``; ``ints`` (2,) int64 = ``#{|z| > threshold}``,
    ``#{output outside the band}``, ``floats`` (2,) float64 = ``sum (z - c)^2``, ``sum g'(z) / g'(0)``,
    and ``hist`` (bins + 2,) int64. On the CPU the first four are Python numbers; on other devices
    (``_SYNC_FREE``) every number stays on the logits' device and is read once, at the end, so the
    stream never waits for the device.

    Per slice (float64): the band test is a cut on ``|z|`` (``|z| > log 19`` for sigmoid,
    ``log(19) / 2`` for tanh, ``2.7`` for the hard gates: the same sets as ``g(z)`` outside its band,
    the gates being monotone and odd about their centre); the gains use ``q = sigma(-|z|)`` (tanh:
    ``sigma(-2|z|)``), ``sigma'(z) / sigma'(0) = 4 q (1 - q)`` and ``tanh'(z) = 4 q (1 - q)``, summed as
    ``4 (sum q - q.q)`` with ``q <= 1/2`` (no cancellation however saturated); the histogram bins
    are ``[e_k, e_k+1)`` with underflow ``z < -hist_max`` and overflow ``z >= hist_max``.
    On the CPU the slice sum doubles as the finiteness check: only a slice whose sum is not finite
    is compacted to its finite values (and its non-finite ones counted). Without reading the
    device, non-finite logits are masked instead: set to 0 for the sums and the histogram (their
    count taken back out of the bin of 0), to ``|z| = inf`` for the cuts (counted by both, taken
    back out) and the gains (``q = 0``, no gain). For finite logits both give the same numbers.
    """

    def __init__(self, name: str, kind: str, path: str, source: str):
        self.name, self.kind, self.path, self.source = name, kind, path, source
        self.count = self.nonfinite = 0
        self.shift: float | Tensor | None = None
        self.s1: float | Tensor = 0.0
        self.ints: Tensor | None = None
        self.floats: Tensor | None = None
        self.hist: Tensor | None = None
        self.dev: dict[str, Tensor] | None = None   # the device-held counts, shift and s1 (sync-free)

    def add(self, z: Tensor, *, threshold: float, bins: int, lo: float, hi: float) -> None:
        z = z.detach()
        size = _SLICE_ELEMENTS.get(z.device.type, _SLICE_ELEMENTS["cpu"])
        sync_free = _SYNC_FREE.get(z.device.type, True)
        scale = bins / (hi - lo)
        offset = 1.0 - lo * scale                                           # column of z: floor(z*scale + offset)
        for flat in _flat_slices(z, size):
            zd = flat.to(torch.float64)                                     # (n,) may alias z: never written
            if sync_free:
                self._add_masked(zd, threshold, bins, scale, offset)
                continue
            total = float(zd.sum())
            if not math.isfinite(total):
                zd = zd[torch.isfinite(zd)]                                 # (n_finite,)
                self.nonfinite += flat.numel() - zd.numel()
                total = float(zd.sum())
            n = zd.numel()
            if n == 0:
                continue
            if self.shift is None:
                self.shift = total / n
                self._alloc(zd.device, bins)
            self.count += n
            self.s1 += total - n * self.shift
            self._add_rest(zd, zd, None, threshold, bins, scale, offset)

    def _alloc(self, device: torch.device, bins: int) -> None:
        self.ints = torch.zeros(2, dtype=torch.int64, device=device)
        self.floats = torch.zeros(2, dtype=torch.float64, device=device)
        self.hist = torch.zeros(bins + 2, dtype=torch.int64, device=device)

    def _add_masked(self, zd: Tensor, threshold: float, bins: int, scale: float, offset: float) -> None:
        """One slice without reading the device: the shift set on the device by the first slice
        with a finite logit, non-finite logits masked (see the class docstring)."""
        if self.dev is None:
            self._alloc(zd.device, bins)
            self.dev = {"counts": torch.zeros(2, dtype=torch.int64, device=zd.device),      # count, nonfinite
                        "shift": torch.zeros((), dtype=torch.float64, device=zd.device),
                        "s1": torch.zeros((), dtype=torch.float64, device=zd.device),
                        "have": torch.zeros((), dtype=torch.bool, device=zd.device)}
        st = self.dev
        fin = torch.isfinite(zd)                                            # (n,)
        nf = fin.sum()                                                      # finite logits of the slice
        bad = zd.numel() - nf
        zc = torch.where(fin, zd, 0.0)                                      # (n,) non-finite -> 0
        total = zc.sum()
        nff = nf.to(torch.float64)
        shift = torch.where(st["have"], st["shift"], total / nff.clamp(min=1.0))
        st["shift"] = shift
        st["s1"] = st["s1"] + (total - nff * shift)
        st["have"] = st["have"] | (nf > 0)
        st["counts"] += torch.stack([nf, bad])
        self._add_rest(zd, zc, (fin, bad), threshold, bins, scale, offset, shift)

    def _add_rest(self, zd: Tensor, zc: Tensor, mask, threshold: float, bins: int, scale: float, offset: float,
                  shift=None) -> None:
        """The cuts, gains, ``sum (z - c)^2`` and histogram of one slice (``mask``: None for a slice
        of finite logits, else ``(finite, count of the others)``; ``zc`` then has 0 at the others)."""
        cut = _BAND_CUTS[self.kind]
        shift = self.shift if shift is None else shift
        a = zd.abs()                                                        # (n,) |z|, a fresh buffer
        if mask is not None:
            fin, bad = mask
            a.masked_fill_(~fin, math.inf)                                  # counted by both cuts: taken out below
        big = (a > threshold).sum()
        out = (a > cut).sum()
        if self.kind == "sigmoid" or self.kind == "tanh":
            q = a.mul_(-1.0 if self.kind == "sigmoid" else -2.0).sigmoid_()   # (n,) in [0, 1/2]
            gain = (q.sum() - torch.dot(q, q)) * 4.0
        else:                                                               # slope 1/6 inside (-3, 3): relative 1
            gain = (a < 3.0).sum().to(torch.float64)
        d = zd - shift                                                      # (n,) fresh buffer
        if mask is not None:
            d = torch.where(fin, d, 0.0)
        s2 = torch.dot(d, d)
        col = torch.mul(zc, scale, out=d).add_(offset).floor_().clamp_(0, bins + 1)   # (n,) 0 .. bins+1
        self.hist += torch.bincount(col.to(torch.int64), minlength=bins + 2)
        if mask is not None:
            big, out = big - bad, out - bad
            zero = int(min(max(math.floor(offset), 0), bins + 1))           # the column of z = 0
            self.hist[zero] -= bad
        self.ints += torch.stack([big, out])
        self.floats += torch.stack([s2, gain])

    def state(self, bins: int) -> dict:
        """The gate's sums as host numbers (read from the device once): ``count``, ``nonfinite``,
        ``shift``, ``s1``, ``s2``, ``gain_sum``, ``n_logit_sat``, ``n_output_sat``, ``hist``."""
        count, nonfinite, shift, s1 = self.count, self.nonfinite, self.shift, self.s1
        if self.dev is not None:
            counts = self.dev["counts"].cpu().tolist()
            count, nonfinite = counts
            shift, s1 = float(self.dev["shift"].cpu()), float(self.dev["s1"].cpu())
        if count:
            ints, floats = self.ints.cpu().tolist(), self.floats.cpu().tolist()
            hist = self.hist.cpu().numpy().astype(np.int64)
        else:
            ints, floats, hist, shift, s1 = [0, 0], [0.0, 0.0], np.zeros(bins + 2, np.int64), 0.0, 0.0
        return dict(count=int(count), nonfinite=int(nonfinite), shift=float(shift), s1=float(s1), s2=floats[0],
                    gain_sum=floats[1], n_logit_sat=int(ints[0]), n_output_sat=int(ints[1]), hist=hist)

    def finish(self, bins: int) -> dict:
        return _finish(self.state(bins))


def _finish(st: dict) -> dict:
    """A gate's row of the result from its sums (:meth:`_Acc.state`)."""
    n = st["count"]
    if n:
        m1 = st["s1"] / n
        mean, std, gain = st["shift"] + m1, math.sqrt(max(st["s2"] / n - m1 * m1, 0.0)), st["gain_sum"] / n
    else:                                                                   # no finite logit at all
        mean = std = gain = math.nan
    return dict(count=n, nonfinite=st["nonfinite"], n_logit_sat=st["n_logit_sat"],
                n_output_sat=st["n_output_sat"], gain=gain, mean=mean, std=std, hist=st["hist"])


def merge_states(states: list[dict]) -> dict:
    """One gate's row from the sums of several parts of the inputs (:meth:`_Acc.state` of each,
    e.g. of every rank): counts and histograms added, the moments merged exactly
    (:func:`probe.runtime.moments.merge_moments`, each part's shifted sums turned into its mean
    and squared deviations first)."""
    n, mean, m2 = merge_moments(from_shifted(st["count"], st["shift"], st["s1"], st["s2"]) for st in states)
    ints = {k: sum(st[k] for st in states) for k in ("nonfinite", "n_logit_sat", "n_output_sat")}
    hist = np.sum([st["hist"] for st in states], axis=0).astype(np.int64)
    gain_sum = math.fsum(st["gain_sum"] for st in states)
    if n:
        mean, std, gain = float(mean), math.sqrt(m2 / n), gain_sum / n
    else:
        mean = std = gain = math.nan
    return dict(count=n, **ints, gain=gain, mean=mean, std=std, hist=hist)


# --- hooks and the function mode -----------------------------------------------------------------


class _Frame:
    __slots__ = ("module", "path", "calls")

    def __init__(self, module: nn.Module, path: str):
        self.module, self.path, self.calls = module, path, {}


class _Recorder:
    """Shared state of the module hooks and the function mode for one :func:`saturation` call."""

    def __init__(self, threshold: float, bins: int, hist_max: float):
        self.threshold, self.bins, self.lo, self.hi = threshold, bins, -hist_max, hist_max
        self.stack: list[_Frame] = []
        self.gate_depth = 0          # > 0 while a hooked gate module runs: calls inside are not gates
        self.busy = False            # our own statistics are running (module hooks run under the mode)
        self.accs: dict[str, _Acc] = {}
        self.ran: set[str] = set()   # paths of gate modules that were called

    def record(self, name: str, kind: str, path: str, source: str, z: Any) -> None:
        if not isinstance(z, Tensor) or not z.is_floating_point():
            return
        acc = self.accs.get(name)
        if acc is None:
            acc = self.accs[name] = _Acc(name, kind, path, source)
        self.busy = True
        try:
            acc.add(z, threshold=self.threshold, bins=self.bins, lo=self.lo, hi=self.hi)
        finally:
            self.busy = False

    def hooks(self, module: nn.Module, path: str, kind: str | None):
        def pre(mod, args):
            self.stack.append(_Frame(mod, path))
            if kind is not None:
                self.ran.add(path)
                if self.gate_depth == 0 and not self.busy and args:
                    self.record(path or "(root)", kind, path, "module", args[0])
                self.gate_depth += 1

        def post(mod, args, output):  # always_call: also runs when the forward raises
            while self.stack:
                if self.stack.pop().module is mod:
                    break
            if kind is not None:
                self.gate_depth = max(0, self.gate_depth - 1)

        return pre, post


class _GateFunctionMode(TorchFunctionMode):
    """Records the input of every functional gate call made outside a hooked gate module."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.recorder
        try:
            spec = _FUNCTIONS.get(func)
        except TypeError:  # an unhashable callable
            spec = None
        if spec is not None and rec.gate_depth == 0 and not rec.busy and rec.stack:
            label, kind = spec
            frame = rec.stack[-1]
            k = frame.calls.get(label, 0)
            frame.calls[label] = k + 1
            z = args[0] if args else kwargs.get("input", kwargs.get("self"))
            rec.record(f"{frame.path}:{label}#{k}", kind, frame.path, "functional", z)
        return func(*args, **kwargs)


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, Gate):
        return m.kind
    for cls, kind in _MODULE_KINDS:
        if isinstance(m, cls):
            return kind
    return None


def _stage(modules: Mapping[str, nn.Module], path: str) -> str:
    """The block a module path belongs to (see the module docstring)."""
    if not path:
        return "(root)"
    parts = path.split(".")
    for i in range(len(parts) - 1):
        if isinstance(modules.get(".".join(parts[:i + 1])), (nn.Sequential, nn.ModuleList)):
            return ".".join(parts[:i + 2])
    return parts[0]


def _role(modules: Mapping[str, nn.Module], path: str, source: str) -> str:
    m = modules.get(path)
    if source == "module" and isinstance(m, Gate) and m.role:
        return m.role
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        anc = modules.get(".".join(parts[:i]))
        for cls, family in _FAMILIES:
            if isinstance(anc, cls):
                return f"{family}.{source}"
    return source


def _runner(model: nn.Module, device) -> tuple[torch.device, torch.dtype | None, Callable[[Tensor], Any]]:
    """``(device, dtype, forward)``: the model itself where its tensors already live on ``device``,
    else ``functional_call`` on detached copies there (the model is never moved)."""
    tensors = list(model.parameters()) + list(model.buffers())
    floating = [t for t in tensors if t.is_floating_point()]
    dtype = floating[0].dtype if floating else None
    if device is None or device == "auto":
        dev = tensors[0].device if tensors else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    if all(t.device == dev for t in tensors):
        return dev, dtype, model
    params = {n: p.detach().to(dev) for n, p in model.named_parameters()}
    buffers = {n: b.detach().to(dev) for n, b in model.named_buffers()}
    return dev, dtype, lambda xb: torch.func.functional_call(model, (params, buffers), (xb,))


@takes_loader("x")
@exact
def saturation(model: nn.Module, x: Tensor, *, batch_size: int = 128, bins: int = 64, threshold: float = 3.0,
               hist_max: float = 12.0, device: torch.device | str | None = None,
               progress: Progress | None = None) -> "SaturationResult":
    """Saturation statistics of every gate of ``model`` over the inputs ``x`` (N, ...).

    ``x`` is run in chunks of ``batch_size`` (results do not depend on it, up to float64 rounding of
    the means); ``bins`` equal histogram bins over ``[-hist_max, hist_max)`` plus under/overflow;
    ``threshold`` the ``|z|`` cut; ``device`` where to run (``None``: the model's device); progress is
    reported as ``progress("saturation", samples_done, N)`` (under ``torchrun``: of this rank's share).
    Floating inputs are cast to the model's floating dtype. The model is not changed. See the
    module docstring for the definitions.
    """
    check_options(batch_size=batch_size, bins=bins, threshold=threshold, hist_max=hist_max)
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    x = torch.as_tensor(x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise UserError(f"x must hold at least one sample along its first axis, got shape {tuple(x.shape)}")
    n = int(x.shape[0])
    ddp = current()
    # under torchrun each rank streams its contiguous share of the inputs; the sums are merged
    sharded = ddp.active and n >= ddp.world
    part = ddp.shard(n) if sharded else slice(0, n)
    dev, dtype, forward = _runner(model, device)
    modules = dict(model.named_modules())
    rec = _Recorder(float(threshold), int(bins), float(hist_max))
    gate_paths = [p for p, m in modules.items() if _module_kind(m) is not None]
    handles = []
    try:
        for path, m in modules.items():
            pre, post = rec.hooks(m, path, _module_kind(m))
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
        with eval_mode(model), torch.no_grad():
            for start in range(part.start, part.stop, batch_size):
                xb = x[start:min(start + batch_size, part.stop)]
                xb = xb.to(device=dev, dtype=dtype) if (xb.is_floating_point() and dtype is not None) \
                    else xb.to(device=dev)
                rec.stack.clear()
                rec.gate_depth = 0
                with _GateFunctionMode(rec):
                    forward(xb)
                if progress is not None:
                    progress("saturation", min(start + batch_size, part.stop) - part.start, part.stop - part.start)
    finally:
        for h in handles:
            h.remove()
        rec.stack.clear()

    if not sharded:
        rows = [(acc, acc.finish(bins)) for acc in rec.accs.values()]
        ran = rec.ran
    else:
        rows, ran = _merged_rows(ddp, rec, bins)
    G = len(rows)

    def strings(values) -> np.ndarray:
        values = list(values)
        return np.array(values, dtype=f"<U{max([1] + [len(v) for v in values])}")

    def numbers(key, dtype_) -> np.ndarray:
        return np.array([r[key] for _, r in rows], dtype=dtype_).reshape(G)

    return SaturationResult(
        names=strings(a.name for a, _ in rows),
        kinds=strings(a.kind for a, _ in rows),
        roles=strings(_role(modules, a.path, a.source) for a, _ in rows),
        groups=strings(_role(modules, a.path, a.source).split(".")[0] for a, _ in rows),
        stages=strings(_stage(modules, a.path) for a, _ in rows),
        sources=strings(a.source for a, _ in rows),
        count=numbers("count", np.int64), nonfinite=numbers("nonfinite", np.int64),
        n_logit_sat=numbers("n_logit_sat", np.int64), n_output_sat=numbers("n_output_sat", np.int64),
        gain=numbers("gain", np.float64), mean=numbers("mean", np.float64), std=numbers("std", np.float64),
        hist=(np.stack([r["hist"] for _, r in rows]) if rows else np.zeros((0, bins + 2), np.int64)),
        edges=np.linspace(-float(hist_max), float(hist_max), int(bins) + 1),
        threshold=float(threshold), n_samples=n,
        unused=tuple(p or "(root)" for p in gate_paths if p not in ran),
    )


class _Gate:
    """A gate's identity (name, kind, module path, source) as every rank reports it."""

    __slots__ = ("name", "kind", "path", "source")

    def __init__(self, name: str, kind: str, path: str, source: str):
        self.name, self.kind, self.path, self.source = name, kind, path, source


def _merged_rows(ddp, rec: _Recorder, bins: int) -> tuple[list, set]:
    """Every rank's gate sums gathered (one all-gather of host numbers) and merged per gate
    (:func:`merge_states`), gates in the order of their first appearance in rank order; the gate
    modules that ran on any rank."""
    mine = ([(a.name, a.kind, a.path, a.source, a.state(bins)) for a in rec.accs.values()], sorted(rec.ran))
    parts = ddp.all_gather(mine)
    gates: dict[str, tuple] = {}
    states: dict[str, list] = {}
    ran: set = set()
    for accs, ran_ in parts:
        ran.update(ran_)
        for name, kind, path, source, st in accs:
            gates.setdefault(name, (name, kind, path, source))
            states.setdefault(name, []).append(st)
    return [(_Gate(*gates[name]), merge_states(states[name])) for name in gates], ran
