"""Shared test fixtures."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

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


@pytest.fixture
def mount(request):
    """``mount(*args)`` as root (the last argument is the mount point); unmounted afterwards.
    Skips the test where mounting is not possible."""
    mounted: list[str] = []

    def do(*args) -> None:
        if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("needs root and mount(8)")
        r = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"mount {' '.join(map(str, args))} failed: {r.stderr.strip()}")
        mounted.append(str(args[-1]))

    yield do
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _fill_disk(folder: Path, inodes: bool = False) -> list[Path]:
    """Fill the file system of ``folder`` to the last byte, or use up its inodes with empty files."""
    made: list[Path] = []
    if inodes:
        with pytest.raises(OSError) as err:
            while True:
                (folder / f"inode{len(made)}").touch()
                made.append(folder / f"inode{len(made)}")
        assert err.value.errno == errno.ENOSPC
        return made
    made.append(folder / "filler")
    fd = os.open(made[0], os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 4096, 1):
            with pytest.raises(OSError) as err:
                while True:
                    os.write(fd, b"\0" * chunk)
            assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return made


@pytest.fixture
def fill_disk():
    """``fill_disk(folder, inodes=False)``: fill the file system of ``folder`` (bytes or inodes);
    returns the files made, to unlink when space should come back."""
    return _fill_disk
