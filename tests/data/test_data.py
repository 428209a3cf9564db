"""Data loading: IDX parser, Fashion-MNIST (when installed), digits, imagefolder, collation, metric."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from msq_hf import data as D
from msq_hf.data.arrays import stratified_subset, to_pixel_values
from msq_hf.data.images import hf_image_dataset


def _idx_bytes(array: np.ndarray, type_code: int = 0x08, big_endian_dtype: str = ">u1") -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian_dtype).tobytes()


@pytest.fixture(autouse=True)
def _offline_hf(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # No Hub traffic, and datasets/evaluate caches go to a throwaway directory.
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets", raising=False)


# ------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip_uint8(tmp_path: Path, compress: bool) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    payload = _idx_bytes(arr)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    out = D.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_big_endian_int32_and_float(tmp_path: Path) -> None:
    ints = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i").write_bytes(_idx_bytes(ints, 0x0C, ">i4"))
    out = D.read_idx(tmp_path / "i")
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, ints)
    floats = np.array([[0.5, -1.25]], dtype=np.float32)
    (tmp_path / "f").write_bytes(_idx_bytes(floats, 0x0D, ">f4"))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "f"), floats)


def test_read_idx_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    arr = np.array([3, 1, 4], dtype=np.uint8)
    path = tmp_path / "labels-without-gz-suffix"
    path.write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(D.read_idx(path), arr)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_truncated_names_file(tmp_path: Path, compress: bool) -> None:
    payload = _idx_bytes(np.zeros((4, 5), dtype=np.uint8))[:-3]
    path = tmp_path / "short.idx"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(ValueError, match=r"short\.idx.*truncated"):
        D.read_idx(path)


def test_read_idx_trailing_bytes_rejected(tmp_path: Path) -> None:
    path = tmp_path / "long.idx"
    path.write_bytes(_idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match=r"long\.idx.*trailing"):
        D.read_idx(path)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\x08\x00", b"\x00\x00\x08\x10"])
def test_read_idx_bad_header_names_file(tmp_path: Path, magic: bytes) -> None:
    path = tmp_path / "bad_magic.idx"
    path.write_bytes(magic + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match=r"bad_magic\.idx"):
        D.read_idx(path)


def test_read_idx_header_too_short_and_corrupt_gzip(tmp_path: Path) -> None:
    (tmp_path / "tiny.idx").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"tiny\.idx.*magic"):
        D.read_idx(tmp_path / "tiny.idx")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(64, np.uint8)))[:20])
    with pytest.raises(ValueError, match=r"broken\.gz"):
        D.read_idx(tmp_path / "broken.gz")


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST discovery (synthetic files) and the real data when installed
# ------------------------------------------------------------------------------------------------


def _write_fake_fashion(directory: Path, n_train: int = 40, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))


def test_find_fashion_mnist_env_var_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir, other = tmp_path / "env", tmp_path / "other"
    env_dir.mkdir()
    other.mkdir()
    _write_fake_fashion(env_dir)
    _write_fake_fashion(other)
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(env_dir))
    assert D.find_fashion_mnist([other]) == env_dir
    monkeypatch.delenv(D.FASHION_MNIST_ENV)
    assert D.find_fashion_mnist([other]) == other
    assert D.find_fashion_mnist([tmp_path / "missing"]) is None


def test_find_fashion_mnist_incomplete_env_dir_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.warns(UserWarning, match="t10k-labels"):
        assert D.find_fashion_mnist([]) is None


def test_load_fashion_from_synthetic_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_fashion(tmp_path)
    monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
    ds = D.load_fashion_mnist("test", search_dirs=[tmp_path], allow_hub=False)
    assert len(ds) == 20
    x = ds[0]["pixel_values"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # 2-pixel zero border after padding 28 -> 32 equals the normalized value of a black pixel.
    black = (0.0 - D.FASHION_MNIST_MEAN) / D.FASHION_MNIST_STD
    assert torch.allclose(x[:, :2, :], torch.full_like(x[:, :2, :], black))
    raw = D.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")[0].astype(np.float32) / 255.0
    expected = (raw - D.FASHION_MNIST_MEAN) / D.FASHION_MNIST_STD
    np.testing.assert_allclose(x[0, 2:30, 2:30].numpy(), expected, rtol=0, atol=1e-6)
    assert torch.equal(x[0], x[2])  # grayscale replicated into 3 channels


def test_load_fashion_missing_gives_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        D.load_fashion_mnist("train", search_dirs=[tmp_path], allow_hub=False)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert D.FASHION_MNIST_ENV in message and D.FASHION_MNIST_HUB_ID in message


def test_load_fashion_missing_offline_hub_fallback_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(D.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="Hub"):
        D.load_fashion_mnist("test", search_dirs=[tmp_path], allow_hub=True)


def test_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed values"):
        D.load_fashion_mnist("valid", search_dirs=[tmp_path], allow_hub=False)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        D.load_digits_dataset("train", channels=2)
    with pytest.raises(ValueError, match="fit="):
        to_pixel_values(np.zeros((1, 8, 8), np.uint8), 8, 1, 0.0, 1.0, 1.0, "stretch")


def test_stratified_subset_is_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 50)
    a = stratified_subset(labels, 35, seed=1)
    counts = np.bincount(labels[a], minlength=10)
    assert len(a) == 35 and counts.max() - counts.min() <= 1
    assert np.array_equal(a, stratified_subset(labels, 35, seed=1))
    assert not np.array_equal(a, stratified_subset(labels, 35, seed=2))


_FASHION_DIR = D.find_fashion_mnist()


@pytest.mark.skipif(
    _FASHION_DIR is None,
    reason="Fashion-MNIST IDX files not installed "
    "(apt-get install dataset-fashion-mnist, or set MSQ_FASHION_MNIST_DIR)",
)
def test_real_fashion_mnist_subset() -> None:
    ds = D.load_fashion_mnist("test", limit=200, seed=0)
    assert len(ds) == 200
    assert ds.features["labels"].names == list(D.FASHION_MNIST_CLASSES)
    batch = ds[:]
    assert batch["pixel_values"].shape == (200, 3, 32, 32)
    assert torch.equal(torch.bincount(batch["labels"], minlength=10), torch.full((10,), 20))
    # The normalization constants come from the training set: the test subset should be close.
    assert abs(float(batch["pixel_values"][:, :, 2:30, 2:30].mean())) < 0.15
    gray = D.load_fashion_mnist("test", limit=10, image_size=28, channels=1)
    assert gray[0]["pixel_values"].shape == (1, 28, 28)


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def test_digits_dataset_shapes_and_split() -> None:
    pytest.importorskip("sklearn")
    train = D.load_digits_dataset("train")
    rows = [train[i] for i in range(5)]
    batch = D.collate_pixel_values(rows)
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["labels"].tolist() == [int(r["labels"]) for r in rows]
    test = D.load_digits_dataset("test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.2) < 0.01
    row = train[0]
    assert row["pixel_values"].shape == (3, 32, 32) and row["pixel_values"].dtype == torch.float32
    assert row["labels"].dtype == torch.int64
    assert train.features["labels"].names == [str(i) for i in range(10)]
    assert set(test[:]["labels"].tolist()) == set(range(10))
    again = D.load_digits_dataset("test")
    assert torch.equal(test[:]["pixel_values"], again[:]["pixel_values"])  # deterministic
    small = D.load_digits_dataset("train", image_size=16, channels=1, limit=30)
    assert len(small) == 30 and small[0]["pixel_values"].shape == (1, 16, 16)


def test_load_image_dataset_dispatch_digits() -> None:
    pytest.importorskip("sklearn")
    ds = D.load_image_dataset("digits", "test", image_size=32, channels=3, limit=12)
    assert len(ds) == 12 and ds[0]["pixel_values"].shape == (3, 32, 32)


# ------------------------------------------------------------------------------------------------
# imagefolder
# ------------------------------------------------------------------------------------------------


def _write_imagefolder(root: Path, per_class: int = 3) -> None:
    from PIL import Image

    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split in ("train", "test"):
        for name, color in colors.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (20 + i, 24), color).save(folder / f"{i}.png")


def test_imagefolder_loading(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path)
    ds = D.load_image_dataset(tmp_path, "test", image_size=16, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert len(ds) == 6
    assert ds.features["labels"].names == ["cat", "dog"]
    batch = ds[:]
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    red = batch["pixel_values"][batch["labels"] == 0]
    # pure red → (1, -1, -1) after normalizing with mean = std = 0.5
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0]), atol=1e-5)
    assert torch.allclose(red[:, 2], -torch.ones_like(red[:, 2]), atol=1e-5)
    collated = D.collate_pixel_values([ds[i] for i in range(4)])
    assert collated["pixel_values"].shape == (4, 3, 16, 16) and collated["labels"].dtype == torch.long
    # the library collator the pipeline uses gives the same batch
    from transformers import DefaultDataCollator

    library = DefaultDataCollator()([ds[i] for i in range(4)])
    assert all(torch.equal(collated[k], library[k]) and collated[k].dtype == library[k].dtype for k in collated)
    gray = D.load_image_dataset(tmp_path, "train", image_size=8, channels=1, limit=4)
    assert len(gray) == 4 and gray[0]["pixel_values"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="split='validation'.*found splits"):
        D.load_image_dataset(tmp_path, "validation", image_size=8, channels=3)


def test_column_detection_error_lists_columns() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"picture": [0, 1], "target": [1, 0]})
    with pytest.raises(ValueError, match=r"image column.*\['picture', 'target'\]"):
        hf_image_dataset(ds, "toy", 8, 3, None, 0, None, None)


def test_collate_pixel_values_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        D.collate_pixel_values([])
    with pytest.raises(KeyError, match="labels"):
        D.collate_pixel_values([{"pixel_values": torch.zeros(1, 2, 2)}])
