"""diffcore.io.checkpoint: reading, loading into meta-built modules, atomic saving."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import (
    checkpoint_files,
    load_model,
    load_state_dict,
    save_file_atomic,
    tensor_shapes,
)


class Toy(nn.Module):
    """Two linears, a persistent buffer and a non-persistent one rebuilt by ``init_buffers``."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.out = nn.Linear(width, 2)
        self.register_buffer("scale", torch.ones(width))
        self.register_buffer("table", torch.arange(width, dtype=torch.float32), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.table = torch.arange(self.scale.shape[0], dtype=torch.float32, device=device)

    def forward(self, x):
        return self.out(self.inp(x) * self.scale + self.table)


def toy_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in Toy().state_dict().items()}


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int = 3) -> Path:
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file_atomic(part, folder / name)
        weight_map.update({k: name for k in part})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_sharded_round_trip(tmp_path):
    state = toy_state()
    index = write_sharded(tmp_path, state)
    assert len(checkpoint_files(index)) == 3
    for source in (index, tmp_path):  # the index itself, or the folder that holds it
        loaded = load_state_dict(source)
        assert loaded.keys() == state.keys()
        for k in state:
            assert torch.equal(loaded[k], state[k])
    assert tensor_shapes(tmp_path) == {k: tuple(v.shape) for k, v in state.items()}
    model = load_model(Toy, index)
    assert torch.equal(model.out.weight, state["out.weight"])


def test_index_errors_name_the_file(tmp_path):
    state = toy_state()
    index = write_sharded(tmp_path, state)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003\.safetensors.*lacks: ghost\.weight"):
        load_state_dict(index)
    data["weight_map"]["ghost.weight"] = "model-00009-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"1 shard\(s\) that are not in .*model-00009-of-00003"):
        load_state_dict(index)


def test_folder_and_file_resolution_errors(tmp_path):
    save_file_atomic({"a": torch.zeros(1)}, tmp_path / "one.safetensors")
    save_file_atomic({"a": torch.zeros(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="several weight files .*one.safetensors, two.safetensors"):
        load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="in two checkpoints"):
        load_model(lambda: nn.Linear(1, 1), [tmp_path / "one.safetensors", tmp_path / "two.safetensors"])
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a weights file"):
        load_state_dict(tmp_path / "notes.txt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="broken.safetensors: not a safetensors file"):
        load_state_dict(tmp_path / "broken.safetensors")


def test_rename_and_no_copy_when_dtype_matches(tmp_path):
    state = {f"legacy.{k}": v for k, v in toy_state().items()}
    save_file_atomic(state, tmp_path / "w.safetensors")
    seen = {}

    def rename(sd):
        out = {k.removeprefix("legacy."): sd.pop(k) for k in list(sd)}
        seen.update(out)
        return out

    model = load_model(Toy, tmp_path / "w.safetensors", rename=rename)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[f"legacy.{name}"])
        assert tensor.data_ptr() == seen[name].data_ptr()  # assigned, not copied
    assert torch.equal(model.table, torch.arange(4.0))  # non-persistent buffer rebuilt
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model.inp.weight.requires_grad and isinstance(model.inp.weight, nn.Parameter)
    model(torch.randn(5, 3))  # runs


def _mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map ``file`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(file)):
            start, end = (int(a, 16) for a in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_copied_keys_come_from_a_mapping_released_with_them(tmp_path):
    """Keys a converter fuses come from a second mapping of the file that only they hold: when
    the converter drops them it is unmapped (their pages leave the resident set) while the rest
    stay views of the first mapping. Values and dtypes as written."""
    import gc

    state = {"a": torch.randn(64, 64), "b": torch.randn(64, 64).to(torch.bfloat16), "c": torch.arange(10),
             "d": torch.tensor([True, False]), "e": torch.zeros(0, 3), "f": torch.tensor(2.5)}
    file = tmp_path / "w.safetensors"
    save_file_atomic(state, file)
    got = load_state_dict(file, copied=lambda k: k in ("b", "c"))
    assert list(got) == list(state)
    for key, tensor in state.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor)

    def mapping_of(t: torch.Tensor) -> tuple[int, int]:
        return next(r for r in _mapped_ranges(file) if r[0] <= t.data_ptr() < r[1])

    assert mapping_of(got["b"]) == mapping_of(got["c"]) != mapping_of(got["a"]) == mapping_of(got["d"])
    released = mapping_of(got["b"])
    del got["b"], got["c"]
    gc.collect()
    assert released not in _mapped_ranges(file) and mapping_of(got["a"])


def test_copied_keys_through_load_model_and_errors(tmp_path):
    state = {f"legacy.{k}": v for k, v in toy_state().items()}
    save_file_atomic(state, tmp_path / "w.safetensors")
    model = load_model(Toy, tmp_path / "w.safetensors", copied=lambda k: k.endswith("weight"),
                       rename=lambda sd: {k.removeprefix("legacy."): sd.pop(k) for k in list(sd)})
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[f"legacy.{name}"])
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_state_dict(tmp_path / "cut.safetensors", copied=lambda k: True)


def test_dtype_cast_and_fp8_upcast(tmp_path):
    state = toy_state()
    save_file_atomic(state, tmp_path / "w.safetensors")
    bf16 = load_model(Toy, tmp_path / "w.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.state_dict().values()} == {torch.bfloat16}
    assert torch.equal(bf16.inp.weight, state["inp.weight"].bfloat16())

    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    save_file_atomic(fp8, tmp_path / "fp8.safetensors")
    up = load_model(Toy, tmp_path / "fp8.safetensors")  # dtype=None: the dtype the model was built with
    assert up.inp.weight.dtype == torch.float32
    assert torch.equal(up.inp.weight, fp8["inp.weight"].float())
    up16 = load_model(Toy, tmp_path / "fp8.safetensors", dtype=torch.float16)
    assert up16.out.bias.dtype == torch.float16
    assert torch.equal(up16.out.bias, fp8["out.bias"].to(torch.float16))


def test_mismatch_is_one_error_with_every_kind(tmp_path):
    state = toy_state()
    del state["out.bias"]
    state["inp.weight"] = torch.zeros(4, 5)
    for i in range(7):
        state[f"extra.{i}"] = torch.zeros(1)
    file = tmp_path / "bad.safetensors"
    save_file_atomic(state, file)
    with pytest.raises(CheckpointError) as info:
        load_model(Toy, file)
    msg = str(info.value)
    assert str(file) in msg and "does not match Toy" in msg
    assert "1 missing key(s): out.bias" in msg
    assert "7 unexpected key(s): extra.0, extra.1, extra.2, extra.3, extra.4, ... (2 more)" in msg
    assert "1 mis-shaped key(s): inp.weight (checkpoint [4, 5], model [4, 3])" in msg


def test_non_strict_ignores_extra_and_initialises_missing(tmp_path):
    state = toy_state()
    del state["out.bias"]
    state["extra"] = torch.zeros(1)
    save_file_atomic(state, tmp_path / "w.safetensors")
    model = load_model(Toy, tmp_path / "w.safetensors", strict=False)
    assert torch.equal(model.out.weight, state["out.weight"])  # loaded half of the module kept
    assert model.out.bias.shape == (2,) and not model.out.bias.is_meta
    assert model.out.bias.abs().max() <= 0.5 + 1e-6  # nn.Linear's init bound 1/sqrt(fan_in=4)
    state["inp.weight"] = torch.zeros(1)
    save_file_atomic(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_model(Toy, tmp_path / "w.safetensors", strict=False)


def test_meta_leftovers_are_reported(tmp_path):
    class NoInit(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("freqs", torch.ones(3), persistent=False)

    save_file_atomic({f"lin.{k}": v for k, v in nn.Linear(2, 2).state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) on the meta device .*freqs.*init_buffers"):
        load_model(NoInit, tmp_path / "w.safetensors")


def test_rename_failure_names_the_file(tmp_path):
    save_file_atomic(toy_state(), tmp_path / "w.safetensors")

    def rename(sd):
        return {"x": sd["not.there"]}

    with pytest.raises(CheckpointError, match=r"w\.safetensors: its keys could not be converted for Toy: KeyError"):
        load_model(Toy, tmp_path / "w.safetensors", rename=rename)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_weights_only(tmp_path):
    state = toy_state()
    torch.save(state, tmp_path / "w.pt")
    loaded = load_state_dict(tmp_path / "w.pt")
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "lightning.ckpt")
    model = load_model(Toy, tmp_path / "lightning.ckpt")
    assert torch.equal(model.out.weight, state["out.weight"])

    torch.save({"w": torch.zeros(1), "evil": Payload()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match=r"evil\.bin: refused to unpickle.*weights_only=True"):
        load_state_dict(tmp_path / "evil.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict(tmp_path / "list.pt")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.safetensors"
    save_file_atomic({"a": torch.ones(2)}, target, metadata={"format": "pt"})
    before = target.read_bytes()
    with pytest.raises(Exception):
        save_file_atomic({"a": torch.ones(2), "b": "not a tensor"}, target)
    with pytest.raises(Exception):
        save_file_atomic({"a": torch.ones(2)}, target, metadata={"n": 3})
    assert target.read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temp files left
    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(Exception):
        save_file_atomic({"b": object()}, fresh)
    assert not fresh.exists()
    from safetensors import safe_open

    with safe_open(str(target), "pt") as f:
        assert f.metadata() == {"format": "pt"}
