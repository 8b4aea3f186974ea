"""Latent and text-embedding caches: a cached run loads no encoder, a change re-encodes exactly
what it touches, cached and uncached training agree."""

import warnings

import pytest
import torch
from accelerate import PartialState
from PIL import Image

from caption_standins import caption_bundle
from diffcore.data.cache import CachedDataset, cache_dataset, cache_for_job
from diffcore.data.captions import CaptionedDataset
from diffcore.errors import ConfigError
from diffcore.jobs.train import TrainSettings
from diffcore.training.loop import train

SMALL = dict(resolution=32, bucket_resolution_steps=8, min_bucket_resolution=16, max_bucket_resolution=64)
SIZES = [(32, 32), (40, 40), (60, 30), (64, 34), (30, 60), (33, 66)]


def write_image(path, w, h, seed):
    pixels = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(seed)) * 255
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i, (w, h) in enumerate(SIZES):
        write_image(root / f"{i}.png", w, h, seed=i)
        (root / f"{i}.txt").write_text(f"photo {i}, a red cat on the mat")
    (root / "5.txt").write_text("photo 0, a red cat on the mat")       # two images, one caption
    return root


def no_loaders(bundle):
    """Encoders that fail loudly if anything tries to load them."""
    def refuse(name):
        def load():
            raise AssertionError(f"the {name} was loaded")
        return load
    bundle.loaders = {"vae": refuse("autoencoder"), "text": refuse("text encoder")}
    return bundle


def test_a_second_run_loads_no_encoder(data, tmp_path):
    ds = CaptionedDataset(data, flip=True, **SMALL)
    first = caption_bundle()
    said = []
    cached = cache_dataset(ds, first, tmp_path / "cache", say=said.append)
    assert first.loaded("vae") and first.loaded("text")
    assert first.calls["vae"] == 2 * len(SIZES)                    # both orientations of each image
    assert first.calls["text"] == len(SIZES) - 1 + 1               # the distinct captions and ""
    assert "12 latents (12 encoded now), 6 text embeddings (6 encoded now)" in said[0]

    second = no_loaders(caption_bundle())
    said = []
    again = cache_dataset(CaptionedDataset(data, flip=True, **SMALL), second, tmp_path / "cache", say=said.append)
    assert not second.loaded("vae") and not second.loaded("text") and not second.calls
    assert "(0 encoded now)" in said[0] and " of weights" in said[1] and "s of encoding" in said[1]
    assert torch.equal(second.empty_text["txt"], first.encode_captions([""])["txt"])
    for key in [(i, s) for i in range(len(ds)) for s in range(4)]:
        item, raw = again[key], ds[key]
        assert "image" not in item and set(item) >= {"latents", "text", "caption", "target_size", "crop_top_left"}
        with torch.no_grad():
            expected = first.encode(raw["image"][None])[0]
        torch.testing.assert_close(item["latents"], expected, rtol=0, atol=1e-6)   # the visit's flip
        assert torch.equal(item["text"]["txt"], first.encode_captions([raw["caption"]])["txt"][0])
        assert item["crop_top_left"].tolist() == raw["crop_top_left"].tolist()
        assert torch.equal(cached[key]["latents"], item["latents"])
    # training from the cache, caption dropout included, never loads them either
    from training_standins import full_trainer

    trainer = full_trainer(second, cond_dropout=0.5)
    batch = torch.utils.data.default_collate([again[(0, 1)], again[(0, 2)]])
    assert torch.isfinite(trainer.loss(second, batch, torch.Generator().manual_seed(0)))
    assert not second.loaded("vae") and not second.loaded("text")


def test_a_change_re_encodes_exactly_the_entries_it_touches(data, tmp_path):
    cache = tmp_path / "cache"
    cache_dataset(CaptionedDataset(data, **SMALL), caption_bundle(), cache, say=lambda t: None)
    files = {p.name for p in cache.rglob("*.safetensors")}

    def rerun(**identity):
        bundle = caption_bundle()
        bundle.identity.update(identity)
        cache_dataset(CaptionedDataset(data, **SMALL), bundle, cache, say=lambda t: None)
        return bundle.calls

    write_image(data / "2.png", 60, 30, seed=99)                     # new pixels, same name and size
    assert rerun() == {"vae": 1}
    (data / "3.txt").write_text("a new caption")
    assert rerun() == {"text": 1}
    write_image(data / "4.png", 60, 30, seed=4)                      # portrait to landscape: a new bucket
    assert rerun() == {"vae": 1}
    assert rerun(vae="pool-vae-2") == {"vae": len(SIZES)}
    assert rerun(text="word-encoder-2") == {"text": len(SIZES) - 1 + 1}
    assert rerun() == {}                                             # the old entries are still there
    assert files <= {p.name for p in cache.rglob("*.safetensors")}
    assert not list(cache.rglob("*.tmp"))


def test_cached_and_uncached_training_give_the_same_losses(data, tmp_path):
    from training_standins import full_trainer, settings

    def run(name, cached):
        bundle = caption_bundle()
        dataset = CaptionedDataset(data, flip=True, **SMALL)
        if cached:
            dataset = cache_dataset(dataset, bundle, tmp_path / "cache", say=lambda t: None)
            bundle = no_loaders(caption_bundle())
            dataset = cache_dataset(CaptionedDataset(data, flip=True, **SMALL), bundle, tmp_path / "cache",
                                    say=lambda t: None)
        trainer = full_trainer(bundle, cond_dropout=0.3, timestep_sampling="logit-normal")
        s = settings(tmp_path / name, batch_size=2, steps=3, checkpoint_every=0)
        return train(s, bundle=bundle, trainer=trainer, dataset=dataset, output_dir=tmp_path / name).losses

    plain, cached = run("plain", False), run("cached", True)
    print(f"losses uncached {plain} cached {cached}")
    assert [s for s, _ in plain] == [s for s, _ in cached] == [1, 2, 3]
    for (_, a), (_, b) in zip(plain, cached):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)


def test_what_a_cache_cannot_hold_is_refused(data, tmp_path):
    bundle = caption_bundle()
    with pytest.raises(ConfigError, match="center_crop = true") as err:
        cache_dataset(CaptionedDataset(data, center_crop=False, **SMALL), bundle, tmp_path, text=False)
    assert err.value.path == "job.cache_latents"
    cache_dataset(CaptionedDataset(data, center_crop=False, **SMALL), bundle, tmp_path / "a", latents=False,
                  say=lambda t: None)                                # text alone is fine with random crops
    with pytest.raises(ConfigError, match="shuffle_tags"):
        cache_dataset(CaptionedDataset(data, shuffle_tags=True, **SMALL), bundle, tmp_path, latents=False)
    with pytest.raises(ConfigError, match="captioned"):
        cache_dataset(list(range(3)), bundle, tmp_path)
    bundle.identity = {"text": "t"}
    with pytest.raises(ConfigError, match="no 'vae' entry"):
        cache_dataset(CaptionedDataset(data, **SMALL), bundle, tmp_path)


def test_text_only_cache_serves_images_and_embeddings(data, tmp_path):
    bundle = caption_bundle()
    ds = cache_dataset(CaptionedDataset(data, **SMALL), bundle, tmp_path, latents=False, say=lambda t: None)
    assert not bundle.loaded("vae")
    item = ds[(3, 5)]
    assert item["image"].shape[0] == 3 and "latents" not in item
    assert torch.equal(item["text"]["txt"], bundle.encode_captions([item["caption"]])["txt"][0])


def test_a_killed_write_leaves_no_entry(data, tmp_path, monkeypatch):
    import diffcore.data.cache as cache

    calls = []

    def die(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt    # a kill between writing the temporary file and renaming it
        return real(src, dst)

    real = cache.os.replace
    monkeypatch.setattr(cache.os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        cache_dataset(CaptionedDataset(data, **SMALL), caption_bundle(), tmp_path / "c", say=lambda t: None)
    monkeypatch.setattr(cache.os, "replace", real)
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 2 and list((tmp_path / "c").rglob(".*.tmp"))
    bundle = caption_bundle()
    cache_dataset(CaptionedDataset(data, **SMALL), bundle, tmp_path / "c", say=lambda t: None)
    assert bundle.calls["vae"] == len(SIZES) - 2 and not list((tmp_path / "c").rglob(".*.tmp"))


def test_the_train_jobs_settings(data, tmp_path, capsys):
    s = TrainSettings(output_dir=str(tmp_path / "run"), cache_latents=True)
    ds = cache_for_job(CaptionedDataset(data, **SMALL), caption_bundle(), s, output_dir=tmp_path / "run",
                       state=PartialState(cpu=True))
    assert isinstance(ds, CachedDataset) and ds.text is None and len(ds) == len(SIZES)
    assert len(list((tmp_path / "run" / "cache" / "latents").glob("*.safetensors"))) == len(SIZES)
    assert "cache " in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = TrainSettings(output_dir=str(tmp_path / "run"), cache_text_embeddings=True, cache_dir=str(tmp_path / "c"))
        cache_for_job(CaptionedDataset(data, **SMALL), caption_bundle(), s, output_dir=tmp_path / "run",
                      state=PartialState(cpu=True))
    assert len(list((tmp_path / "c" / "text").glob("*.safetensors"))) == len(SIZES)


def test_the_job_file_is_refused_before_any_model_loads(data):
    from diffcore.config.structure import structure
    from diffcore.jobs.train import TrainJob

    pytest.importorskip("diffcore_dit")
    model = {"family": "dit", "variant": "digits"}
    dataset = {"name": "captioned", "path": str(data), **SMALL}
    job = structure({"job": {"cache_latents": True, "cache_text_embeddings": True}, "model": model,
                     "dataset": dataset}, TrainJob)
    assert job.job.cache_latents and job.job.cache_dir is None
    with pytest.raises(ConfigError, match=r"job\.cache_latents.*center_crop = true"):
        structure({"job": {"cache_latents": True}, "model": model, "dataset": {**dataset, "center_crop": False}},
                  TrainJob)
    with pytest.raises(ConfigError, match=r"job\.cache_text_embeddings.*shuffle_tags"):
        structure({"job": {"cache_text_embeddings": True}, "model": model,
                   "dataset": {**dataset, "shuffle_tags": True}}, TrainJob)


def test_other_processes_read_what_the_main_one_wrote(data, tmp_path, capsys):
    import contextlib

    class Rank1:
        is_main_process = False
        main_process_first = staticmethod(contextlib.nullcontext)

    s = TrainSettings(output_dir=str(tmp_path), cache_latents=True, cache_text_embeddings=True)
    cache_for_job(CaptionedDataset(data, **SMALL), caption_bundle(), s, output_dir=tmp_path, state=PartialState(cpu=True))
    capsys.readouterr()
    (tmp_path / "cache" / "encoders.json").unlink()
    bundle = no_loaders(caption_bundle())
    ds = cache_for_job(CaptionedDataset(data, **SMALL), bundle, s, output_dir=tmp_path, state=Rank1())
    assert len(ds) == len(SIZES) and bundle.empty_text is not None and not bundle.loaded("vae")
    assert not (tmp_path / "cache" / "encoders.json").exists() and capsys.readouterr().err == ""
