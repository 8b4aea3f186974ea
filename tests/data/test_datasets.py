"""The core's datasets: digits, image-folder, cifar10."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffcore.data.catalog import Cifar10Config, DigitsConfig, ImageFolderConfig
from diffcore.data.datasets import Cifar10Dataset, DigitsDataset, ImageFolderDataset
from diffcore.errors import ConfigError
from diffcore.plugins import Plugins


def check_item(item, shape):
    assert item["image"].shape == shape and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].ndim == 0


def test_catalog_imports_no_torch():
    code = "import sys, diffcore.data.catalog; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registered_as_builtins():
    datasets = Plugins().load(entry_points=False).registry("datasets")
    assert {"digits", "image-folder", "cifar10"} <= {c.name for c in datasets}
    ds = datasets.get("digits").build(DigitsConfig(image_size=16, split="test"))
    check_item(ds[0], (1, 16, 16))


def test_digits_splits_are_deterministic_and_disjoint():
    train, test, every = (DigitsDataset(split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (1498, 299, 1797)
    assert torch.equal(every.images[5], test.images[0]) and torch.equal(every.images[0], train.images[0])
    assert torch.equal(DigitsDataset(split="test").images, test.images)
    assert test.labels.bincount().min() >= 25  # every class held out
    check_item(train[0], (1, 8, 8))
    assert every.images.min() == -1.0 and every.images.max() == 1.0  # 0..16 mapped onto [-1, 1]


def test_digits_resize():
    big = DigitsDataset(image_size=16, split="all")
    check_item(big[7], (1, 16, 16))
    small = DigitsDataset(split="all")
    # bilinear upsampling keeps each 8x8 image's mean (up to the border)
    assert torch.allclose(big.images.mean((1, 2, 3)), small.images.mean((1, 2, 3)), atol=0.05)


def test_digits_config_validation():
    with pytest.raises(ConfigError, match="at split"):
        DigitsConfig(split="val")


def _png(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder(tmp_path):
    # a 16x8 (w x h) image: black quarters left and right, white middle; the center crop is white
    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = 255
    (tmp_path / "cats").mkdir()
    Image.fromarray(wide).save(tmp_path / "cats" / "wide.png")
    _png(tmp_path / "ants" / "a.png", (20, 30), (255, 0, 0))
    _png(tmp_path / "ants" / "sub" / "b.png", (5, 5), 0, mode="L")
    (tmp_path / "ants" / "notes.txt").write_text("not an image")

    ds = Plugins().load(entry_points=False).registry("datasets").get("image-folder").build(
        ImageFolderConfig(path=str(tmp_path), image_size=8))
    assert ds.classes == ["ants", "cats"] and len(ds) == 3
    assert [int(ds[i]["label"]) for i in range(3)] == [0, 0, 1]
    for i in range(3):
        check_item(ds[i], (3, 8, 8))
    assert torch.equal(ds[0]["image"][0], torch.ones(8, 8)) and torch.equal(ds[0]["image"][1], -torch.ones(8, 8))
    assert torch.equal(ds[2]["image"], torch.ones(3, 8, 8))

    gray = ImageFolderDataset(tmp_path, image_size=4, channels=1)
    check_item(gray[0], (1, 4, 4))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no class subfolders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        ImageFolderDataset(tmp_path)


def _cifar_batch(path, labels, seed):
    data = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    with open(path, "wb") as fh:
        pickle.dump({b"data": data, b"labels": list(labels), b"batch_label": b"x"}, fh)
    return data


def test_cifar10_reads_the_python_release(tmp_path):
    batches = [_cifar_batch(tmp_path / f"data_batch_{i}", [i, i + 1], i) for i in range(1, 6)]
    _cifar_batch(tmp_path / "test_batch", [9, 8, 7], 9)
    train = Cifar10Dataset(tmp_path)
    assert len(train) == 10 and train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    item = train[2]  # data_batch_2, first row: (3072,) = 1024 red, 1024 green, 1024 blue, row-major
    check_item(item, (3, 32, 32))
    row = batches[1][0].astype(np.float32) / 127.5 - 1
    assert item["image"][0, 0, 0].item() == pytest.approx(row[0])
    assert item["image"][1, 0, 1].item() == pytest.approx(row[1024 + 1])
    assert item["image"][2, 1, 0].item() == pytest.approx(row[2048 + 32])
    assert Cifar10Dataset(tmp_path, split="test").labels.tolist() == [9, 8, 7]


def test_cifar10_missing_files_are_named(tmp_path):
    _cifar_batch(tmp_path / "data_batch_1", [0], 0)
    with pytest.raises(ConfigError) as err:
        Cifar10Dataset(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "data_batch_2, data_batch_3" in message and "test_batch" in message
    assert "cifar-10-batches-py" in message and err.value.path == "path"
    with pytest.raises(ConfigError, match="missing test_batch"):
        Plugins().load(entry_points=False).registry("datasets").get("cifar10").build(
            Cifar10Config(path=str(tmp_path), split="test"))
