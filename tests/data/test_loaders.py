"""Tests for probe.data: every loader on tiny files with the real on-disk layout, and the batch loader."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from probe.data import DATASETS, Augment, DataSplits, data_roots, find_data, load_data, make_loader
from probe.errors import DataError, UserError

# Un-normalising float32 images and scaling by 255 carries a few ulps of error; a tolerance of
# 1e-3 (in 0..255 units) is far above that and far below one intensity level.
PIXEL_ATOL = 1e-3


def unnormalise(d: DataSplits, x: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    m = torch.tensor(d.mean).view(1, -1, 1, 1)
    s = torch.tensor(d.std).view(1, -1, 1, 1)
    return (x * s + m) * scale


# --------------------------------------------------------------------------------------------------
# digits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data("digits")


def test_digits_shapes_and_split(digits):
    from sklearn.datasets import load_digits

    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.class_names == tuple("0123456789")
    assert digits.in_channels == 1 and digits.image_size == (8, 8)
    # stratified: each class contributes 25 % of its images to the test split, up to rounding
    total = np.bincount(load_digits().target, minlength=10)
    test = torch.bincount(digits.y_test, minlength=10).numpy()
    assert np.all(np.abs(test - 0.25 * total) <= 1)
    assert np.array_equal(test + torch.bincount(digits.y_train, minlength=10).numpy(), total)
    # normalised with the train split's statistics (float32 sums over 86k values: 1e-4)
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert abs(float(digits.x_train.std(unbiased=False)) - 1) < 1e-4
    # raw values are the integers 0..16
    raw = unnormalise(digits, digits.x_train, 16.0)
    torch.testing.assert_close(raw, raw.round(), atol=1e-4, rtol=0)
    info = digits.describe()
    assert info["n_train"] == 1347 and info["image_size"] == [8, 8] and info["num_classes"] == 10


def test_digits_split_fixed_across_loads_and_seeds(digits):
    other = load_data("digits", seed=123)
    for a, b in ((digits.x_train, other.x_train), (digits.y_train, other.y_train),
                 (digits.x_test, other.x_test), (digits.y_test, other.y_test)):
        assert torch.equal(a, b)
    assert digits.mean == other.mean and digits.std == other.std


def test_limits_take_balanced_first_subset(digits):
    small = load_data("digits", limit_train=25, limit_test=10)
    assert small.x_train.shape[0] == 25 and small.x_test.shape[0] == 10
    counts = torch.bincount(small.y_train, minlength=10)
    assert int(counts.max()) - int(counts.min()) <= 1
    assert torch.equal(torch.bincount(small.y_test, minlength=10), torch.ones(10, dtype=torch.int64))
    # reference: round-robin over classes of each class's first samples, kept in the original order
    seen: dict[int, int] = {}
    rank = []
    for label in digits.y_train.tolist():
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    expected = sorted(sorted(range(len(rank)), key=lambda i: (rank[i], i))[:25])
    assert torch.equal(small.x_train, digits.x_train[expected])
    assert torch.equal(small.y_train, digits.y_train[expected])
    again = load_data("digits", limit_train=25, limit_test=10, seed=9)
    assert torch.equal(again.x_train, small.x_train)
    with pytest.raises(UserError):
        load_data("digits", limit_train=0)


# --------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_per_seed():
    a = load_data("synthetic", seed=1)
    b = load_data("synthetic", seed=1)
    c = load_data("synthetic", seed=2)
    assert a.x_train.shape == (512, 3, 8, 8) and a.x_test.shape == (128, 3, 8, 8) and a.num_classes == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)
    assert not torch.equal(a.y_train, c.y_train)


def test_synthetic_options_and_learnable():
    d = load_data("synthetic", channels=1, size=12, num_classes=4, n_train=200, n_test=100, seed=0)
    assert d.x_train.shape == (200, 1, 12, 12) and d.num_classes == 4
    assert torch.equal(torch.bincount(d.y_train), torch.full((4,), 50))
    # nearest class mean on the train split classifies the test split well
    means = torch.stack([d.x_train[d.y_train == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(d.x_test.flatten(1), means).argmin(1)
    assert (pred == d.y_test).float().mean() > 0.9
    with pytest.raises(UserError, match="noise"):
        load_data("synthetic", bogus=1)


# --------------------------------------------------------------------------------------------------
# CIFAR


def _cifar_arrays(rng, n, fine=False):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(20 if fine else 0, 100 if fine else 10, size=n)
    return data, labels


def write_cifar10_binary(folder, rng, per_batch=2, n_test=3):
    folder.mkdir(parents=True)
    raw = {}
    for name, n in [(f"data_batch_{i}.bin", per_batch) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        data, labels = _cifar_arrays(rng, n)
        records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        (folder / name).write_bytes(records.tobytes())
        raw[name] = (data, labels)
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
    return raw


def write_cifar100_binary(folder, rng, n_train=5, n_test=3):
    folder.mkdir(parents=True)
    raw = {}
    for name, n in (("train.bin", n_train), ("test.bin", n_test)):
        data, fine = _cifar_arrays(rng, n, fine=True)
        coarse = fine // 5
        records = np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], data], axis=1)
        (folder / name).write_bytes(records.tobytes())
        raw[name] = (data, fine)
    return raw


def _pickle_like_real(obj, path):
    """Protocol 2 with the numpy module named as in the distributed files (numpy.core)."""
    blob = pickle.dumps(obj, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(blob)


def write_cifar10_python(folder, rng, per_batch=2, n_test=3):
    folder.mkdir(parents=True)
    raw = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data, labels = _cifar_arrays(rng, n)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        _pickle_like_real(batch, folder / name)
        raw[name] = (data, labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [f"k{i}".encode() for i in range(10)],
            b"num_vis": 3072}
    _pickle_like_real(meta, folder / "batches.meta")
    return raw


def write_cifar100_python(folder, rng, n_train=5, n_test=3):
    folder.mkdir(parents=True)
    raw = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data, fine = _cifar_arrays(rng, n, fine=True)
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(),
                 b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) // 5 for v in fine],
                 b"data": data}
        _pickle_like_real(batch, folder / name)
        raw[name] = (data, fine)
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"g{i}".encode() for i in range(20)]}
    _pickle_like_real(meta, folder / "meta")
    return raw


def check_cifar(d, raw, train_files, test_file):
    x_tr = np.concatenate([raw[f][0] for f in train_files]).reshape(-1, 3, 32, 32)
    y_tr = np.concatenate([raw[f][1] for f in train_files])
    assert d.x_train.shape == (len(y_tr), 3, 32, 32) and d.in_channels == 3
    assert d.x_train.dtype == torch.float32
    torch.testing.assert_close(unnormalise(d, d.x_train), torch.from_numpy(x_tr).float(),
                               atol=PIXEL_ATOL, rtol=0)
    assert torch.equal(d.y_train, torch.from_numpy(y_tr).long())
    x_te, y_te = raw[test_file]
    torch.testing.assert_close(unnormalise(d, d.x_test), torch.from_numpy(x_te.reshape(-1, 3, 32, 32)).float(),
                               atol=PIXEL_ATOL, rtol=0)
    assert torch.equal(d.y_test, torch.from_numpy(y_te).long())


def test_cifar10_binary(tmp_path):
    raw = write_cifar10_binary(tmp_path / "cifar-10-batches-bin", np.random.default_rng(0))
    train = [f"data_batch_{i}.bin" for i in range(1, 6)]
    for root in (tmp_path, tmp_path / "cifar-10-batches-bin"):  # parent or the folder itself
        d = load_data("cifar10", root=root)
        check_cifar(d, raw, train, "test_batch.bin")
        assert d.num_classes == 10 and d.class_names == tuple(f"c{i}" for i in range(10))
        assert d.mean == (0.4914, 0.4822, 0.4465)


def test_cifar10_python(tmp_path):
    raw = write_cifar10_python(tmp_path / "cifar-10-batches-py", np.random.default_rng(1))
    assert b"numpy.core.multiarray" in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = load_data("cifar10", root=root)
        check_cifar(d, raw, [f"data_batch_{i}" for i in range(1, 6)], "test_batch")
        assert d.class_names == tuple(f"k{i}" for i in range(10))


def test_cifar10_python_protocol5(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    raw = write_cifar10_python(folder, np.random.default_rng(4))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = raw[name]
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels.tolist()}, protocol=5))
    check_cifar(load_data("cifar10", root=tmp_path), raw, [f"data_batch_{i}" for i in range(1, 6)], "test_batch")


def test_cifar100_binary_uses_fine_labels(tmp_path):
    raw = write_cifar100_binary(tmp_path / "cifar-100-binary", np.random.default_rng(2))
    d = load_data("cifar100", root=tmp_path)
    check_cifar(d, raw, ["train.bin"], "test.bin")
    assert d.num_classes == 100 and int(d.y_train.max()) >= 20  # fine labels, not coarse (< 20)


def test_cifar100_python(tmp_path):
    raw = write_cifar100_python(tmp_path / "cifar-100-python", np.random.default_rng(3))
    d = load_data("cifar100", root=tmp_path / "cifar-100-python")
    check_cifar(d, raw, ["train"], "test")
    assert d.class_names[:2] == ("f0", "f1") and len(d.class_names) == 100


def test_cifar_format_option_and_truncation(tmp_path):
    rng = np.random.default_rng(5)
    write_cifar10_binary(tmp_path / "cifar-10-batches-bin", rng)
    write_cifar10_python(tmp_path / "cifar-10-batches-py", rng)
    assert "python" in load_data("cifar10", root=tmp_path, format="python").source
    assert "binary" in load_data("cifar10", root=tmp_path).source
    path = tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="data_batch_3.bin.*3073"):
        load_data("cifar10", root=tmp_path, format="binary")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvilExec:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Evil, _EvilExec])
def test_cifar_malicious_pickle_refused(tmp_path, payload):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder, np.random.default_rng(6))
    target = tmp_path / "pwned"
    data = np.zeros((2, 3072), dtype=np.uint8)
    (folder / "data_batch_2").write_bytes(
        pickle.dumps({b"data": data, b"labels": [0, 1], b"x": payload(target)}, protocol=2)
    )
    with pytest.raises(DataError, match="refused"):
        load_data("cifar10", root=tmp_path)
    assert not target.exists()


def test_cifar_malformed_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_cifar100_python(folder, np.random.default_rng(7))
    blob = (folder / "train").read_bytes()
    (folder / "train").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="train"):
        load_data("cifar100", root=tmp_path)
    _pickle_like_real({b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]}, folder / "train")
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        load_data("cifar100", root=tmp_path)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_python_batch_with_no_rows(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_python(folder, np.random.default_rng(13))
    empty = {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}
    (folder / "data_batch_2").write_bytes(pickle.dumps(empty, protocol=protocol))
    with pytest.raises(DataError, match=r"data_batch_2: has 0 images \(b'data' is 0 x 3072\)"):
        load_data("cifar10", root=tmp_path)
    folder = tmp_path / "cifar-100-python"
    write_cifar100_python(folder, np.random.default_rng(14))
    (folder / "test").write_bytes(pickle.dumps({b"data": empty[b"data"], b"fine_labels": []}, protocol=protocol))
    with pytest.raises(DataError, match="test: has 0 images"):
        load_data("cifar100", root=folder)


def test_cifar_file_size_caps(tmp_path, monkeypatch):
    import probe.data.cifar

    rng = np.random.default_rng(15)
    write_cifar10_binary(tmp_path / "cifar-10-batches-bin", rng)
    write_cifar10_python(tmp_path / "cifar-10-batches-py", rng)
    with monkeypatch.context() as m:
        m.setattr(probe.data.cifar, "MAX_CIFAR_BATCH_BYTES", 2 * 3073)  # the 2-record train batches fit, 3 do not
        with pytest.raises(DataError, match=r"test_batch\.bin: 9219 bytes, above the 6146-byte limit for a "
                                            r"CIFAR batch \(MAX_CIFAR_BATCH_BYTES\); refused without reading"):
            load_data("cifar10", root=tmp_path, format="binary")
        size = (tmp_path / "cifar-10-batches-py" / "data_batch_1").stat().st_size
        with pytest.raises(DataError, match=f"data_batch_1: {size} bytes, above the 6146-byte limit"):
            load_data("cifar10", root=tmp_path, format="python")
    monkeypatch.setattr(probe.data.cifar, "MAX_CIFAR_META_BYTES", 10)
    for fmt, meta in (("binary", "batches.meta.txt"), ("python", "batches.meta")):
        with pytest.raises(DataError, match=f"{meta}: .* bytes, above the 10-byte limit .*MAX_CIFAR_META_BYTES"):
            load_data("cifar10", root=tmp_path, format=fmt)


# --------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


def _idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 + arr.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(folder, rng, gz=False, n_train=5, n_test=3):
    folder.mkdir(parents=True, exist_ok=True)
    raw = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            blob = _idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
        raw[prefix] = (images, labels)
    return raw


def check_idx(d, raw):
    for x, y, prefix in ((d.x_train, d.y_train, "train"), (d.x_test, d.y_test, "t10k")):
        images, labels = raw[prefix]
        assert x.shape == (len(labels), 1, 28, 28)
        torch.testing.assert_close(unnormalise(d, x), torch.from_numpy(images).float()[:, None],
                                   atol=PIXEL_ATOL, rtol=0)
        assert torch.equal(y, torch.from_numpy(labels).long())


@pytest.mark.parametrize("gz", [False, True])
def test_mnist(tmp_path, gz):
    raw = write_idx(tmp_path, np.random.default_rng(8), gz=gz)
    d = load_data("mnist", root=tmp_path)
    check_idx(d, raw)
    assert d.mean == (0.1307,) and d.num_classes == 10


def test_fashion_mnist_in_subfolder(tmp_path):
    raw = write_idx(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(9), gz=True)
    d = load_data("fashion_mnist", root=tmp_path)
    check_idx(d, raw)
    assert d.name == "fashion-mnist" and d.class_names[0] == "T-shirt/top"


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    write_idx(tmp_path, np.random.default_rng(10), gz=gz)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / name
    blob = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    blob = blob[:-100]
    path.write_bytes(gzip.compress(blob) if gz else blob)
    expected = 16 + 5 * 28 * 28
    with pytest.raises(DataError, match=f"{name}.*truncated.*expected {expected}"):
        load_data("mnist", root=tmp_path)


def test_idx_bad_magic_and_count_mismatch(tmp_path):
    rng = np.random.default_rng(11)
    write_idx(tmp_path, rng)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images, magic=0x0801))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*magic"):
        load_data("mnist", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images[:4]))
    with pytest.raises(DataError, match="4 images.*5 labels"):
        load_data("mnist", root=tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_with_no_images_or_labels(tmp_path, gz):
    write_idx(tmp_path, np.random.default_rng(16), gz=gz)
    suffix = ".gz" if gz else ""
    encode = gzip.compress if gz else (lambda b: b)
    (tmp_path / f"train-images-idx3-ubyte{suffix}").write_bytes(encode(_idx_bytes(np.zeros((0, 28, 28)))))
    with pytest.raises(DataError, match=f"train-images-idx3-ubyte{suffix}: has 0 images; its header says 0 x 28 x 28"):
        load_data("mnist", root=tmp_path)
    write_idx(tmp_path, np.random.default_rng(16), gz=gz)
    (tmp_path / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(encode(_idx_bytes(np.zeros((0,)))))
    with pytest.raises(DataError, match=f"t10k-labels-idx1-ubyte{suffix}: has 0 labels"):
        load_data("mnist", root=tmp_path)
    write_idx(tmp_path, np.random.default_rng(16), gz=gz)
    (tmp_path / f"t10k-images-idx3-ubyte{suffix}").write_bytes(encode(_idx_bytes(np.zeros((3, 28, 0)))))
    with pytest.raises(DataError, match=f"t10k-images-idx3-ubyte{suffix}: images of 28 x 0 pixels"):
        load_data("mnist", root=tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_longer_than_header(tmp_path, gz):
    write_idx(tmp_path, np.random.default_rng(17), gz=gz)
    name = "t10k-labels-idx1-ubyte" + (".gz" if gz else "")
    blob = _idx_bytes(np.zeros(3)) + b"\x00" * 7
    (tmp_path / name).write_bytes(gzip.compress(blob) if gz else blob)
    found = "at least 12" if gz else "18"
    with pytest.raises(DataError, match=f"{name}: longer than its header says: expected 11 .*found {found}$"):
        load_data("mnist", root=tmp_path)


def test_idx_declared_size_cap(tmp_path, monkeypatch):
    import probe.data.idx

    write_idx(tmp_path, np.random.default_rng(18), gz=True)
    monkeypatch.setattr(probe.data.idx, "MAX_IDX_BYTES", 5 * 28 * 28 - 1)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: header declares 5 x 28 x 28 = 3920 bytes "
                                        r"of images, above the 3919-byte limit .*\(MAX_IDX_BYTES\); refused"):
        load_data("mnist", root=tmp_path)
    monkeypatch.setattr(probe.data.idx, "MAX_IDX_BYTES", 5 * 28 * 28)
    assert load_data("mnist", root=tmp_path).x_train.shape == (5, 1, 28, 28)


def test_idx_splits_of_different_image_sizes(tmp_path):
    write_idx(tmp_path, np.random.default_rng(19))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((3, 14, 14))))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: images of 14 x 14 pixels but .* has 28 x 28"):
        load_data("mnist", root=tmp_path)
    assert load_data("mnist", root=tmp_path, image_size=16).x_test.shape == (3, 1, 16, 16)


# --------------------------------------------------------------------------------------------------
# Image folders and Caltech-101


def _color(i: int) -> tuple[int, int, int]:
    return (i % 256, 255 - i % 256, (7 * i) % 256)


def write_png(path, i, size=(13, 7), gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if gray:
        Image.new("L", size, i % 256).save(path)
    else:
        Image.new("RGB", size, _color(i)).save(path)


def decode_ids(d: DataSplits, x: torch.Tensor) -> list[int]:
    """Every test image is one solid colour whose red channel is its id."""
    px = unnormalise(d, x).round()
    assert torch.equal(px, px[:, :, :1, :1].expand_as(px)), "images should stay solid after resizing"
    return [int(v) for v in px[:, 0, 0, 0]]


def write_tree(folder, classes, per_class, start=0):
    """``folder/<class>/img_<k>.png``; returns ids in class-major, file-name order."""
    ids, i = [], start
    for c in classes:
        for k in range(per_class):
            write_png(folder / c / f"img_{k:02d}.png", i, size=(9 + k, 5 + 2 * k))
            ids.append(i)
            i += 1
    return ids


def test_imagefolder_presplit(tmp_path):
    train_ids = write_tree(tmp_path / "train", ["cat", "dog"], 3, start=0)
    test_ids = write_tree(tmp_path / "test", ["cat", "dog"], 2, start=100)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    d = load_data("imagefolder", root=tmp_path)
    assert d.class_names == ("cat", "dog") and d.x_train.shape == (6, 3, 32, 32)
    assert decode_ids(d, d.x_train) == train_ids and decode_ids(d, d.x_test) == test_ids
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1] and d.y_test.tolist() == [0, 0, 1, 1]
    assert d.mean == (0.485, 0.456, 0.406)
    g = load_data("imagefolder", root=tmp_path, channels=1, image_size=16)
    assert g.x_train.shape == (6, 1, 16, 16)


def test_imagefolder_autosplit(tmp_path):
    classes = ["a", "b", "c"]
    ids = write_tree(tmp_path, classes, 5)
    labels = np.repeat(np.arange(3), 5)
    d = load_data("imagefolder", root=tmp_path, image_size=8)
    tr, te = train_test_split(np.arange(15), test_size=0.2, stratify=labels, random_state=42)
    assert decode_ids(d, d.x_train) == [ids[i] for i in tr]
    assert decode_ids(d, d.x_test) == [ids[i] for i in te]
    assert torch.equal(torch.bincount(d.y_test), torch.ones(3, dtype=torch.int64))
    other = load_data("imagefolder", root=tmp_path, image_size=8, split_seed=0, test_fraction=0.4)
    assert other.x_test.shape[0] == 6


def test_caltech101_preset(tmp_path):
    cats = tmp_path / "101_ObjectCategories"
    classes = ["Faces", "accordion", "airplanes"]
    ids = write_tree(cats, classes, 5)
    write_tree(cats, ["BACKGROUND_Google"], 5, start=200)
    write_png(cats / "accordion" / "img_99.png", 250, gray=True)  # grey images become RGB
    ids.insert(10, 250)
    labels = np.array([0] * 5 + [1] * 6 + [2] * 5)
    tr, te = train_test_split(np.arange(16), test_size=0.2, stratify=labels, random_state=42)
    for root in (tmp_path, cats):
        d = load_data("caltech101", root=root)
        assert "BACKGROUND_Google" not in d.class_names and d.class_names == tuple(classes)
        assert d.x_train.shape == (12, 3, 64, 64) and d.x_test.shape == (4, 3, 64, 64)
        assert decode_ids(d, d.x_train) == [ids[i] for i in tr]
        assert decode_ids(d, d.x_test) == [ids[i] for i in te]
        assert d.y_train.tolist() == labels[tr].tolist() and d.y_test.tolist() == labels[te].tolist()
        assert d.mean == (0.485, 0.456, 0.406) and d.std == (0.229, 0.224, 0.225)
    x_all = torch.cat([d.x_train, d.x_test])
    grey = x_all[torch.tensor([ids[i] for i in np.concatenate([tr, te])]) == 250]
    assert torch.equal(unnormalise(d, grey).round(), torch.full((1, 3, 64, 64), 250.0))


def test_imagefolder_empty_test_split(tmp_path):
    write_tree(tmp_path / "train", ["cat", "dog"], 2)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "dog").mkdir()
    (tmp_path / "test" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"test: no class folders with images, so the test split would be empty"):
        load_data("imagefolder", root=tmp_path)


def test_unreadable_image_names_file(tmp_path):
    write_tree(tmp_path, ["a", "b"], 3)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    with pytest.raises(DataError, match="broken.png"):
        load_data("imagefolder", root=tmp_path)


# --------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "name, layout",
    [("cifar10", "cifar-10-batches-bin/{data_batch_1.bin"), ("cifar100", "cifar-100-python/{train,test,meta}"),
     ("mnist", "train-images-idx3-ubyte"), ("fashion-mnist", "t10k-labels-idx1-ubyte"),
     ("imagefolder", "<root>/train/<class>/<image>"), ("caltech101", "101_ObjectCategories/<class>")],
)
def test_missing_directory_names_layout(tmp_path, name, layout):
    with pytest.raises(DataError) as info:
        load_data(name, root=tmp_path / "nowhere")
    assert layout in str(info.value) and "nowhere" in str(info.value)


def test_partial_cifar_names_missing_files(tmp_path):
    write_cifar10_binary(tmp_path / "cifar-10-batches-bin", np.random.default_rng(12))
    (tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match="lacks data_batch_4.bin"):
        load_data("cifar10", root=tmp_path)


def test_unknown_name_suggests_close_match():
    with pytest.raises(UserError) as info:
        load_data("digit")
    assert not isinstance(info.value, DataError)
    assert "'digits'" in str(info.value)
    assert set(DATASETS) >= {"digits", "synthetic", "cifar10", "caltech101"}
    with pytest.raises(UserError, match="does not take"):
        load_data("digits", channels=3)


# --------------------------------------------------------------------------------------------------
# A data set registered from outside the package


@pytest.fixture
def tinyset():
    """``tinyset`` (alias ``tiny-set``): a loader of in-memory tensors, registered for one test."""
    from probe.data import register_dataset, unregister_dataset

    def load(*, root, image_size, seed, classes=2):
        y = torch.arange(6) % classes
        x = y.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
        return DataSplits(name="tinyset", x_train=x, y_train=y, x_test=x[:classes], y_test=y[:classes],
                          num_classes=classes, class_names=tuple(map(str, range(classes))), mean=(0.0,), std=(1.0,),
                          source=f"in memory, seed={seed}")

    register_dataset("tinyset", load, aliases=("tiny-set",), options=("classes",), files="none")
    try:
        yield
    finally:
        unregister_dataset("tinyset")


def test_registered_dataset_loads_by_name_and_alias_and_is_in_cli_help(tinyset, monkeypatch, capsys):
    import probe.data
    from probe.cli import build_parser

    assert probe.data.DATASETS[-1] == "tinyset"
    d = load_data("tinyset", classes=3, seed=4, limit_train=3)
    assert d.name == "tinyset" and d.num_classes == 3 and d.y_train.tolist() == [0, 1, 2]
    assert d.source == "in memory, seed=4"
    assert load_data("Tiny_Set").describe() == load_data("tinyset").describe()
    assert data_roots("tiny-set") == [] and find_data("tinyset") is None
    with pytest.raises(UserError, match=r"data set 'tinyset' does not take option\(s\) format; accepted: classes"):
        load_data("tiny-set", format="binary")
    with pytest.raises(ValueError, match="already registered"):
        probe.data.register_dataset("tiny-set", lambda **kw: None)

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("--data DATA"))
    assert "data set: digits, synthetic, cifar10, cifar100, mnist, fashion-mnist, imagefolder, caltech101, " \
           "npz, tinyset; npz:FILE reads arrays x, y of one's own (default: digits)" in line


# --------------------------------------------------------------------------------------------------
# Search path: root alone when given, else $PROBE_DATA, ./data, $PROBE_SYSTEM_DATA/<name>


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty stand-ins for $PROBE_DATA, ./data (the working directory's) and the system folder."""
    env, cwd, system = tmp_path / "env", tmp_path / "cwd", tmp_path / "system"
    for folder in (env, cwd, system):
        folder.mkdir()
    monkeypatch.setenv("PROBE_DATA", str(env))
    monkeypatch.setenv("PROBE_SYSTEM_DATA", str(system))
    monkeypatch.chdir(cwd)
    return env, cwd / "data", system / "fashion-mnist"


def test_search_order_env_then_cwd_data_then_system(places, monkeypatch):
    env, local, system = places
    assert data_roots("fashion_mnist") == [env, local, system]
    assert data_roots("mnist")[-1] == system.parent / "mnist"
    assert data_roots("digits") == [] and data_roots("imagefolder") == []
    assert find_data("fashion-mnist") is None
    raws = {
        system: write_idx(system, np.random.default_rng(20), gz=True),
        local: write_idx(local / "fashion-mnist", np.random.default_rng(21)),
        env: write_idx(env, np.random.default_rng(22), gz=True),
    }
    write_idx(env / "raw", np.random.default_rng(23))  # an incomplete copy never shadows a complete one
    (env / "raw" / "t10k-labels-idx1-ubyte").unlink()
    for folder, found in ((env, env), (local, local / "fashion-mnist"), (system, system)):
        assert find_data("fashion-mnist") == found
        d = load_data("fashion-mnist")
        check_idx(d, raws[folder])
        assert d.source == f"idx files at {found}"
        for f in found.glob("*-ubyte*"):
            f.unlink()
    assert find_data("fashion-mnist") is None
    monkeypatch.delenv("PROBE_DATA")
    assert data_roots("fashion-mnist") == [local, system]


def test_system_folder_alone_is_found_with_no_root(places, monkeypatch):
    _, _, system = places
    monkeypatch.delenv("PROBE_DATA")
    raw = write_idx(system, np.random.default_rng(24), gz=True)
    d = load_data("fashion-mnist", limit_train=2)
    assert d.name == "fashion-mnist" and str(system) in d.source
    check_idx(load_data("fashion-mnist"), raw)


def test_explicit_root_wins_and_is_the_only_place_searched(places, tmp_path):
    env, local, system = places
    for i, folder in enumerate((env, local, system)):
        write_idx(folder, np.random.default_rng(30 + i))
    mine = tmp_path / "mine"
    raw = write_idx(mine, np.random.default_rng(33))
    assert data_roots("fashion-mnist", mine) == [mine] and find_data("fashion-mnist", mine) == mine
    check_idx(load_data("fashion-mnist", root=mine), raw)
    empty = tmp_path / "empty"
    assert find_data("fashion-mnist", empty) is None
    with pytest.raises(DataError) as info:
        load_data("fashion-mnist", root=empty)
    msg = str(info.value)
    assert f"not found under {empty}." in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(env) not in msg and str(local) not in msg


def test_missing_data_names_searched_folders_and_package(places):
    env, local, system = places
    with pytest.raises(DataError) as info:
        load_data("fashion-mnist")
    msg = str(info.value)
    assert f"fashion-mnist not found in {env}, {local}, {system}. Expected <root>/{{train-images-idx3-ubyte" in msg
    assert "`apt-get install dataset-fashion-mnist` (or `make data`)" in msg and "\n" not in msg
    assert msg.endswith("or put the files under one of those folders")
    write_idx(local, np.random.default_rng(25))
    (local / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=f"{local} lacks train-labels-idx1-ubyte"):
        load_data("fashion-mnist")
    with pytest.raises(DataError) as info:
        load_data("cifar10")
    assert f"in {env}, {local}, {system.parent / 'cifar10'}." in str(info.value)
    assert "apt-get" not in str(info.value)


def test_cifar_and_caltech_follow_the_search_path(places):
    env, local, system = places
    raw = write_cifar10_binary(local / "cifar-10-batches-bin", np.random.default_rng(26))
    assert find_data("cifar10") == local / "cifar-10-batches-bin"
    d = load_data("cifar10")
    check_cifar(d, raw, [f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin")
    cats = system.parent / "caltech101" / "101_ObjectCategories"
    write_tree(cats, ["a", "b"], 5)
    assert find_data("caltech-101") == cats
    assert load_data("caltech101", image_size=8).source.startswith(f"image folder {cats},")
    assert find_data("imagefolder") is None and find_data("imagefolder", cats) == cats


@pytest.mark.slow
def test_real_fashion_mnist_package(tmp_path, monkeypatch):
    """Debian's dataset-fashion-mnist, where installed: the full 60000/10000 split, 28x28."""
    monkeypatch.delenv("PROBE_DATA", raising=False)
    monkeypatch.delenv("PROBE_SYSTEM_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    if find_data("fashion-mnist") is None:
        pytest.skip("dataset-fashion-mnist is not installed (make data)")
    d = load_data("fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    counts = d.describe()
    assert counts["train_class_counts"] == [6000] * 10 and counts["test_class_counts"] == [1000] * 10
    assert abs(float(d.x_train.mean())) < 0.01 and abs(float(d.x_train.std()) - 1) < 0.01


# --------------------------------------------------------------------------------------------------
# Loader


def _images(n=23, c=2, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.arange(n)


def test_loader_covers_every_sample_once():
    x, y = _images()
    loader = make_loader(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 5
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert [len(yb) for _, yb in batches] == [5, 5, 5, 5, 3]
        seen = torch.cat([yb for _, yb in batches])
        assert torch.equal(seen.sort().values, y)
        for xb, yb in batches:
            assert torch.equal(xb, x[yb])  # no augmentation: images untouched
        orders.append(seen)
    assert not torch.equal(orders[0], y) and not torch.equal(orders[0], orders[1])
    dropped = make_loader(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True)
    assert len(dropped) == 4 and all(len(yb) == 5 for _, yb in dropped)


def test_loader_without_shuffle_is_in_order():
    x, y = _images()
    batches = list(make_loader(x, y, 10, shuffle=False))
    assert torch.equal(torch.cat([xb for xb, _ in batches]), x)
    assert torch.equal(torch.cat([yb for _, yb in batches]), y)


def test_loader_resumes_exactly_from_generator_state():
    x, y = _images()
    aug = Augment(crop_padding=2, hflip=True)
    g = torch.Generator().manual_seed(7)
    loader = make_loader(x, y, 4, shuffle=True, generator=g, augment=aug)
    list(loader)  # epoch 1
    state = g.get_state()
    epoch2 = list(loader)
    g.set_state(state)
    replay = list(loader)
    fresh_g = torch.Generator().manual_seed(7)
    fresh = make_loader(x, y, 4, shuffle=True, generator=fresh_g, augment=aug)
    list(fresh)
    fresh2 = list(fresh)
    for (xa, ya), (xb, yb), (xc, yc) in zip(epoch2, replay, fresh2):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa, xc) and torch.equal(ya, yc)
    assert len(epoch2) == len(replay) == 6


def test_hflip_flips_some_images():
    x, y = _images(n=32)
    out = list(make_loader(x, y, 32, shuffle=False, generator=torch.Generator().manual_seed(1),
                           augment=Augment(hflip=True)))[0][0]
    assert out.shape == x.shape
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    assert torch.all(same | flipped) and same.any() and flipped.any()


def _shifted(img: torch.Tensor, p: int, dy: int, dx: int) -> torch.Tensor:
    """Reference crop: zero-pad by p, take the window at offset (dy, dx)."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * p, w + 2 * p)
    padded[:, p:p + h, p:p + w] = img
    return padded[:, dy:dy + h, dx:dx + w]


def test_random_crop_matches_reference():
    p = 2
    x, y = _images(n=20)
    out = list(make_loader(x, y, 8, shuffle=False, generator=torch.Generator().manual_seed(2),
                           augment=Augment(crop_padding=p)))
    out = torch.cat([xb for xb, _ in out])
    assert out.shape == x.shape
    offsets = []
    for o, i in zip(out, x):
        match = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(o, _shifted(i, p, dy, dx))]
        assert len(match) == 1
        offsets.append(match[0])
    assert len(set(offsets)) > 1 and any(m != (p, p) for m in offsets)


def test_augment_validation():
    with pytest.raises(UserError):
        Augment(crop_padding=-1)
    x, y = _images()
    with pytest.raises(UserError):
        make_loader(x, y, 0, shuffle=False)
