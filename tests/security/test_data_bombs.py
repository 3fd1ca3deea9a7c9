"""Hostile and corrupt data files: probe.data must refuse them with a DataError, in bounded memory and time.

The heavy cases (a gzip bomb that decompresses to ~4 GB, headers that declare gigabytes, pickles whose
shared references describe 2**40 elements, pickles that crash numpy) run in one subprocess whose
address space is capped at what ``import torch`` needs plus 1.5 GiB: a loader that decompressed the
bomb, preallocated from a header or walked the shared references would die there with MemoryError
(or never finish) instead of giving its one-line DataError.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probe.data.cifar_pickle
import probe.data
from probe.data import load_data
from probe.errors import DataError

REPO = Path(__file__).resolve().parents[2]
HEADROOM = 3 * 2**29  # 1.5 GiB of address space on top of what the imports take
CASE_SECONDS = 10.0  # each case needs well under a second; generous for a shared 2-core machine


def idx_header(*dims: int) -> bytes:
    return (0x0800 + len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def write_mnist(folder: Path, train_images: bytes | None = None, gz_name: bool = True) -> None:
    """Four small valid idx files; ``train_images`` (already encoded) replaces the train images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        images = idx_header(n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()
        labels = idx_header(n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
        if prefix == "train" and train_images is not None:
            name = "train-images-idx3-ubyte" + (".gz" if gz_name else "")
            (folder / name).write_bytes(train_images)
        else:
            (folder / f"{prefix}-images-idx3-ubyte").write_bytes(images)


def cifar_batch(n: int, labels=None) -> dict:
    data = np.random.default_rng(n).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {b"data": data, b"labels": [i % 10 for i in range(n)] if labels is None else labels}


def write_cifar10_python(folder: Path, replace: dict[str, bytes] | None = None) -> None:
    """A valid tiny cifar-10-batches-py; ``replace`` maps file names to raw pickle bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(cifar_batch(2), protocol=2))
    meta = {b"label_names": [f"k{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    for name, blob in (replace or {}).items():
        (folder / name).write_bytes(blob)


def shared_levels(levels: int, width: int = 2, leaf=b"x"):
    """L0 = [leaf] * width, L(k+1) = [Lk] * width: a few bytes per level, width**levels elements."""
    node = [leaf] * width
    for _ in range(levels):
        node = [node] * width
    return node


def object_array_short_list() -> bytes:
    """An object array pickled with shape (200,) but a 3-item list: numpy's __setstate__ reads past the list."""
    blob = pickle.dumps(np.array([1, "a", 3], dtype=object), protocol=2)
    i = blob.index(b"(K\x01K\x03\x85")  # the state's shape tuple (1, 3) -> (1, 200)
    return blob[:i] + b"(K\x01K\xc8\x85" + blob[i + 6:]


# --------------------------------------------------------------------------------------------------
# The guarded subprocess

GUARD = r"""
import json, resource, sys, time
import torch  # noqa: F401  (the address space any real run starts with)
import probe.data.cifar_pickle
import probe.data
from probe.errors import DataError

def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

limit = vm_size() + int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for case in json.loads(sys.argv[1]):
    t = time.perf_counter()
    try:
        probe.data.load_data(case["name"], root=case["root"])
        kind, msg = "loaded", ""
    except BaseException as e:
        kind, msg = type(e).__name__, str(e)
    print(json.dumps({"id": case["id"], "kind": kind, "msg": msg, "s": time.perf_counter() - t}), flush=True)
"""

# (id, data set, what the DataError must say); files are built by _build below.
CASES = [
    ("gzip_bomb", "mnist", r"train-images-idx3-ubyte\.gz: longer than its header says: expected 7856 "),
    ("huge_header_gz", "mnist", r"train-images-idx3-ubyte\.gz: header declares 2147483648 x 28 x 28 .*MAX_IDX_BYTES"),
    ("big_header_gz", "mnist", r"train-images-idx3-ubyte\.gz: truncated: expected 2116800016 "),
    ("big_header_raw", "mnist", r"train-images-idx3-ubyte: truncated: expected 2116800016 .*found 1040"),
    ("laughs_meta", "cifar10", r"batches\.meta: nested too deeply"),
    ("laughs_labels", "cifar10", r"data_batch_1: nested too deeply"),
    ("shared_labels", "cifar10", r"data_batch_3: too many shared references"),
    ("memo_index", "cifar10", r"data_batch_2: expected a dict"),
    ("object_array", "cifar10", r"data_batch_4: not a CIFAR python batch \(refused object dtype"),
]


def _build(root: Path) -> list[dict]:
    # A gzip bomb: the first member is a valid idx3 file of 10 images, then the same 64 MiB of zeros
    # compressed once (~65 KB) and repeated 60 times: a 4 MB file that decompresses to ~4 GB.
    zeros = gzip.compress(bytes(64 * 2**20), compresslevel=9)
    bomb = gzip.compress(idx_header(10, 28, 28) + bytes(10 * 784)) + zeros * 60
    assert len(bomb) < 5 * 2**20
    write_mnist(root / "gzip_bomb", bomb)
    # Headers that declare more than the file holds: 1.7 TB (above MAX_IDX_BYTES) and 2.1 GB (below it,
    # and above the headroom: reading must not preallocate from it).
    write_mnist(root / "huge_header_gz", gzip.compress(idx_header(2**31, 28, 28) + bytes(1024)))
    write_mnist(root / "big_header_gz", gzip.compress(idx_header(2_700_000, 28, 28) + bytes(1024)))
    write_mnist(root / "big_header_raw", idx_header(2_700_000, 28, 28) + bytes(1024), gz_name=False)
    # A few hundred bytes of shared references that describe 2**33 (meta) / 2**41 (labels) elements, and
    # a flat one (depth 3) that describes 10**9.
    laughs_meta = pickle.dumps({b"label_names": shared_levels(32), b"num_vis": 3072}, protocol=2)
    assert len(laughs_meta) < 400
    write_cifar10_python(root / "laughs_meta", {"batches.meta": laughs_meta})
    write_cifar10_python(root / "laughs_labels", {
        "data_batch_1": pickle.dumps(cifar_batch(2, labels=shared_levels(40, leaf=1)), protocol=2)})
    write_cifar10_python(root / "shared_labels", {
        "data_batch_3": pickle.dumps(cifar_batch(2, labels=shared_levels(2, width=1000, leaf=1)), protocol=2)})
    # LONG_BINPUT 2**30: the C unpickler grows its memo array to 2**31 entries (16 GB) for a 7-byte file.
    write_cifar10_python(root / "memo_index", {"data_batch_2": b"\x80\x02]r" + (2**30).to_bytes(4, "little") + b"."})
    # Crashes numpy's ndarray.__setstate__ (segmentation fault) unless refused first: keep it last.
    write_cifar10_python(root / "object_array", {"data_batch_4": object_array_short_list()})
    return [{"id": cid, "name": name, "root": str(root / cid)} for cid, name, _ in CASES]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> dict[str, dict]:
    """Run every case in one subprocess under RLIMIT_AS; one JSON line per case."""
    cases = _build(tmp_path_factory.mktemp("bombs"))
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", GUARD, json.dumps(cases), str(HEADROOM)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += "\n(killed after 120 s)"
    results = {r["id"]: r for r in map(json.loads, out.splitlines())}
    results["_stderr"] = {"msg": err[-2000:], "rc": proc.returncode}
    return results


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status")
@pytest.mark.parametrize("case_id, name, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_file_refused_in_bounded_memory(guarded, case_id, name, message):
    r = guarded.get(case_id)
    assert r is not None, f"{case_id} did not finish; subprocess: {guarded['_stderr']}"
    assert r["kind"] == "DataError", r
    assert re.search(message, r["msg"]), r["msg"]
    assert "\n" not in r["msg"] and len(r["msg"]) < 1000
    assert r["s"] < CASE_SECONDS, r


# --------------------------------------------------------------------------------------------------
# In-process: small pickles the allow-list unpickler refuses (none of these allocate much here)


REFUSED_PICKLES = {  # id: (pickle, what the DataError must say)
    "ndarray_call": (b"\x80\x02cnumpy\nndarray\nJ\x00\xe1\xf5\x05\x85R.", "direct numpy.ndarray"),  # ndarray(10**8)
    "punycode": (b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x08\x00\x00\x00punycode\x86R.", "punycode"),
    "bytes_n": (b"\x80\x02c__builtin__\nbytes\nJ\x00\xe1\xf5\x05\x85R.", r"bytes\(\.\.\.\) with arguments"),
    "colliding_int_keys": (pickle.dumps({i * (2**61 - 1): 0 for i in range(4)}, protocol=2), "dict key of type int"),
    "set": (pickle.dumps({b"data": {1, 2}}, protocol=4), "refused a set"),
    "text_put_index": (b"(lp99999999999999999\n.", "memo index 99999999999999999"),
    "bytearray8_length": (b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".", "BYTEARRAY8 declares 1099511627776 bytes"),
}


@pytest.mark.parametrize("blob, message", REFUSED_PICKLES.values(), ids=REFUSED_PICKLES.keys())
def test_pickle_refusals(tmp_path, blob, message):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder, {"data_batch_5": blob})
    with pytest.raises(DataError, match=f"data_batch_5.*{message}"):
        load_data("cifar10", root=tmp_path)


def test_pickle_opcode_cap(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder, {"test_batch": b"(" + b"]" * 5000 + b"l."})
    monkeypatch.setattr(probe.data.cifar_pickle, "MAX_PICKLE_OPS", 1000)
    with pytest.raises(DataError, match="test_batch.*more than 1000 pickle opcodes.*MAX_PICKLE_OPS"):
        load_data("cifar10", root=tmp_path)


def test_cifar_labels_must_be_flat_integers(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    for labels in ([[0], [1]], [2**70, 1], [0.0, 1.0], "ab", [True, False]):
        write_cifar10_python(folder, {"data_batch_1": pickle.dumps(cifar_batch(2, labels=labels), protocol=2)})
        with pytest.raises(DataError, match="data_batch_1: expected b'labels' with one integer label per image"):
            load_data("cifar10", root=tmp_path)
    # an int64 array and numpy integer scalars are fine
    for labels in (np.array([3, 4]), [np.int64(3), np.int64(4)]):
        write_cifar10_python(folder, {"data_batch_1": pickle.dumps(cifar_batch(2, labels=labels), protocol=2)})
        assert load_data("cifar10", root=tmp_path).y_train[:2].tolist() == [3, 4]


def test_meta_names_other_than_bytes_fall_back(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    meta = {b"label_names": [[b"x"]] * 10}  # nested lists were str()ed into names
    write_cifar10_python(folder, {"batches.meta": pickle.dumps(meta, protocol=2)})
    assert load_data("cifar10", root=tmp_path).class_names == probe.data.CIFAR10_CLASSES


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the distributed files: protocol 2, every str a SHORT_BINSTRING /
    BINSTRING (bytes once read with encoding="bytes"), ints 0/1 for dtype's align/copy."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    n, m = data.shape
    raw = data.tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85q\x04" + s(b"b")
        + b"q\x05\x87q\x06Rq\x07(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", m) + b"\x86q\x08"
        + b"cnumpy\ndtype\nq\x09" + s(b"u1") + b"q\x0aK\x00K\x01\x87q\x0bRq\x0c"
        + b"(K\x03" + s(b"|") + b"q\x0dNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x0eb"
        + b"\x89T" + struct.pack("<I", len(raw)) + raw + b"q\x0ftq\x10b"
    )
    labels_list = b"]q\x12(" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}q\x00(" + s(b"data") + b"q\x01" + array + s(b"labels") + b"q\x11" + labels_list + b"u."


def test_python2_batch_loads(tmp_path):
    data = np.arange(3 * 3072, dtype=np.int64).astype(np.uint8).reshape(3, 3072)
    blob = python2_batch(data, [3, 4, 5])
    assert pickle.loads(blob, encoding="bytes")[b"labels"] == [3, 4, 5]  # a valid pickle
    write_cifar10_python(tmp_path / "cifar-10-batches-py", {"test_batch": blob})
    d = load_data("cifar10", root=tmp_path)
    assert d.y_test.tolist() == [3, 4, 5]
    pixels = d.x_test * torch.tensor(d.std).view(1, -1, 1, 1) + torch.tensor(d.mean).view(1, -1, 1, 1)
    assert torch.equal((pixels * 255).round().to(torch.uint8).reshape(3, 3072), torch.from_numpy(data))


def test_real_layout_still_loads_at_every_protocol(tmp_path):
    """Python 2's files (protocol 2, numpy.core names) and Python 3 re-pickles at protocols 2 and 5."""
    folder = tmp_path / "cifar-10-batches-py"
    for protocol in (2, 5):
        write_cifar10_python(folder)
        batch = cifar_batch(4)
        blob = pickle.dumps(batch, protocol=protocol)
        if protocol == 2:  # GLOBAL names are newline-terminated text: renaming keeps the pickle valid
            blob = blob.replace(b"numpy._core.", b"numpy.core.")
            assert b"numpy.core.multiarray\n_reconstruct" in blob
        (folder / "test_batch").write_bytes(blob)
        d = load_data("cifar10", root=tmp_path)
        assert d.x_test.shape == (4, 3, 32, 32) and d.y_test.tolist() == batch[b"labels"]
        assert d.class_names == tuple(f"k{i}" for i in range(10))


# --------------------------------------------------------------------------------------------------
# In-process: corrupt gzip streams


@pytest.mark.parametrize("kind", ["cut", "bad_deflate", "not_gzip"])
def test_corrupt_gzip_is_a_data_error(tmp_path, kind):
    blob = gzip.compress(idx_header(5, 28, 28) + bytes(5 * 784))
    if kind == "cut":
        blob = blob[: len(blob) // 2]
    elif kind == "bad_deflate":
        blob = blob[:10] + b"\xff" * 8 + blob[18:]
    else:
        blob = b"not a gzip file at all"
    write_mnist(tmp_path, blob)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_data("mnist", root=tmp_path)
