"""Where the stochastic estimators draw their vectors: on the CPU the float64 stream of a CPU
generator, cast afterwards (results as they always were); on a CUDA device the device's own
generator, in the operator's dtype (the `gpu` tests)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probe.linalg import DenseOperator, block_lanczos, hutchinson_trace, hutchpp_trace, slq_density
from probe.linalg.sampling import draw_vectors, random_vectors, vector_generator


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_draws_are_the_float64_cpu_stream_cast(dist, dtype):
    gen = vector_generator(7, "cpu")
    assert gen.device.type == "cpu"
    got = draw_vectors((50, 3), gen, dist, dtype=dtype, device=torch.device("cpu"), scale=math.sqrt(50))
    ref_gen = torch.Generator().manual_seed(7)
    if dist == "rademacher":
        ref = torch.randint(0, 2, (50, 3), generator=ref_gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    else:
        ref = torch.randn((50, 3), generator=ref_gen, dtype=torch.float64)
    assert torch.equal(got, (ref / math.sqrt(50)).to(dtype))
    assert torch.equal(random_vectors(50, 3, vector_generator(7), dist), ref)


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="unknown probe distribution"):
        draw_vectors((4, 1), vector_generator(0), "uniform", dtype=torch.float64, device=torch.device("cpu"))


def test_hutchinson_on_the_cpu_is_the_per_vector_reference():
    # the per-vector values, kept on the device until the end, are z_i^T A z_i of the CPU stream
    A = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = A + A.T
    est = hutchinson_trace(DenseOperator(A), 7, block=3, seed=5)
    gen = torch.Generator().manual_seed(5)
    Z = torch.cat([random_vectors(40, c, gen, "rademacher") for c in (3, 3, 1)], dim=1)
    np.testing.assert_allclose(est.samples, ((A @ Z) * Z).sum(0).numpy(), rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_estimators_draw_on_the_device(dtype):
    dev = torch.device("cuda")
    gen = vector_generator(3, dev)
    assert gen.device.type == "cuda"
    Z = draw_vectors((1000, 4), gen, "rademacher", dtype=dtype, device=dev)
    assert Z.device.type == "cuda" and Z.dtype == dtype and bool((Z.abs() == 1).all())
    G = draw_vectors((1000, 4), gen, "gaussian", dtype=dtype, device=dev)
    assert G.dtype == dtype and abs(float(G.double().std()) - 1) < 0.1
    # same seed, same draws: a device generator is reproducible
    assert torch.equal(draw_vectors((1000, 4), vector_generator(3, dev), "rademacher", dtype=dtype, device=dev), Z)
    n = 200
    X = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A = X @ X.T / n
    op = DenseOperator(A, dtype=dtype, device=dev)
    exact = float(torch.trace(A))
    for est in (hutchinson_trace(op, 60, seed=2), hutchpp_trace(op, 60, seed=2)):
        assert abs(est.estimate - exact) <= 5 * est.stderr + 1e-4 * exact
    ev = torch.linalg.eigvalsh(A).numpy()[::-1]
    top = block_lanczos(op, 3, block_size=2, seed=4)
    np.testing.assert_allclose(top.eigenvalues, ev[:3], rtol=1e-4 if dtype == torch.float32 else 1e-8)
    dens = slq_density(op, 4, 30, seed=1)
    assert abs(dens.trace - exact) <= 5 * dens.trace_stderr + 1e-3 * exact
