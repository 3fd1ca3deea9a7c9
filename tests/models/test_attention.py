"""Attention modules: shapes, gradients, exact parameter counts, findable gates, closed-form maths."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from models.attention import (
    ATTENTION_NAMES,
    CBAM,
    LKA,
    NAM,
    SE,
    TRIPLET_ACTIVATIONS,
    TRIPLET_POOL_PRESETS,
    TRIPLET_POOL_TYPES,
    CoordAtt,
    TripletAttention,
    TripletCA,
    TripletLKA,
    _channel_pool,
    attention_param_count,
    canonical_attention_name,
    create_attention,
)
from models.gates import find_gates

# float64 exact identities: a few ulps of accumulated rounding, far below any real discrepancy.
TOL64 = dict(rtol=1e-10, atol=1e-10)


def _build(name: str, channels: int, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_attention(name, channels, **kwargs).double()


def _randomise_bn(m: nn.Module) -> None:
    """Give every BN non-trivial affine parameters and running stats, so nothing cancels by accident."""
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            with torch.no_grad():
                mod.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.1)
                mod.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.1)
                mod.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)


# ---------------------------------------------------------------------------------------- smoke


@pytest.mark.parametrize("name", ATTENTION_NAMES)
@pytest.mark.parametrize("channels,size", [(4, 2), (8, 8)])
def test_shape_finite_and_gradients(name, channels, size):
    m = _build(name, channels)
    x = torch.randn(3, channels, size, size + 1, dtype=torch.float64, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    _check_param_grads(name, m)


def _check_param_grads(name: str, m: nn.Module, dead_relu_possible: bool = True) -> None:
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"
        # Deliberate exceptions to "every gradient is non-zero":
        # * CBAM's spatial BN weight starts at 0, which zeroes the spatial conv's gradient on the
        #   first step (defined, and exactly zero);
        # * SE / CBAM at the default reduction 16 have a single hidden ReLU unit for C < 32, which
        #   may be dead on a given batch (test_se_cbam_gradients_non_zero covers a wider MLP).
        if name == "cbam" and pname == "spatial_conv.weight":
            assert torch.all(p.grad == 0)
        elif name in ("se", "cbam") and dead_relu_possible:
            continue
        else:
            assert p.grad.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", ["se", "cbam"])
def test_se_cbam_gradients_non_zero(name):
    m = _build(name, 8, reduction=1)  # 8 hidden ReLU units: some are alive on this batch
    m(torch.randn(3, 8, 4, 4, dtype=torch.float64)).sum().backward()
    _check_param_grads(name, m, dead_relu_possible=False)


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_functional_call_and_vmap_eval(name):
    """Per-sample vmap over inputs and vmap over stacked parameter sets both match the plain module."""
    m = _build(name, 8).eval()
    _randomise_bn(m)
    x = torch.randn(4, 8, 5, 6, dtype=torch.float64)
    state = {**dict(m.named_parameters()), **dict(m.named_buffers())}
    ref = m(x)
    per_sample = vmap(lambda xi: functional_call(m, state, (xi[None],))[0])(x)
    torch.testing.assert_close(per_sample, ref, **TOL64)

    params = {k: v.detach() for k, v in m.named_parameters()}
    if not params:  # nn.Identity: nothing to stack
        return
    buffers = dict(m.named_buffers())
    stacked = {k: torch.stack([v, 1.1 * v]) for k, v in params.items()}
    outs = vmap(lambda p: functional_call(m, {**p, **buffers}, (x,)))(stacked)
    torch.testing.assert_close(outs[0], ref, **TOL64)
    scaled = {k: 1.1 * v for k, v in params.items()}
    torch.testing.assert_close(outs[1], functional_call(m, {**scaled, **buffers}, (x,)), **TOL64)


def test_bottleneck_channel_count():
    """A Bottleneck with planes=4, expansion=4 hands 16 channels; every module must accept them."""
    x = torch.randn(2, 16, 4, 4)
    for name in ATTENTION_NAMES:
        assert create_attention(name, 4 * 4)(x).shape == x.shape


# ------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", ATTENTION_NAMES)
@pytest.mark.parametrize("channels", [4, 16, 64, 256])
def test_param_count_matches_closed_form(name, channels):
    m = create_attention(name, channels)
    assert sum(p.numel() for p in m.parameters()) == attention_param_count(name, channels)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("se", dict(reduction=4)),
        ("cbam", dict(reduction=8, kernel_size=3)),
        ("triplet", dict(kernel_size=5, pool_types=("avg", "max", "median"))),
        ("triplet", dict(no_spatial=True)),
        ("triplet", dict(activation="gelu", gate="tanh")),
        ("ca", dict(reduction=4)),
        ("triplet_ca", dict(reduction=4, pool_types=("l2", "max"))),
        ("triplet_lka", dict(kernel_size=3)),
    ],
)
def test_param_count_with_options(name, kwargs):
    for channels in (16, 64):
        m = create_attention(name, channels, **kwargs)
        assert sum(p.numel() for p in m.parameters()) == attention_param_count(name, channels, **kwargs)


def test_param_count_reference_values():
    """Hand-evaluated numbers, so a formula wrong in the same way as the module is still caught."""
    for c in (16, 256):
        assert attention_param_count("triplet", c) == 300  # 3 (2 * 7^2 + 2)
    assert attention_param_count("triplet", 64, no_spatial=True) == 200
    for c in (16, 64, 256):
        r = 16
        assert attention_param_count("se", c) == 2 * c * c // r
        assert attention_param_count("cbam", c) == 2 * c * c // r + c // r + c + 100
        assert attention_param_count("nam", c) == 2 * c
        assert attention_param_count("lka", c) == c * c + 77 * c
    assert attention_param_count("se", 4) == 8  # hidden width floored to max(1, 4 // 16) = 1
    assert attention_param_count("ca", 64) == 64 * 8 + 8 + 2 * 8 + 2 * (8 * 64 + 64)  # mip = 8
    assert attention_param_count("ca", 512) == 512 * 16 + 16 + 2 * 16 + 2 * (16 * 512 + 512)  # mip = 16
    assert attention_param_count("triplet_lka", 16) == 200 + 16 * 16 + 77 * 16
    assert attention_param_count("none", 64) == 0


def test_param_count_rejects_unknown_keyword():
    with pytest.raises(TypeError):
        attention_param_count("se", 16, kernel=3)


# ------------------------------------------------------------------------------------------ gates

EXPECTED_GATES = {
    "none": [],
    "se": [("sigmoid", "se.channel")],
    "cbam": [("sigmoid", "cbam.channel"), ("sigmoid", "cbam.spatial")],
    "triplet": [("sigmoid", "triplet.cw"), ("sigmoid", "triplet.hc"), ("sigmoid", "triplet.hw")],
    "ca": [("hard_sigmoid", "ca.h_swish"), ("sigmoid", "ca.h"), ("sigmoid", "ca.w")],
    "nam": [("sigmoid", "nam")],
    "lka": [],
    "triplet_ca": [
        ("sigmoid", "triplet.cw"),
        ("sigmoid", "triplet.hc"),
        ("hard_sigmoid", "ca.h_swish"),
        ("sigmoid", "ca.h"),
        ("sigmoid", "ca.w"),
    ],
    "triplet_lka": [("sigmoid", "triplet.cw"), ("sigmoid", "triplet.hc")],
}


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_gates_are_findable(name):
    gates = find_gates(create_attention(name, 16))
    assert sorted((g.kind, g.role) for g in gates) == sorted(EXPECTED_GATES[name])


def test_triplet_tanh_and_no_spatial_gates():
    gates = find_gates(TripletAttention(gate="tanh"))
    assert [g.kind for g in gates] == ["tanh"] * 3
    gates = find_gates(TripletCA(16, gate="tanh"))
    assert sorted(g.kind for g in gates) == ["hard_sigmoid", "sigmoid", "sigmoid", "tanh", "tanh"]
    assert len(find_gates(TripletAttention(no_spatial=True))) == 2


def test_cbam_gate_hooks_see_logits():
    m = CBAM(8, reduction=4)
    with torch.no_grad():
        m.spatial_bn.weight.fill_(1.0)  # make the spatial logits non-constant
    seen = {}

    def hook(mod, inputs, output):
        seen[mod.role] = (inputs[0].detach().clone(), output.detach().clone())

    handles = [m.get_submodule(g.path).register_forward_hook(hook) for g in find_gates(m)]
    m(torch.randn(2, 8, 5, 6))
    for h in handles:
        h.remove()
    assert seen["cbam.channel"][0].shape == (2, 8, 1, 1)
    assert seen["cbam.spatial"][0].shape == (2, 1, 5, 6)
    for z, g in seen.values():
        # the hook input is the logit (unbounded), the output its sigmoid
        torch.testing.assert_close(g, torch.sigmoid(z))
        assert (z < 0).any()


def test_triplet_gate_hook_shapes():
    m = TripletAttention()
    seen = {}
    for g in find_gates(m):
        m.get_submodule(g.path).register_forward_hook(lambda mod, i, o: seen.__setitem__(mod.role, i[0].shape))
    m(torch.randn(2, 8, 5, 6))
    assert seen == {"triplet.cw": (2, 1, 8, 6), "triplet.hc": (2, 1, 5, 8), "triplet.hw": (2, 1, 5, 6)}


# --------------------------------------------------------------------------- closed-form numerics


def test_se_against_hand_computation():
    torch.manual_seed(0)
    m = SE(8, reduction=2).double()
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    w1 = m.fc1.weight[:, :, 0, 0]  # (4, 8)
    w2 = m.fc2.weight[:, :, 0, 0]  # (8, 4)
    s = x.mean(dim=(2, 3))  # (3, 8)
    g = 1.0 / (1.0 + torch.exp(-(torch.clamp(s @ w1.T, min=0) @ w2.T)))  # (3, 8)
    torch.testing.assert_close(m(x), x * g[:, :, None, None], **TOL64)


def _nam_by_hand(x, gamma, beta, eps):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as BN uses for normalising
    xhat = (x - mean) / torch.sqrt(var + eps)
    w = (gamma.abs() / gamma.abs().sum()).detach()[None, :, None, None]
    y = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
    return x * torch.sigmoid(w * y), xhat, w, y


def test_nam_against_hand_computation_and_detached_weight():
    torch.manual_seed(0)
    m = NAM(6).double().train()
    with torch.no_grad():
        m.bn.weight.copy_(torch.tensor([0.3, -1.2, 2.0, 0.7, -0.1, 1.5], dtype=torch.float64))
        m.bn.bias.copy_(torch.linspace(-0.5, 0.5, 6, dtype=torch.float64))
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    out = m(x)
    gamma = m.bn.weight.detach().clone().requires_grad_(True)
    ref, xhat, w, y = _nam_by_hand(x, gamma, m.bn.bias.detach(), m.bn.eps)
    torch.testing.assert_close(out, ref, **TOL64)

    # d(sum out)/d gamma_c through the normalised path only: sum x * sigma'(w y) * w_c * xhat.
    (g_mod,) = torch.autograd.grad(out.sum(), m.bn.weight)
    s = torch.sigmoid(w * y)
    by_hand = (x * s * (1 - s) * w * xhat).sum(dim=(0, 2, 3))
    torch.testing.assert_close(g_mod, by_hand, **TOL64)
    (g_ref,) = torch.autograd.grad(ref.sum(), gamma)
    torch.testing.assert_close(g_mod, g_ref, **TOL64)

    # The gradient through w would be non-zero here, so a non-detached w would break the match.
    gamma2 = m.bn.weight.detach().clone().requires_grad_(True)
    w_live = (gamma2.abs() / gamma2.abs().sum())[None, :, None, None]
    live = x * torch.sigmoid(w_live * (gamma2[None, :, None, None] * xhat + m.bn.bias.detach()[None, :, None, None]))
    (g_live,) = torch.autograd.grad(live.sum(), gamma2)
    assert (g_live - g_mod).abs().max() > 1e-6


def test_cbam_spatial_gate_is_half_at_init():
    """Spatial BN weight 0 at init: the spatial gate is sigma(0) = 1/2 everywhere."""
    torch.manual_seed(0)
    m = CBAM(8, reduction=4).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    z_c = (m.mlp(x.mean(dim=(2, 3))) + m.mlp(x.amax(dim=(2, 3))))[:, :, None, None]
    torch.testing.assert_close(m(x), 0.5 * x * torch.sigmoid(z_c), **TOL64)


def test_triplet_against_hand_rotation():
    """Mean of three rotated branches, each with its gate broadcast back along the pooled axis."""
    torch.manual_seed(0)
    m = TripletAttention(kernel_size=3).double().eval()
    _randomise_bn(m)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y_cw = (x.permute(0, 2, 1, 3) * m.cw(x.permute(0, 2, 1, 3))).permute(0, 2, 1, 3)
    y_hc = (x.permute(0, 3, 2, 1) * m.hc(x.permute(0, 3, 2, 1))).permute(0, 3, 2, 1)
    y_hw = x * m.hw(x)
    torch.testing.assert_close(m(x), (y_cw + y_hc + y_hw) / 3, **TOL64)
    # One branch by hand: pool [max; mean] over C, conv, eval BN, sigmoid.
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    z = torch.nn.functional.conv2d(pooled, m.hw.conv.weight, padding=1)
    bn = m.hw.bn
    z = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(m.hw(x), torch.sigmoid(z), **TOL64)


def test_triplet_no_spatial_is_mean_of_two():
    m = TripletAttention(no_spatial=True).double().eval()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y_cw = x * m.cw(x.transpose(1, 2)).transpose(1, 2)
    y_hc = x * m.hc(x.transpose(1, 3)).transpose(1, 3)
    torch.testing.assert_close(m(x), (y_cw + y_hc) / 2, **TOL64)


def test_triplet_ca_and_lka_use_their_spatial_branch():
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    for cls, inner in ((TripletCA, CoordAtt), (TripletLKA, LKA)):
        m = cls(8).double().eval()
        assert isinstance(m.hw, inner)
        y_cw = x * m.cw(x.transpose(1, 2)).transpose(1, 2)
        y_hc = x * m.hc(x.transpose(1, 3)).transpose(1, 3)
        torch.testing.assert_close(m(x), (y_cw + y_hc + m.hw(x)) / 3, **TOL64)


def test_coordatt_gate_shapes_and_product():
    torch.manual_seed(0)
    m = CoordAtt(8, reduction=2).double().eval()
    _randomise_bn(m)
    seen = {}
    for g in find_gates(m):
        m.get_submodule(g.path).register_forward_hook(lambda mod, i, o: seen.__setitem__(mod.role, o))
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    out = m(x)
    assert seen["ca.h"].shape == (2, 8, 3, 1) and seen["ca.w"].shape == (2, 8, 1, 5)
    torch.testing.assert_close(out, x * seen["ca.h"] * seen["ca.w"], **TOL64)


def test_lka_is_raw_signed_product():
    torch.manual_seed(0)
    m = LKA(4).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    a = m.conv1(m.conv_spatial(m.conv0(x)))
    torch.testing.assert_close(m(x), x * a, **TOL64)
    assert (a < 0).any()  # no squashing: the attention map takes negative values


# ------------------------------------------------------------------------------------------ pools


def test_channel_pools_by_hand():
    x = torch.tensor([3.0, -4.0, 1.0, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
    expected = {"avg": 0.0, "max": 3.0, "median": 0.0, "l1": 8.0, "l2": 26.0**0.5}  # lower median of 4
    for kind in TRIPLET_POOL_TYPES:
        got = _channel_pool(x, kind)
        assert got.shape == (1, 1, 1, 1)
        assert got.item() == pytest.approx(expected[kind], abs=1e-12), kind


@pytest.mark.parametrize("pools", TRIPLET_POOL_PRESETS)
def test_triplet_pool_presets_run(pools):
    m = TripletAttention(pool_types=pools).double()
    x = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    x[0, 0, 0, 0] = 1.0  # mostly zeros: the l2 norm's gradient at 0 must stay finite
    x.requires_grad_(True)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert sum(p.numel() for p in m.parameters()) == 3 * (len(pools) * 49 + 2)


def test_bad_pool_type_lists_valid_names():
    with pytest.raises(ValueError, match="median"):
        TripletAttention(pool_types=("max", "mediun"))
    with pytest.raises(ValueError, match="empty"):
        TripletAttention(pool_types=())


@pytest.mark.parametrize("activation", [None, *TRIPLET_ACTIVATIONS])
def test_triplet_activations(activation):
    m = TripletAttention(activation=activation)
    x = torch.randn(2, 4, 3, 3)
    assert m(x).shape == x.shape
    assert sum(p.numel() for p in m.parameters()) == 300


def test_bad_options_raise():
    with pytest.raises(ValueError, match="activation"):
        TripletAttention(activation="swish")
    with pytest.raises(ValueError, match="sigmoid"):
        TripletAttention(gate="softmax")
    with pytest.raises(ValueError, match="odd"):
        TripletAttention(kernel_size=4)


# ------------------------------------------------------------------------------------------ names


def test_names_and_seed_spellings():
    assert len(set(ATTENTION_NAMES)) == len(ATTENTION_NAMES)
    spellings = {
        "None": "none",
        "SE": "se",
        "CBAM": "cbam",
        "TripletAttention": "triplet",
        "CA": "ca",
        "TripletCA": "triplet_ca",
        "TripletLKA": "triplet_lka",
        "triplet-lka": "triplet_lka",
        "NAM": "nam",
        "LKA": "lka",
    }
    for spelling, canonical in spellings.items():
        assert canonical_attention_name(spelling) == canonical
    assert canonical_attention_name(None) == "none"
    assert isinstance(create_attention(None, 8), nn.Identity)
    assert isinstance(create_attention("None", 8), nn.Identity)
    assert type(create_attention("TripletAttention", 8)) is TripletAttention
    assert type(create_attention("TripletCA", 8)) is TripletCA
    assert type(create_attention("TripletLKA", 8)) is TripletLKA
    assert type(create_attention("CA", 8)) is CoordAtt
    assert type(create_attention("se", 8, reduction=2)) is SE
    for name in ATTENTION_NAMES:
        assert canonical_attention_name(name) == name


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="did you mean 'triplet'"):
        create_attention("tripet", 8)
    with pytest.raises(ValueError, match="'cbam'"):
        attention_param_count("cbma", 8)
    with pytest.raises(ValueError, match="valid names"):
        create_attention("resnet", 8)
