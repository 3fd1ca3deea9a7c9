"""Shared test fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny float64 problems on one thread: on a shared 2-core machine, thread
    wake-ups cost more than the arithmetic. threadpoolctl (numpy's BLAS) comes with scikit-learn."""
    try:
        import threadpoolctl
        limiter = threadpoolctl.threadpool_limits(1)
    except ImportError:  # pragma: no cover
        limiter = None
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    if limiter is not None:
        limiter.restore_original_limits()
