"""The captioned dataset: paired captions and metadata files, buckets, repeats, deterministic
augmentation, broken images."""

import json
import warnings

import attrs
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffcore.data.captions import CaptionedDataset
from diffcore.errors import ConfigError
from diffcore.plugins import Plugins

SMALL = dict(resolution=64, bucket_resolution_steps=16, min_bucket_resolution=32, max_bucket_resolution=128)


def write_image(path, width, height, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def folder(tmp_path, sizes=((64, 64), (96, 48), (48, 96), (100, 50)), captions=True):
    for i, (w, h) in enumerate(sizes):
        write_image(tmp_path / f"img{i}.png", w, h, seed=i)
        if captions:
            (tmp_path / f"img{i}.txt").write_text(f"caption {i}, tag a, tag b, tag c\n")
    return tmp_path


def test_paired_captions_and_buckets(tmp_path):
    ds = CaptionedDataset(folder(tmp_path), **SMALL)
    assert len(ds) == 4 and [e.key for e in ds.entries] == [f"img{i}.png" for i in range(4)]
    item = ds[1]                                   # 96 wide, 48 high: a landscape bucket
    h, w = item["target_size"].tolist()
    assert w > h and h % 16 == 0 and w % 16 == 0 and h * w <= 64 * 64
    assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["caption"] == "caption 1, tag a, tag b, tag c" and item["key"] == "img1.png"
    assert item["original_size"].tolist() == [48, 96] and item["original_size"].dtype == torch.long
    assert ds[0]["target_size"].tolist() == [64, 64] and ds[0]["crop_top_left"].tolist() == [0, 0]
    assert ds[2]["target_size"].tolist() == [w, h]          # the portrait twin
    unbucketed = CaptionedDataset(tmp_path, resolution=32, bucketing=False)
    assert {tuple(unbucketed[i]["image"].shape) for i in range(4)} == {(3, 32, 32)}


def test_batches_through_a_dataloader_are_one_bucket_each(tmp_path):
    sizes = [(64, 64)] * 3 + [(96, 48)] * 3 + [(48, 96)] * 2
    ds = CaptionedDataset(folder(tmp_path, sizes), **SMALL)
    loader = DataLoader(ds, batch_sampler=ds.batch_sampler(seed=0, batch_size=2))
    batches = [b for b, _ in zip(loader, range(8))]
    for b in batches:
        assert b["image"].shape[0] == 2 and len(b["caption"]) == 2 and b["target_size"].shape == (2, 2)
        assert (b["target_size"] == b["target_size"][0]).all()
    assert len({tuple(b["image"].shape[2:]) for b in batches}) == 3


def test_missing_caption_warns_once_and_trains_with_the_empty_one(tmp_path):
    folder(tmp_path, captions=False)
    with pytest.warns(UserWarning, match="4 images .* have no .txt caption") as record:
        ds = CaptionedDataset(tmp_path, **SMALL)
    assert len(record) == 1 and ds[0]["caption"] == ""
    (tmp_path / "img0.caption").write_text("custom extension")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert CaptionedDataset(tmp_path, caption_extension=".caption", **SMALL)[0]["caption"] == "custom extension"


def test_a_broken_image_is_skipped_with_one_warning_naming_it(tmp_path):
    folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("never seen")
    with pytest.warns(UserWarning) as record:
        ds = CaptionedDataset(tmp_path, **SMALL)
    assert len(record) == 1 and "broken.png" in str(record[0].message)
    assert len(ds) == 4 and "broken.png" not in [e.key for e in ds.entries]


def test_an_image_that_fails_to_decode_is_swapped_for_the_next_of_its_bucket(tmp_path):
    sizes = [(96, 48), (64, 64), (96, 48), (96, 48)]
    folder(tmp_path, sizes)
    data = (tmp_path / "img2.png").read_bytes()
    (tmp_path / "img2.png").write_bytes(data[:len(data) // 2])      # the header reads, the pixels do not
    ds = CaptionedDataset(tmp_path, **SMALL)
    assert len(ds) == 4
    with pytest.warns(UserWarning, match="img2.png") as record:
        item = ds[2]
    assert len(record) == 1 and item["key"] == "img3.png" and item["caption"].startswith("caption 3")
    assert torch.equal(item["image"], ds[3]["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # known broken now: no second warning
        assert ds[2]["key"] == "img3.png"


def test_empty_or_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CaptionedDataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="no readable images"):
        CaptionedDataset(tmp_path)
    (tmp_path / ".hidden").mkdir()
    write_image(tmp_path / ".hidden" / "a.png", 8, 8)              # hidden folders (a cache_dir) are not data
    with pytest.raises(ConfigError, match="no readable images"):
        CaptionedDataset(tmp_path)


def test_metadata_jsonl_with_per_image_repeats(tmp_path):
    write_image(tmp_path / "a" / "x.png", 64, 64)
    write_image(tmp_path / "y.jpg", 96, 48, seed=1)
    lines = [{"file_name": "a/x.png", "text": "first"}, {"file_name": "y.jpg", "text": "second", "repeats": 3}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    (tmp_path / "y.txt").write_text("ignored: metadata wins")
    ds = CaptionedDataset(tmp_path, repeats=2, **SMALL)
    assert len(ds) == 2 * 1 + 2 * 3
    assert [ds[i]["caption"] for i in range(len(ds))] == ["first"] * 2 + ["second"] * 6
    assert ds[0]["key"] == "a/x.png"
    assert CaptionedDataset(tmp_path / "metadata.jsonl", **SMALL).root == tmp_path
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "y.jpg"}\n{oops\n')
    with pytest.raises(ConfigError, match="metadata.jsonl line 2 is not JSON"):
        CaptionedDataset(tmp_path, **SMALL)
    (tmp_path / "metadata.jsonl").write_text('{"caption": "no file"}\n')
    with pytest.raises(ConfigError, match="line 1 has no image file name"):
        CaptionedDataset(tmp_path, **SMALL)


def test_metadata_json_list(tmp_path):
    write_image(tmp_path / "x.png", 64, 64)
    (tmp_path / "metadata.json").write_text(json.dumps([{"image": "x.png", "caption": "a cat"},
                                                         {"image": "gone.png", "caption": "missing"}]))
    with pytest.warns(UserWarning, match="gone.png .listed at .*metadata.json entry 1"):
        ds = CaptionedDataset(tmp_path, **SMALL)
    assert len(ds) == 1 and ds[0]["caption"] == "a cat"
    (tmp_path / "metadata.json").write_text(json.dumps({"x.png": "a cat"}))
    with pytest.raises(ConfigError, match="expected a list"):
        CaptionedDataset(tmp_path, **SMALL)


def test_tag_shuffle_is_deterministic_per_visit_and_keeps_the_first_tokens(tmp_path):
    write_image(tmp_path / "x.png", 64, 64)
    (tmp_path / "x.txt").write_text("sks person, red hat, blue coat, smiling, outdoors, night")
    ds = CaptionedDataset(tmp_path, shuffle_tags=True, keep_tokens=1, **SMALL)
    captions = [ds[(0, seed)]["caption"] for seed in range(20)]
    assert captions == [ds[(0, seed)]["caption"] for seed in range(20)]
    assert len(set(captions)) > 10
    for c in captions:
        tags = c.split(", ")
        assert tags[0] == "sks person" and sorted(tags[1:]) == ["blue coat", "night", "outdoors", "red hat", "smiling"]


def test_flip_and_random_crop_follow_the_visit_seed(tmp_path):
    write_image(tmp_path / "x.png", 100, 50)
    (tmp_path / "x.txt").write_text("x")
    ds = CaptionedDataset(tmp_path, flip=True, center_crop=False, **SMALL)
    plans = [ds.plan(0, seed) for seed in range(40)]
    assert plans == [ds.plan(0, seed) for seed in range(40)]
    assert {p.flip for p in plans} == {True, False} and len({p.crop for p in plans}) > 1
    p = next(p for p in plans if p.flip and p.crop[1] != (p.resized[1] - p.bucket[1]) // 2)
    flipped = ds.render(p)
    mirror = attrs.evolve(p, flip=False, crop=(p.crop[0], p.resized[1] - p.bucket[1] - p.crop[1]))
    assert torch.equal(flipped["image"], ds.render(mirror)["image"].flip(-1))   # the same pixels, mirrored
    assert flipped["crop_top_left"].tolist() == list(p.crop)
    assert ds[(0, 7)]["image"].shape[1:] == tuple(p.bucket)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (100, 50), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6                                   # rotate 90 degrees to display
    img.save(tmp_path / "x.jpg", exif=exif)
    (tmp_path / "x.txt").write_text("x")
    ds = CaptionedDataset(tmp_path, **SMALL)
    assert ds.entries[0].size == (100, 50)
    h, w = ds[0]["target_size"].tolist()
    assert h > w and ds[0]["image"].shape[1:] == (h, w)


def test_registered_with_its_config(tmp_path):
    folder(tmp_path)
    component = Plugins().load(entry_points=False).registry("datasets").get("captioned")
    ds = component.build(component.config(path=str(tmp_path), **SMALL))
    assert isinstance(ds, CaptionedDataset) and len(ds) == 4
    with pytest.raises(ConfigError, match="multiples of bucket_resolution_steps"):
        component.config(path=str(tmp_path), resolution=64, bucket_resolution_steps=48, min_bucket_resolution=32)
    with pytest.raises(ConfigError, match="resolution"):
        component.config(path=str(tmp_path), resolution=4096)


def test_conditioning_images_follow_their_images(tmp_path):
    """``conditioning_data``: a folder beside the images with the same names; each map is resized,
    flipped and cropped exactly as its image (here the map is the image itself)."""
    from PIL import Image

    from diffcore.data.captions import CaptionedDataset
    from diffcore.errors import ConfigError

    images, maps = tmp_path / "images", tmp_path / "maps"
    images.mkdir()
    maps.mkdir()
    for i, size in enumerate([(40, 24), (24, 40)]):
        pixels = (torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
        Image.fromarray(pixels).save(maps / (f"{i}.bmp" if i else f"{i}.png"))   # any image suffix
        (images / f"{i}.txt").write_text(f"caption {i}")
    dataset = CaptionedDataset(images, resolution=32, bucket_resolution_steps=8, min_bucket_resolution=16,
                               max_bucket_resolution=64, flip=True, center_crop=False, conditioning_data=str(maps))
    for seed in range(3):
        item = dataset[(0, seed)]
        assert torch.equal(item["conditioning_image"], item["image"])
        other = dataset[(1, seed)]
        assert torch.equal(other["conditioning_image"], other["image"])
    (maps / "1.bmp").unlink()
    with pytest.raises(ConfigError, match=r"no conditioning image for .*1\.png in .*maps: expected .*maps/1\.png"):
        CaptionedDataset(images, resolution=32, bucket_resolution_steps=8, min_bucket_resolution=16,
                         max_bucket_resolution=64, conditioning_data=str(maps))
