"""Dataset loaders on tiny files written in each real on-disk format, and the member split."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from securefed.config import DataConfig
from securefed.data import DatasetError, ImageDataset, load_dataset, split_member_holdout
from securefed.data.datasets import uci_digits_layout

# --------------------------------------------------------------------------------------------
# Writers of the real formats
# --------------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray) -> bytes:
    """IDX ubyte: magic 0x00 0x00 0x08 <ndim>, then big-endian int32 dims, then the bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    return header + arr.tobytes()


def _write_mnist(root: Path, folder: str, gz: bool, n_train: int = 12, n_test: int = 8):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            data = _idx_bytes(arr)
            if gz:
                (raw / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (raw / stem).write_bytes(data)
        out[prefix] = (x, y)
    return out


def _write_cifar(root: Path, per_batch: int = 4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with (folder / name).open("wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": y}, fh, protocol=2)
        xs.append(x)
        ys.extend(y)
    return np.concatenate(xs), np.array(ys)


def _write_svhn(root: Path, n_train: int = 10, n_test: int = 5):
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = ((np.arange(n) % 10) + 1).astype(np.uint8)[:, None]  # 1..10, 10 means digit 0
        savemat(str(root / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return out


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _label_ranks(labels: torch.Tensor) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=10)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_default():
    ds = load_dataset(DataConfig())
    assert len(ds) == 1797
    assert ds.image_shape == (1, 8, 8)
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0
    assert ds.num_classes == 10 and len(ds.class_names) == 10 and ds.sites is None
    assert set(ds.labels.tolist()) == set(range(10))
    from sklearn.datasets import load_digits

    ref = torch.from_numpy(load_digits().images.astype(np.float32)) / 16 * 2 - 1
    torch.testing.assert_close(ds.images[:, 0], ref)


def test_mnist5k_native_and_uci_layout():
    ds = load_dataset(DataConfig(name="mnist5k"))
    assert ds.images.shape == (5000, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.bincount().tolist() == [500] * 10
    assert float(ds.images.min()) == -1.0 and float(ds.images.max()) == 1.0
    uci = load_dataset(DataConfig(name="mnist5k", mnist5k_layout="uci_digits", max_examples=300))
    assert uci.images.shape == (300, 1, 8, 8) and uci.labels.bincount().tolist() == [30] * 10
    # block counts 0..16 mapped like digits: x / 8 - 1, so every value sits on that grid
    counts = (uci.images + 1) * 8
    assert torch.allclose(counts, counts.round(), atol=1e-5)
    assert float(counts.max()) == 16.0  # some 4x4 block is fully on
    resized = load_dataset(DataConfig(name="mnist5k", image_size=16, max_examples=20))
    assert resized.images.shape == (20, 1, 16, 16)


def test_uci_digits_layout_crops_scales_and_counts_blocks():
    img = np.zeros((28, 28))
    img[5:15, 4:24] = 255.0  # a 10 x 20 bar: longer side 20 -> 32, height 10 -> 16, centred
    out = uci_digits_layout(img[None])
    expected = np.zeros((8, 8))
    expected[2:6, :] = 16.0  # rows 8..23 of the 32x32 frame are on: block rows 2..5, all full
    assert out.shape == (1, 8, 8) and np.array_equal(out[0], expected)
    faint = img * 0.2  # 51 < threshold 64: nothing is on
    assert uci_digits_layout(faint[None]).sum() == 0
    assert uci_digits_layout(np.zeros((1, 784))).sum() == 0  # a blank image stays blank


def test_digits_resize_channels_and_max_examples():
    ds = load_dataset(DataConfig(image_size=16, channels=3, max_examples=200, split_seed=3))
    assert ds.image_shape == (3, 16, 16) and len(ds) == 200
    assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0
    torch.testing.assert_close(ds.images[:, 0], ds.images[:, 2])
    counts = _label_ranks(ds.labels)
    assert counts.min() >= 19 and counts.max() <= 21  # stratified: ~20 per class
    again = load_dataset(DataConfig(image_size=16, channels=3, max_examples=200, split_seed=3))
    assert ds.fingerprint() == again.fingerprint()
    other = load_dataset(DataConfig(image_size=16, channels=3, max_examples=200, split_seed=4))
    assert ds.fingerprint() != other.fingerprint()


# --------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder", "gz"),
    [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)],
)
def test_mnist_like_idx(tmp_path, name, folder, gz):
    written = _write_mnist(tmp_path, folder, gz=gz)
    ds = load_dataset(DataConfig(name=name, root=tmp_path))
    x = np.concatenate([written["train"][0], written["t10k"][0]])
    y = np.concatenate([written["train"][1], written["t10k"][1]])
    assert len(ds) == 20 and ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.labels.numpy(), y)
    torch.testing.assert_close(ds.images[:, 0], torch.from_numpy(x).float() / 255 * 2 - 1)
    if name == "fashion_mnist":
        assert ds.class_names[0] == "T-shirt/top"


def test_mnist_missing_names_expected_path(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(DataConfig(name="mnist", root=tmp_path / "nowhere"))
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert "download=True" in msg


def test_mnist_bad_magic(tmp_path):
    _write_mnist(tmp_path, "MNIST", gz=True)
    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x01\x02\x03\x04garbage"))
    with pytest.raises(DatasetError, match="IDX"):
        load_dataset(DataConfig(name="mnist", root=tmp_path))


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# --------------------------------------------------------------------------------------------


def test_cifar10_batches(tmp_path):
    x, y = _write_cifar(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=tmp_path))
    assert len(ds) == 24 and ds.image_shape == (3, 32, 32)
    assert ds.class_names[0] == "airplane"
    np.testing.assert_array_equal(ds.labels.numpy(), y)
    expect = torch.from_numpy(x.reshape(-1, 3, 32, 32)).float() / 255 * 2 - 1
    torch.testing.assert_close(ds.images, expect)


def test_cifar10_grayscale_resized(tmp_path):
    x, _ = _write_cifar(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=tmp_path, channels=1, image_size=16))
    assert ds.image_shape == (1, 16, 16)
    assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0
    rgb = torch.from_numpy(x.reshape(-1, 3, 32, 32)).float() / 255 * 2 - 1
    lum = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(
        ds.images[:, 0].mean(dim=(1, 2)), lum.mean(dim=(1, 2)), atol=2e-3, rtol=0
    )


def test_cifar10_missing_and_malicious(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(DataConfig(name="cifar10", root=tmp_path))
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert "data_batch_1..5" in str(err.value) and "test_batch" in str(err.value)

    _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with (tmp_path / "cifar-10-batches-py" / "data_batch_3").open("wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh)
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset(DataConfig(name="cifar10", root=tmp_path))


# --------------------------------------------------------------------------------------------
# SVHN (.mat)
# --------------------------------------------------------------------------------------------


def test_svhn_mat(tmp_path):
    written = _write_svhn(tmp_path)
    ds = load_dataset(DataConfig(name="svhn", root=tmp_path))
    assert len(ds) == 15 and ds.image_shape == (3, 32, 32)
    y = np.concatenate([written["train"][1][:, 0], written["test"][1][:, 0]]).astype(np.int64)
    np.testing.assert_array_equal(ds.labels.numpy(), np.where(y == 10, 0, y))
    assert 0 in ds.labels.tolist() and 10 not in ds.labels.tolist()
    x0 = written["train"][0][:, :, :, 0]  # [H, W, 3] of the first image
    torch.testing.assert_close(
        ds.images[0], torch.from_numpy(x0.transpose(2, 0, 1).copy()).float() / 255 * 2 - 1
    )


def test_svhn_missing(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(DataConfig(name="svhn", root=tmp_path))
    assert str(tmp_path / "train_32x32.mat") in str(err.value)


# --------------------------------------------------------------------------------------------
# MedMNIST (.npz)
# --------------------------------------------------------------------------------------------


def _write_npz(path: Path, rgb: bool, k: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    arrays = {}
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 4, size=(n, k), dtype=np.uint8)
    arrays["train_labels"][0, 0] = 3
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("rgb", [False, True])
def test_medmnist_npz(tmp_path, rgb):
    arrays = _write_npz(tmp_path / "pathmnist.npz", rgb)
    ds = load_dataset(DataConfig(name="medmnist", root=tmp_path / "pathmnist.npz"))
    assert len(ds) == 17 and ds.image_shape == ((3 if rgb else 1), 28, 28)
    assert ds.num_classes == 4
    y = np.concatenate([arrays[f"{s}_labels"][:, 0] for s in ("train", "val", "test")])
    np.testing.assert_array_equal(ds.labels.numpy(), y)
    only = load_dataset(
        DataConfig(name="medmnist", root=tmp_path / "pathmnist.npz", medmnist_splits=("val",))
    )
    assert len(only) == 3
    first = arrays["val_images"][0]
    first = first.transpose(2, 0, 1) if rgb else first[None]
    torch.testing.assert_close(only.images[0], torch.from_numpy(first.copy()).float() / 255 * 2 - 1)


def test_medmnist_multilabel_and_missing(tmp_path):
    _write_npz(tmp_path / "chestmnist.npz", rgb=False, k=14)
    with pytest.raises(DatasetError, match="single-label"):
        load_dataset(DataConfig(name="medmnist", root=tmp_path / "chestmnist.npz"))
    with pytest.raises(DatasetError) as err:
        load_dataset(DataConfig(name="medmnist", root=tmp_path / "absent.npz"))
    assert str(tmp_path / "absent.npz") in str(err.value)
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="train_labels"):
        load_dataset(DataConfig(name="medmnist", root=tmp_path / "partial.npz"))


# --------------------------------------------------------------------------------------------
# image_folder (root/site/class/img)
# --------------------------------------------------------------------------------------------


def _write_sites(root: Path, mixed: bool = False) -> None:
    rng = np.random.default_rng(7)
    layout = {"hospital_a": {"cat": 3, "dog": 2}, "hospital_b": {"dog": 2, "eel": 3}}
    for site, classes in layout.items():
        for cls, n in classes.items():
            for i in range(n):
                side = 12 if (mixed and site == "hospital_b") else 8
                arr = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
                _write_png(root / site / cls / f"img{i}.png", arr)
    (root / "hospital_a" / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_sites(tmp_path):
    _write_sites(tmp_path)
    ds = load_dataset(DataConfig(name="image_folder", root=tmp_path))
    assert len(ds) == 10 and ds.image_shape == (3, 8, 8)
    assert ds.class_names == ("cat", "dog", "eel") and ds.num_classes == 3
    assert ds.site_names == ("hospital_a", "hospital_b")
    assert ds.sites is not None
    np.testing.assert_array_equal(ds.sites.numpy(), [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(ds.labels.numpy(), [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    png = np.asarray(Image.open(tmp_path / "hospital_a" / "cat" / "img0.png"))
    torch.testing.assert_close(
        ds.images[0], torch.from_numpy(png.transpose(2, 0, 1).copy()).float() / 255 * 2 - 1
    )
    gray = load_dataset(DataConfig(name="image_folder", root=tmp_path, channels=1))
    assert gray.image_shape == (1, 8, 8)
    sub = ds.subset(np.array([4, 5]))
    assert sub.sites is not None and sub.sites.tolist() == [0, 1]


def test_image_folder_grayscale_native(tmp_path):
    for site in ("s1", "s2"):
        _write_png(tmp_path / site / "x" / "a.png", np.full((6, 6), 255, np.uint8))
    ds = load_dataset(DataConfig(name="image_folder", root=tmp_path))
    assert ds.image_shape == (1, 6, 6) and float(ds.images.min()) == 1.0


def test_image_folder_mixed_sizes(tmp_path):
    _write_sites(tmp_path, mixed=True)
    with pytest.raises(DatasetError, match=r"data\.image_size"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path))
    ds = load_dataset(DataConfig(name="image_folder", root=tmp_path, image_size=10))
    assert ds.image_shape == (3, 10, 10)
    assert float(ds.images.min()) >= -1.0 and float(ds.images.max()) <= 1.0


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path / "missing"))
    (tmp_path / "site" / "empty_class").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty_class"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path))
    (tmp_path / "site" / "empty_class").rmdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path))
    _write_png(tmp_path / "site" / "loose.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match="directly"):
        load_dataset(DataConfig(name="image_folder", root=tmp_path))


# --------------------------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------------------------


def _indexed(n: int, labels: np.ndarray, sites: np.ndarray | None = None) -> ImageDataset:
    """A dataset whose pixel [0, 0, 0] encodes the example index (to check splits)."""
    images = torch.zeros(n, 1, 2, 2)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32) / max(n, 1)
    num_classes = int(labels.max()) + 1 if n else 1
    return ImageDataset(
        images=images,
        labels=torch.as_tensor(labels, dtype=torch.int64),
        num_classes=num_classes,
        name="synthetic",
        class_names=tuple(str(i) for i in range(num_classes)),
        sites=None if sites is None else torch.as_tensor(sites, dtype=torch.int64),
        site_names=() if sites is None else tuple(f"s{i}" for i in range(int(sites.max()) + 1)),
    )


def _ids(ds: ImageDataset, n: int) -> np.ndarray:
    return np.rint(ds.images[:, 0, 0, 0].numpy() * max(n, 1)).astype(np.int64)


def test_image_dataset_validation_and_subset():
    with pytest.raises(DatasetError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.tensor([0, 5]), 2, "x", ("a", "b"))
    with pytest.raises(DatasetError, match="images"):
        ImageDataset(torch.zeros(2, 2, 2), torch.tensor([0, 1]), 2, "x", ("a", "b"))
    ds = _indexed(6, np.array([0, 1, 0, 1, 0, 1]))
    assert ds.subset(torch.tensor([5, 0])).labels.tolist() == [1, 0]
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    assert len(ds.subset(np.array([True, False] * 3))) == 3
    assert ds.fingerprint() == _indexed(6, np.array([0, 1, 0, 1, 0, 1])).fingerprint()
    assert ds.fingerprint() != _indexed(6, np.array([1, 1, 0, 1, 0, 1])).fingerprint()


# --------------------------------------------------------------------------------------------
# split_member_holdout
# --------------------------------------------------------------------------------------------


def test_split_digits_stratified_deterministic():
    ds = load_dataset(DataConfig())
    members, holdout = split_member_holdout(ds, 0.2, seed=0)
    assert len(members) + len(holdout) == 1797 and len(holdout) == round(0.2 * 1797)
    m_counts, h_counts, all_counts = (_label_ranks(d.labels) for d in (members, holdout, ds))
    assert np.all(np.abs(h_counts - 0.2 * all_counts) <= 1)
    np.testing.assert_array_equal(m_counts + h_counts, all_counts)
    again = split_member_holdout(ds, 0.2, seed=0)
    assert again[0].fingerprint() == members.fingerprint()
    assert split_member_holdout(ds, 0.2, seed=1)[1].fingerprint() != holdout.fingerprint()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=80),
    site_of=st.one_of(st.none(), st.integers(1, 4)),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_properties(labels, site_of, fraction, seed):
    y = np.array(labels)
    n = len(y)
    sites = None if site_of is None else np.arange(n) % site_of
    ds = _indexed(n, y, sites)
    if sites is not None and n <= len(set(sites)):
        with pytest.raises(DatasetError, match="every site"):
            split_member_holdout(ds, fraction, seed)
        return
    members, holdout = split_member_holdout(ds, fraction, seed)
    m, h = _ids(members, n), _ids(holdout, n)
    assert len(m) and len(h)
    assert not set(m) & set(h)
    assert sorted([*m, *h]) == list(range(n))
    assert np.all(np.diff(m) > 0) and np.all(np.diff(h) > 0)  # original order kept
    np.testing.assert_array_equal(members.labels.numpy(), y[m])
    again_m, _ = split_member_holdout(ds, fraction, seed)
    np.testing.assert_array_equal(_ids(again_m, n), m)
    if sites is None:
        counts = np.bincount(y, minlength=5)
        hold_counts = np.bincount(y[h], minlength=5)
        expected = min(max(round(fraction * n), 1), n - 1)
        assert np.all(np.abs(hold_counts - counts * expected / n) < 1 + 1e-9)
    else:
        assert set(sites[m]) == set(sites)  # every site keeps members
        expected = min(max(round(fraction * n), 1), n - 1, n - len(set(sites)))
        assert len(h) == expected
        assert members.sites is not None and holdout.sites is not None


def test_split_too_small():
    with pytest.raises(DatasetError, match="at least 2"):
        split_member_holdout(_indexed(1, np.array([0])), 0.5, 0)
