"""Model zoo: registry smoke test, fusion semantics, seed rows, parameter counts, gates."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import (SEED_FUSIONS, FusionSpecError, ModelConfigError, ModelNameError, PinnedBatchNorm2d,
                    count_parameters, create_model, find_gates, list_models, parse_fusion)

# Registered names whose default size is too heavy for the default suite: smoke-tested here at a
# reduced width (the full size runs under -m slow).
HEAVY = {"wrn16_10": {"widen": 1}, "wrn28_10": {"widen": 1}, "resnet18": {"width": 8},
         "resnet34": {"width": 8}, "resnet50": {"width": 4}, "resnet4": {"width": 8}}
HEAVY.update({n: {"width": 4} for n in list_models("attention") if n.startswith("resnet50_")})


def _smoke(model: nn.Module, in_chans: int, size: int = 8, num_classes: int = 10):
    torch.manual_seed(0)
    model.train()
    x = torch.randn(4, in_chans, size, size)
    out = model(x)
    assert out.shape == (4, num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nonfinite


@pytest.mark.parametrize("name", list_models())
def test_registry_smoke(name):
    kw = dict(HEAVY.get(name, {}))
    model = create_model(name, in_chans=2, num_classes=7, **kw)
    _smoke(model, 2, num_classes=7)
    assert model.probe_config["name"] == name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_registry_smoke_full_size(name):
    _smoke(create_model(name, in_chans=3, num_classes=5), 3, size=16, num_classes=5)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ModelNameError, match="mul_resnet"):
        create_model("mul_resnt")
    with pytest.raises(ModelConfigError, match="accepted arguments"):
        create_model("tiny_add", bogus=1)


def test_user_factory_by_module_path():
    model = create_model("torch.nn:Linear", in_features=3, out_features=2)
    assert isinstance(model, nn.Linear) and model.probe_config["name"] == "torch.nn:Linear"
    with pytest.raises(ModelNameError):
        create_model("no_such_pkg_xyz.mod:factory")


# --- fusion specs -----------------------------------------------------------------------------


def test_seed_table_has_every_row_and_round_trips():
    assert len(SEED_FUSIONS) >= 59
    assert len({r.id for r in SEED_FUSIONS}) == len(SEED_FUSIONS)
    for row in SEED_FUSIONS:
        assert parse_fusion(row.name) == row.spec
        assert parse_fusion(row.name).name == row.name
    # distinct experiments have distinct specs (the seed never repeats a configuration)
    assert len({r.name for r in SEED_FUSIONS}) == len(SEED_FUSIONS)
    by_acc = {r.caltech101_top1 for r in SEED_FUSIONS}
    assert {87.62, 78.23, 77.13, 86.41, 87.85} <= by_acc


@pytest.mark.parametrize("text,err", [
    ("sub,r=bn,s=id", "add or mul"), ("add,r=sig/bn,s=id", "out of order"), ("add,r=bn@b=fixd:1,s=id", "learn"),
    ("add,r=bn,r=bn", "each once"), ("mul,r=bn,s=id,gate=conv5x5", "adapter"), ("add,r=+x,s=id", "number"),
])
def test_bad_fusion_names(text, err):
    with pytest.raises(FusionSpecError, match=err):
        parse_fusion(text)


def test_canonical_name_drops_defaults():
    spec = parse_fusion("mul,r=bn@w=learn@b=learn/sigmoid/+0,s=identity")
    assert spec.name == "mul,r=bn/sig,s=id"


def test_fixed_value_is_pinned_and_init_value_trains():
    """fixed:v is re-imposed on every forward and untouched by SGD steps with weight decay;
    init:v starts at v and moves."""
    torch.manual_seed(0)
    fixed = PinnedBatchNorm2d(4, weight=models.ParamMode("fixed", 1.0), bias=models.ParamMode("fixed", 1.0))
    init = PinnedBatchNorm2d(4, bias=models.ParamMode("init", 1.0))
    assert fixed.weight is None and fixed.bias is None  # not parameters: nothing to optimise
    assert torch.equal(init.bias.detach(), torch.ones(4))
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), fixed, nn.Conv2d(4, 4, 1), init)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x = torch.randn(8, 2, 5, 5)
    for _ in range(5):
        opt.zero_grad()
        (net(x) - 3.0).square().mean().backward()
        opt.step()
    assert not torch.allclose(init.bias.detach(), torch.ones(4))
    # the pinned BN still normalises with weight 1 and bias 1 exactly
    fixed.eval()
    h = net[0](x)
    ref = (h - fixed.running_mean[None, :, None, None]) / torch.sqrt(fixed.running_var[None, :, None, None] + fixed.eps) + 1.0
    torch.testing.assert_close(fixed(h), ref)


def test_fixed_bias_in_a_model_survives_training():
    torch.manual_seed(0)
    model = create_model("tiny_mul", fusion="mul,r=bn@b=fixed:1,s=bn@b=init:1")
    opt = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=5e-4, momentum=0.9)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    block = model.layer1[0]
    assert block.fusion.r.norm.bias is None and block.fusion.r.norm.bias_mode.value == 1.0
    assert not torch.allclose(block.fusion.s.norm.bias.detach(), torch.ones_like(block.fusion.s.norm.bias))


def test_fusion_math_matches_formula():
    """Fusion(r, s) equals the formula computed by hand (eval-mode BN with known stats)."""
    spec = parse_fusion("mul,r=bn@b=fixed:0/sig/+0.5,s=bn@b=init:1")
    fusion = models.Fusion(spec, 3).double().eval()
    with torch.no_grad():
        for bn in (fusion.r.norm, fusion.s.norm):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    r, s = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)

    def bn(t, m, w, b):
        return (t - m.running_mean.view(1, -1, 1, 1)) / torch.sqrt(m.running_var.view(1, -1, 1, 1) + m.eps) * w + b

    expected = (torch.sigmoid(bn(r, fusion.r.norm, 1.0, 0.0)) + 0.5) * bn(s, fusion.s.norm, 1.0, 1.0)
    torch.testing.assert_close(fusion(r, s), expected, rtol=1e-12, atol=1e-12)


def test_named_shortcuts_add_and_mul():
    assert models.resolve_fusion("add").name == "add,r=bn,s=id"
    assert models.resolve_fusion("mul").name == "mul,r=bn@b=init:1,s=bn@b=init:1"
    assert models.resolve_fusion("fmm08") == SEED_FUSIONS[7].spec
    with pytest.raises(FusionSpecError, match="fmm08"):
        models.resolve_fusion("fmm088")


@pytest.mark.parametrize("row", SEED_FUSIONS, ids=lambda r: r.id)
def test_every_seed_row_builds_wrn_and_cifar_resnet(row):
    for name, kw in (("wrn", {"depth": 10, "widen": 1}), ("cifar_resnet", {"depth": 8, "width": 4})):
        model = create_model(name, fusion=row.id, in_chans=3, num_classes=5, **kw)
        assert model.layer1[0].fusion.spec == row.spec
        _smoke(model, 3, num_classes=5)


# --- families ---------------------------------------------------------------------------------


def test_wrn16_10_has_seed_parameter_count():
    with torch.device("meta"):
        model = create_model("wrn16_10", num_classes=101)
    n = count_parameters(model)
    assert abs(n - 17.2e6) / 17.2e6 < 0.01, n  # the seed reports ~17.2M with 101 classes


def test_wrn_is_faithful_to_seed():
    model = create_model("wrn16_10", widen=1)
    block = model.layer2[0]
    assert block.conv2.conv.stride == (2, 2) and block.conv1.stride == (1, 1)  # stride on conv2
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(block.shortcut, nn.Conv2d) and block.shortcut.kernel_size == (1, 1)
    assert model.bn1.momentum == 0.9
    assert block.dropout.p == 0.3
    # no ReLU after the fusion: the block output can be negative
    model.eval()
    with torch.no_grad():
        out = model.layer1(model.conv1(torch.randn(2, 3, 8, 8)))
    assert (out < 0).any()


def test_resnet20_mul_is_mean1_multiplication():
    model = create_model("resnet20_mul")
    fusion = model.layer1[0].fusion
    assert fusion.spec.op == "mul"
    assert torch.equal(fusion.r.norm.bias.detach(), torch.ones(16))
    assert torch.equal(fusion.s.norm.bias.detach(), torch.ones(16))
    add = create_model("resnet20_add")
    assert add.layer1[0].fusion.spec.name == "add,r=bn,s=id"
    assert abs(count_parameters(add) - 0.27e6) / 0.27e6 < 0.02  # ResNet-20 ~0.27M


def test_the_comparison_pair_is_the_seeds_wrn_block_differing_only_in_the_fusion():
    """add_resnet / mul_resnet: WRN-10-2 with the seed's pre-activation block, fmm01 bn(r) + s
    against fmm18 bn(r) * bn(s); the same architecture otherwise (the mul one has the shortcut BN
    of each block on top), no ReLU after the fusion."""
    from models import resolve_fusion
    from models.families import WideResNet

    add, mul = create_model("add_resnet"), create_model("mul_resnet")
    assert isinstance(add, WideResNet) and isinstance(mul, WideResNet)
    blocks = [m for m in add.modules() if hasattr(m, "fusion")]
    assert len(blocks) == 3                                   # depth 10: 3 stages x 1 block
    assert all(b.fusion.spec == resolve_fusion("fmm01") for b in blocks)
    assert all(m.fusion.spec == resolve_fusion("fmm18") for m in mul.modules() if hasattr(m, "fusion"))
    assert add.linear.in_features == mul.linear.in_features == 128   # 64 x widen 2
    extra = count_parameters(mul) - count_parameters(add)
    shortcut_bn = sum(2 * b.fusion.s.norm.num_features for b in mul.modules() if hasattr(b, "fusion"))
    assert extra == shortcut_bn                               # only the shortcut BNs differ
    mul.eval()
    with torch.no_grad():
        out = mul.layer1(mul.conv1(torch.randn(4, 3, 8, 8)))
    assert (out < 0).any()                                    # no ReLU after the fusion


def test_resnet4_small_inputs_and_bottleneck_channels():
    for stem in ("cifar", "imagenet"):
        model = create_model("resnet50", width=4, attention="triplet_ca", stem=stem, in_chans=1)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    block = create_model("resnet50", width=4, attention="se").layer2[0]
    assert block.fusion.r.norm.num_features == 4 * 8  # planes * expansion


def test_bad_family_arguments():
    with pytest.raises(ModelConfigError, match="6n\\+4"):
        create_model("wrn", depth=15)
    with pytest.raises(ModelConfigError, match="18, 34 or 50"):
        create_model("resnet4", depth=101)


# --- gates ------------------------------------------------------------------------------------


def test_gates_are_found_where_they_exist():
    assert find_gates(create_model("add_resnet")) == [] and find_gates(create_model("resnet20_add")) == []
    gates = find_gates(create_model("cifar_resnet", depth=8, width=4, fusion="fmm39"))  # sig on both
    assert len(gates) == 3 * 2 and {g.role for g in gates} == {"fusion.r", "fusion.s"}
    gates = find_gates(create_model("wrn", depth=10, widen=1, fusion="fmm57"))  # resgate: conv_in + adapter
    assert {g.role for g in gates} == {"resgate.adapter", "resgate.conv_in"} and len(gates) == 6
    gates = find_gates(create_model("tiny_triplet"))
    assert len(gates) == 3 * 3 and all(g.kind == "sigmoid" for g in gates)
    gates = find_gates(create_model("tiny_bottleneck"))
    assert {g.kind for g in gates} == {"sigmoid", "hard_sigmoid"}
    gates = find_gates(create_model("cifar_resnet", depth=8, width=8, attention="triplet",
                                     attention_kwargs={"gate": "tanh"}))
    assert gates and all(g.kind == "tanh" for g in gates)


def test_gate_hook_sees_logits():
    model = create_model("cifar_resnet", depth=8, width=4, fusion="fmm25", in_chans=1).eval()  # sig(s)*sig(r)
    seen = {}

    def hook(path):
        def record(module, inputs, output):
            seen[path] = (inputs[0], output)  # returns None: the output is left as it is
        return record

    for info in find_gates(model):
        model.get_submodule(info.path).register_forward_hook(hook(info.path))
    model(torch.randn(2, 1, 8, 8))
    assert len(seen) == len(find_gates(model))
    for z, out in seen.values():
        torch.testing.assert_close(out, torch.sigmoid(z))
