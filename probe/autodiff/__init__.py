"""Per-layer closed forms of per-sample parameter gradients (Linear, Conv2d, BatchNorm).

:mod:`probe.autodiff.layers` finds the structured layers of a model and turns a layer's input and
back-propagated output gradient into each sample's Jacobian rows (or the two factors of their
Gram identity); :mod:`probe.autodiff.recording` records the forward pass, runs one backward pass
per output and checks the closed forms against autograd. Used by the NTK (``layerwise`` kernels,
the ``gram`` Lanczos operator) and meant for any probe that needs per-sample gradients.
"""
from probe.autodiff.layers import (LayerCall, StructuredLayer, conv_patches, find_structured_layers,
                                   gram_factors, per_sample_grad_parts, per_sample_grad_rows,
                                   record_layer_calls, set_layer_shapes)
from probe.autodiff.recording import (ForwardRecord, check_closed_forms, check_cost_bytes, input_leaf,
                                      output_gradients, record_forward, stream_backward)

__all__ = ["StructuredLayer", "LayerCall", "find_structured_layers", "record_layer_calls",
           "set_layer_shapes", "conv_patches", "per_sample_grad_parts", "per_sample_grad_rows",
           "gram_factors", "ForwardRecord", "record_forward", "output_gradients", "stream_backward",
           "input_leaf", "check_closed_forms", "check_cost_bytes"]
