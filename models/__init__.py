"""Model zoo: fusion specs, gates, attention modules and the WRN / ResNet families.

    >>> from models import create_model, list_models
    >>> model = create_model("mul_resnet", num_classes=10, in_chans=1)
"""
from .gates import Gate, GateInfo, HSwish, find_gates
from .fusion import (BranchSpec, Fusion, FusionSpec, FusionSpecError, GateSpec, ParamMode,
                           PinnedBatchNorm2d, parse_fusion)
from ._registry import (ModelConfigError, ModelNameError, accepted_kwargs, create_model, is_factory_name, list_models,
                              model_entry, register_model)
from .seed_table import SEED_FUSIONS, SeedFusion, resolve_fusion, seed_fusion
from .families import CifarResNet, ResNet4, TinyMLP, WideResNet
from . import zoo as _zoo  # noqa: F401  (registers the names)


def count_parameters(model, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "Gate", "GateInfo", "HSwish", "find_gates",
    "BranchSpec", "Fusion", "FusionSpec", "FusionSpecError", "GateSpec", "ParamMode", "PinnedBatchNorm2d",
    "parse_fusion", "resolve_fusion",
    "ModelConfigError", "ModelNameError", "accepted_kwargs", "create_model", "is_factory_name", "list_models", "model_entry",
    "register_model", "count_parameters",
    "SEED_FUSIONS", "SeedFusion", "seed_fusion",
    "CifarResNet", "ResNet4", "TinyMLP", "WideResNet",
]
