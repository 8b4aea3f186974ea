"""Memory of loading T5-v1.1-XXL's encoder (FLUX.1's and SD3's, 4.8 B parameters) into fp8 weights
on the CPU, as ``text_weight_dtype`` does: transformers' ``from_pretrained`` in bf16 and
``store_fp8`` after, against ``diffcore.io.pretrained.load_pretrained`` rounding each linear weight
as it is read; and from ComfyUI's single fp8 file (``t5xxl_fp8_e4m3fn.safetensors``: the linear
weights cast to fp8) through ``load_text_file``, upcast to bf16 or kept in fp8.

The folder is a diffusers-style ``text_encoder_2/`` (config.json, bf16 safetensors shards and their
index; random weights, the real shapes: about 9.5 GB), written under DIR once, shard by shard.
Each run is a fresh process with the files in the page cache; memory is sampled as
benchmarks/fp8_load.py does (peak anonymous memory is what the load needs; mapped file pages can
be given back). ``--tiny`` runs the same on a tiny T5, as the test does.

    python benchmarks/text_fp8_load.py [DIR] [--tiny] [--device cuda]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fp8_load import arguments, print_table, watched  # noqa: E402

MODES = ("load, then round", "round while loading")
FILE_MODES = ("load (upcast to bf16)", "round while loading")
FP8_FILE = "t5xxl_fp8_e4m3fn.safetensors"
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
           feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
TINY = dict(vocab_size=320, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
SHARD_BYTES = 2 << 30


def write_folder(folder: Path, tiny: bool) -> None:
    """config.json, bf16 shards of random weights (about 2 GiB each) and their index, once."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = T5Config(**(TINY if tiny else XXL), architectures=["T5EncoderModel"])
    with init_empty_weights():
        model = T5EncoderModel(config)
    shapes = {k: v.shape for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied
    g = torch.Generator().manual_seed(0)
    shards, shard, size = [], {}, 0
    for key, shape in shapes.items():
        shard[key] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        size += shard[key].numel() * 2
        if size >= SHARD_BYTES or key == list(shapes)[-1]:
            shards.append(shard)
            shard, size = {}, 0
    weight_map, total = {}, 0
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        total += sum(t.numel() * 2 for t in part.values())
    config.save_pretrained(folder)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_fp8_file(folder: Path) -> Path:
    """ComfyUI's t5xxl_fp8_e4m3fn layout: one file, 2-d weights of 256 features or more in fp8."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = folder.parent / FP8_FILE
    if not file.exists():
        state = {}
        for shard in sorted(folder.glob("model-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    fp8 = t.ndim == 2 and min(t.shape) >= 256 and key != "shared.weight"
                    state[key] = t.to(torch.float8_e4m3fn) if fp8 else t
        save_file(state, str(file))
    return file


def measure(path: Path, mode: str, tiny: bool, device: str) -> dict[str, float]:
    import torch
    from transformers import T5Config, T5EncoderModel

    from diffcore.io.pretrained import load_pretrained
    from diffcore.io.text_files import load_text_file
    from diffcore.nn.fp8 import store_fp8
    from diffcore.nn.fp8_options import Rounding, text_rounding_on_load

    folder = path
    if path.is_file():   # the single fp8 file: its config is the folder's beside it
        config = T5Config.from_pretrained(path.parent / "text_encoder_2")

        def load():
            if mode == FILE_MODES[0]:
                return load_text_file(T5EncoderModel, path, config, dtype=torch.bfloat16, device=device)
            with text_rounding_on_load(Rounding()):
                return load_text_file(T5EncoderModel, path, config, dtype=torch.bfloat16, device=device)
        return watched(load, device)

    def load():
        if mode == "load, then round":
            model = T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True).to(device)
            store_fp8(model, "float8_e4m3fn")
            return model
        with text_rounding_on_load(Rounding()):
            return load_pretrained(T5EncoderModel, folder, dtype=torch.bfloat16, device=device)
    return watched(load, device)


def main() -> None:
    args = arguments(__doc__, "encoder")
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.tiny, args.device)))
        return
    folder = Path(args.dir) / ("t5-tiny" if args.tiny else "t5-xxl") / "text_encoder_2"
    write_folder(folder, args.tiny)
    label = "T5 (tiny)" if args.tiny else "T5-v1.1-XXL, bf16 shards"
    file = write_fp8_file(folder)
    print_table(__file__, args, "encoder", [(folder, label, mode) for mode in MODES]
                + [(file, f"{FP8_FILE} (ComfyUI)", mode) for mode in FILE_MODES])


if __name__ == "__main__":
    main()
