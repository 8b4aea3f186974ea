"""The bad weight-file corpus: each row points a generate job's model at a broken or wrong file and
runs ``diffcore run``, so the families' real loaders (``dit`` ``checkpoint``, ``flux1`` and
``flux2`` ``path``) meet it.

A row is (case id, family, the files it writes, the files the message must name, fragments of
the message). The tensors are tiny: a digits DiT and the flux families' ``tiny`` rows, as zeros.
The pickle rows hold an object whose unpickling would create ``MARKER``; it must never appear.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

MARKER = "MARKER"


def generate(family: str, model: str) -> str:
    variant = 'variant = "digits"\n' if family == "dit" else ""
    return f'[job]\nkind = "generate"\noutput_dir = "out"\n[model]\nfamily = "{family}"\n{variant}{model}\n'


def zeros_of(module_class, params) -> dict[str, torch.Tensor]:
    """A state dict of zeros with ``module_class(params)``'s keys and shapes (built on meta)."""
    with torch.device("meta"):
        module = module_class(params)
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in module.state_dict().items()}


def dit_state(**changes) -> dict[str, torch.Tensor]:
    import attrs
    from diffcore_dit.model import DiT2D
    from diffcore_dit.params import VARIANTS

    return zeros_of(DiT2D, attrs.evolve(VARIANTS["digits"], **changes))


def flux1_state() -> dict[str, torch.Tensor]:
    from diffcore_flux1.model import Flux
    from diffcore_flux1.params import VARIANTS

    return zeros_of(Flux, VARIANTS["tiny"])


def flux2_state() -> dict[str, torch.Tensor]:
    from diffcore_flux2.model import Flux2
    from diffcore_flux2.params import VARIANTS

    return zeros_of(Flux2, VARIANTS["tiny"])


def raw(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors-shaped file: 8-byte header length, the header (JSON unless bytes), data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def tensor(dtype: str = "F32", shape: list[int] = (4, 4), offsets: list[int] = (0, 64)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def dit_bytes() -> bytes:
    return save(dit_state())


def cut(fraction: float):
    def build(path: Path) -> None:
        data = dit_bytes()
        path.write_bytes(data[:int(len(data) * fraction)])
    return build


def saved(state):
    def build(path: Path) -> None:
        save_file(state(), str(path))
    return build


class Payload:
    """Unpickling this creates the marker file: it is what an attacker's checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def evil_torch(path: Path) -> None:
    torch.save({"w": torch.zeros(2), "x": Payload(path.parent / MARKER)}, path)


def evil_raw(path: Path) -> None:
    path.write_bytes(pickle.dumps({"w": torch.zeros(2), "x": Payload(path.parent / MARKER)}))


def folder(*files: tuple[str, str]):
    def build(path: Path) -> None:
        path.mkdir(parents=True)
        for name, text in files:
            (path / name).write_text(text)
    return build


def torch_saved(obj):
    def build(path: Path) -> None:
        torch.save(obj, path)
    return build


def truncated_torch(path: Path) -> None:
    torch.save({"w": torch.zeros(256)}, path)
    path.write_bytes(path.read_bytes()[:300])


DIT_CONFIG = json.dumps({"_class_name": "DiTTransformer2DModel", "num_layers": 4})
FLUX1_CONFIG = json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 2})
FLUX2_CONFIG = json.dumps({"_class_name": "Flux2Transformer2DModel", "num_layers": 2})
W = "w.safetensors"

# (case id, family, {file name: content}, the key that points at it, names in the message, fragments)
CASES = [
    # -- DiT: checkpoint = ... ----------------------------------------------------------------------
    ("dit-zero-bytes", "dit", {W: b""}, [W], ["empty file (0 bytes)"]),
    ("dit-truncated", "dit", {W: cut(0.5)}, [W], ["truncated:", "incomplete download"]),
    ("dit-truncated-in-header", "dit", {W: cut(0.001)}, [W], ["truncated:", "but its header alone is"]),
    ("dit-header-length-garbage", "dit", {W: b"\xff" * 8 + b"{}"}, [W], ["its first 8 bytes are no header length"]),
    ("dit-corrupt-header-json", "dit", {W: raw(b"{not json at all}")}, [W], ["its header is not valid JSON"]),
    ("dit-header-not-object", "dit", {W: raw([1, 2])}, [W], ["its header is a JSON list"]),
    ("dit-offsets-past-end", "dit", {W: raw({"x": tensor(shape=[32, 32], offsets=[0, 4096])}, b"\0" * 64)}, [W],
     ["truncated: ", "of the 4,", "its header describes"]),
    ("dit-offsets-inconsistent", "dit", {W: raw({"x": tensor(offsets=[0, 32])}, b"\0" * 64)}, [W],
     ["tensor 'x' (F32, shape [4, 4]) needs 64 bytes, but its data_offsets [0, 32] span 32"]),
    ("dit-wrong-dtype", "dit", {W: raw({"x": tensor(dtype="F33")}, b"\0" * 64)}, [W],
     ["tensor 'x' has dtype 'F33', which is not a safetensors dtype", "F32"]),
    ("dit-torch-dtype-name", "dit", {W: raw({"x": tensor(dtype="float32")}, b"\0" * 64)}, [W],
     ["tensor 'x' has dtype 'float32'"]),
    ("dit-dtype-not-a-string", "dit", {W: raw({"x": tensor(dtype=["F32"])}, b"\0" * 64)}, [W],
     ["not a readable safetensors file", "invalid type: sequence"]),
    ("dit-no-offsets", "dit", {W: raw({"x": {"dtype": "F32", "shape": [4, 4]}}, b"\0" * 64)}, [W],
     ["tensor 'x' has no \"data_offsets\""]),
    ("dit-flux2-file", "dit", {W: saved(flux2_state)}, [W], ["not a DiT checkpoint", "first: double_blocks.0."]),
    ("dit-other-depth", "dit", {W: saved(lambda: dit_state(depth=2))}, [W],
     ["does not fit this DiT", "missing blocks.2."]),
    ("dit-other-width", "dit", {W: saved(lambda: dit_state(hidden=32, heads=2))}, [W],
     ["does not fit this DiT", "shape mismatch", "(model: (64,"]),
    ("dit-pickle-runs-code", "dit", {"w.pt": evil_torch}, ["w.pt"],
     ["refused to unpickle it", "(it asks for io.open)", "weights_only=True"]),
    ("dit-raw-pickle-runs-code", "dit", {"w.bin": evil_raw}, ["w.bin"],
     ["not a torch zip checkpoint", "does not unpickle legacy or raw pickle files"]),
    ("dit-pickle-of-a-list", "dit", {"w.ckpt": torch_saved([torch.zeros(2)])}, ["w.ckpt"], ["holds a list"]),
    ("dit-text-as-pt", "dit", {"w.pt": "these are not weights\n"}, ["w.pt"], ["not a torch zip checkpoint"]),
    ("dit-truncated-pt", "dit", {"w.pt": truncated_torch}, ["w.pt"], ["a damaged torch zip checkpoint"]),
    ("dit-zero-bytes-pt", "dit", {"w.pt": b""}, ["w.pt"], ["empty file (0 bytes)"]),
    ("dit-unknown-suffix", "dit", {"w.gguf": b"GGUF\0\0\0\0"}, ["w.gguf"],
     ["not a weights file (expected .safetensors"]),
    ("dit-empty-folder", "dit", {"w": folder()}, ["w"], ["has neither ema.safetensors nor model.safetensors"]),
    ("dit-folder-config-only", "dit", {"w": folder(("config.json", DIT_CONFIG))}, ["w"],
     ["has neither ema.safetensors nor model.safetensors"]),
    ("dit-run-with-empty-step", "dit", {"w/checkpoints/step-000010": folder()}, ["step-000010"],
     ["has neither ema.safetensors nor model.safetensors"]),
    # -- FLUX.1: path = ... -------------------------------------------------------------------------
    ("flux1-zero-bytes", "flux1", {W: b""}, [W], ["empty file (0 bytes)"]),
    ("flux1-corrupt-header-json", "flux1", {W: raw(b"[[[[[[[[")}, [W], ["not valid JSON"]),
    ("flux1-truncated", "flux1", {W: lambda p: p.write_bytes(save(flux1_state())[:5000])}, [W], ["truncated:"]),
    ("flux1-flux2-file", "flux1", {W: saved(flux2_state)}, [W], ["not a FLUX.1 transformer", "FLUX.2"]),
    ("flux1-dit-file", "flux1", {W: saved(dit_state)}, [W], ["not a FLUX.1 transformer"]),
    ("flux1-empty-folder", "flux1", {"w": folder()}, ["w"], ["no *.safetensors", "file in this folder"]),
    ("flux1-folder-config-only", "flux1", {"w": folder(("config.json", FLUX1_CONFIG))}, ["w"],
     ["no *.safetensors", "file in this folder"]),
    ("flux1-pickle-runs-code", "flux1", {"w.pt": evil_torch}, ["w.pt"], ["refused to unpickle it"]),
    ("flux1-other-pipeline", "flux1",
     {"w": folder(("model_index.json", json.dumps({"_class_name": "StableDiffusionXLPipeline"})))}, ["w"],
     ["is a diffusers StableDiffusionXLPipeline folder, not FLUX.1"]),
    ("flux1-corrupt-index", "flux1", {"w/diffusion_pytorch_model.safetensors.index.json": "{oops"},
     ["diffusion_pytorch_model.safetensors.index.json"], ["not a safetensors index"]),
    ("flux1-index-missing-shard", "flux1",
     {"w/model.safetensors.index.json": json.dumps({"weight_map": {"img_in.weight": "model-00001.safetensors"}})},
     ["model.safetensors.index.json", "model-00001.safetensors"], ["lists 1 shard(s) that are not in"]),
    ("flux1-no-autoencoder", "flux1", {W: saved(flux1_state)}, ["job.toml", W],
     ["at model.vae", "no ae.safetensors next to", "set vae to FLUX.1's autoencoder"]),
    # -- FLUX.2: path = ... -------------------------------------------------------------------------
    ("flux2-zero-bytes", "flux2", {W: b""}, [W], ["empty file (0 bytes)"]),
    ("flux2-truncated", "flux2", {W: lambda p: p.write_bytes(save(flux2_state())[:5000])}, [W], ["truncated:"]),
    ("flux2-wrong-dtype", "flux2", {W: raw({"img_in.weight": tensor(dtype="INT4")}, b"\0" * 64)}, [W],
     ["tensor 'img_in.weight' has dtype 'INT4'"]),
    ("flux2-flux1-file", "flux2", {W: saved(flux1_state)}, [W], ["not a FLUX.2 transformer"]),
    ("flux2-dit-file", "flux2", {W: saved(dit_state)}, [W], ["not a FLUX.2 transformer"]),
    ("flux2-empty-folder", "flux2", {"w": folder()}, ["w"], ["no *.safetensors", "file in this folder"]),
    ("flux2-folder-config-only", "flux2", {"w": folder(("config.json", FLUX2_CONFIG))}, ["w"],
     ["no *.safetensors", "file in this folder"]),
    ("flux2-no-autoencoder", "flux2", {W: saved(flux2_state)}, ["job.toml", W],
     ["at model.vae", "has no vae/ folder: set vae to FLUX.2's ae.safetensors"]),
    ("flux2-raw-pickle-runs-code", "flux2", {"w.bin": evil_raw}, ["w.bin"], ["does not unpickle legacy or raw pickle"]),
]


def job_for(case: str, family: str, files: dict) -> str:
    """The generate job pointing the family at the case's weights (its first file's top folder)."""
    target = Path(next(iter(files))).parts[0]
    key = "checkpoint" if family == "dit" else "path"
    return generate(family, f'{key} = "{target}"')


@pytest.mark.parametrize("case,family,files,names,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_weights_are_refused(refused, tmp_path, case, family, files, names, fragments):
    refused({**files, "job.toml": job_for(case, family, files)}, names, fragments)
    assert not (tmp_path / MARKER).exists(), "unpickling ran the file's code"


def test_the_corpus_is_large_and_unique():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == {"dit", "flux1", "flux2"}


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The pickle rows prove something only if their payload really creates the marker."""
    evil_raw(tmp_path / "w.bin")
    pickle.loads((tmp_path / "w.bin").read_bytes()).get("x").close()
    assert (tmp_path / MARKER).exists()


@pytest.mark.parametrize("case", ["dit-pickle-runs-code", "dit-truncated", "flux2-flux1-file"])
def test_in_a_real_process_exit_1_and_no_traceback(refused_process, tmp_path, case):
    _, family, files, names, fragments = next(c for c in CASES if c[0] == case)
    refused_process({**files, "job.toml": job_for(case, family, files)}, names, fragments)
    assert not (tmp_path / MARKER).exists()
