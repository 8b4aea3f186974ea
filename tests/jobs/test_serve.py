"""The serve job over real HTTP on a tiny DiT: the same PNGs as the generate job, job-file errors as 400s."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import attrs
import pytest
import torch
from PIL import Image

from diffcore.io.images import save_png
from diffcore.jobs.runner import prepare, run
from diffcore.jobs.serve import ServeSettings, make_server
from diffcore.testing import plugins_for_test

pytest.importorskip("diffcore_dit")
HAS_GUIDANCE = importlib.util.find_spec("diffcore_guidance") is not None
needs_guidance = pytest.mark.skipif(not HAS_GUIDANCE, reason="diffcore-guidance is not installed")

MODEL = """
[model]
family = "dit"
variant = "digits"
hidden = 32
depth = 1
heads = 2
checkpoint = "{weights}"
"""


@attrs.frozen
class Served:
    url: str
    folder: Path
    weights: Path
    service: object


def random_weights(path: Path) -> Path:
    """A fresh DiT outputs zero (adaLN-Zero): random weights make guidance and images differ."""
    from safetensors.torch import save_file

    from diffcore.plugins import registry

    comp = registry("models").get("dit")
    network = comp.build(comp.config(variant="digits", hidden=32, depth=1, heads=2)).network
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(t.shape, generator=g) * 0.2 for k, t in network.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    with plugins_for_test():
        weights = random_weights(folder / "dit.safetensors")
        job = folder / "serve.toml"
        job.write_text(f'[job]\nkind = "serve"\nport = 0\nmax_batch = 4\n{MODEL.format(weights=weights)}')
        server = make_server(prepare(job).config)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield Served(server.url, folder, weights, server.service)
        finally:
            server.shutdown()
            server.server_close()
            thread.join()


def call(served: Served, path: str, body: object = None, method: str | None = None) -> tuple[int, dict]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(served.url + path, data=data, method=method or ("GET" if data is None else "POST"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def png(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def generate_job(served: Served, name: str, settings: str, guidance: list[dict]) -> Path:
    """The equivalent ``generate`` job file's output folder, after running it."""
    tables = "".join("\n[[guidance]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in t.items()) for t in guidance)
    path = served.folder / f"{name}.toml"
    out = served.folder / name
    path.write_text(f'[job]\nkind = "generate"\noutput_dir = "{out}"\nprogress = false\n{settings}\n'
                    f'{MODEL.format(weights=served.weights)}{tables}')
    run(path)
    return out


def same_png(answer: str, params: dict, file: Path) -> None:
    got, want = png(answer), Image.open(file)
    assert got.tobytes() == want.tobytes() and got.mode == want.mode and got.size == want.size
    assert json.loads(got.text["parameters"]) == params == json.loads(want.text["parameters"])


def test_health_and_layers(served):
    assert call(served, "/health") == (200, {"status": "ok", "model": "dit", "device": "cpu"})
    assert call(served, "/layers") == (200, {"layers": ["blocks.0.attn"]})


CFG = {"name": "cfg", "scale": 2.0}
NAG_PAG = {"name": "nag-pag", "scale": 4.0, "layers": ["blocks.0.attn"]}


@pytest.mark.parametrize("guidance", [[CFG], pytest.param([CFG, NAG_PAG], marks=needs_guidance)],
                         ids=["cfg", "cfg+nag-pag"])
def test_generate_gives_the_generate_jobs_pngs(served, guidance):
    status, answer = call(served, "/generate", {"class_label": 3, "num_samples": 2, "sampling_steps": 3, "seed": 7,
                                                "cfg_scale": 1.0, "guidance": guidance})
    assert status == 200 and len(answer["images"]) == 2
    assert answer["parameters"][1] == {"model": "dit", "sampler": "euler", "sampling_steps": 3, "cfg_scale": 1.0,
                                       "seed": 7, "index": 1, "class_label": 3}
    out = generate_job(served, f"generate-{len(guidance)}", "class_label = 3\nnum_samples = 2\nsampling_steps = 3\n"
                                                            "seed = 7\ncfg_scale = 1.0", guidance)
    for i, (image, params) in enumerate(zip(answer["images"], answer["parameters"])):
        same_png(image, params, out / f"sample-{i:04d}.png")


@needs_guidance
def test_seed_names_reach_nag_pag(served):
    """``nag_pag_*`` build the same chain as an explicit ``nag-pag`` table, and it changes the image."""
    seed_api = {"class_label": 5, "num_inference_steps": 3, "guidance_scale": 2.0, "seed": 1,
                "nag_pag_scale": 4.0, "nag_pag_applied_layers": ["blocks.0.attn"]}
    status, answer = call(served, "/text-to-image", seed_api)
    assert status == 200
    generate = {"class_label": 5, "sampling_steps": 3, "cfg_scale": 2.0, "seed": 1}
    assert call(served, "/generate", {**generate, "guidance": [NAG_PAG]})[1]["images"] == answer["images"]
    plain = call(served, "/generate", generate)[1]["images"]
    assert png(plain[0]).tobytes() != png(answer["images"][0]).tobytes()


def test_image_to_image_matches_init_image_job(served):
    init = served.folder / "init.png"
    save_png(init, torch.linspace(-1, 1, 64).reshape(1, 8, 8), {})
    encoded = base64.b64encode(init.read_bytes()).decode()
    body = {"image": encoded, "strength": 0.5, "num_inference_steps": 4, "guidance_scale": 1.0, "class_label": 1,
            "seed": 3}
    status, answer = call(served, "/image-to-image", body)
    assert status == 200 and answer["parameters"][0]["strength"] == 0.5
    out = generate_job(served, "img2img", f'init_image = "{init}"\nstrength = 0.5\nsampling_steps = 4\n'
                                          'cfg_scale = 1.0\n'
                                          "class_label = 1\nseed = 3\nnum_samples = 1", [])
    same_png(answer["images"][0], answer["parameters"][0], out / "sample-0000.png")
    data_url = {**{k: v for k, v in body.items() if k != "image"}, "image_url": f"data:image/png;base64,{encoded}"}
    assert call(served, "/image-to-image", data_url)[1]["images"] == answer["images"]
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))     # as `base64` writes it
    assert call(served, "/image-to-image", {**body, "image": wrapped})[1]["images"] == answer["images"]
    # the default strength (0.8, diffusers') starts elsewhere on the schedule
    default = call(served, "/image-to-image", {k: v for k, v in body.items() if k != "strength"})[1]
    assert default["parameters"][0]["strength"] == 0.8 and default["images"] != answer["images"]


BAD = [
    ("/generate", {"class_label": 1, "cfg_scal": 2.0},
     "cfg_scal", "unknown key 'cfg_scal' (did you mean \"cfg_scale\"?)"),
    ("/generate", {"guidance": [{"name": "cfg", "scale": -1.0}]},
     "guidance[0].scale", "invalid value -1.0: 'scale' must be >= 0: -1.0"),
    ("/generate", {"guidance": [{"name": "cgf"}]},
     "guidance[0].name", "unknown guidance 'cgf' (did you mean \"cfg\"?)"),
    ("/generate", {"sampling_steps": 2.5}, "sampling_steps", "expected an integer, found a number 2.5"),
    ("/generate", {"class_label": 12}, "class_label", "class_label 12 is out of range: this model has 10 classes"),
    ("/generate", {"num_samples": 5}, "num_samples", "asks for at least 5 images; this server makes at most 4 per request"),
    ("/generate", {"class_label": 1, "num_samples": 2, "seeds": [1, 2, 3]}, None,
     "asks for 6 images; this server makes at most 4 per request"),
    ("/generate", {"device": "cuda"}, "device", "set by the server's job file, not per request"),
    ("/generate", {"init_image": "not base64!"}, "init_image", "expected a base64-encoded PNG"),
    ("/generate", {"reference_image": ["aGVsbG8="]}, "reference_image[0]",
     "found 5 bytes of no image format Pillow reads"),
    ("/generate", [1, 2], None, "expected a JSON object of settings, found an array"),
    ("/text-to-image", {"guidance_scale": -1.0}, "guidance_scale", "'guidance_scale' must be >= 0: -1.0"),
    ("/text-to-image", {"num_inference_steps": 3, "sampling_steps": 3}, "num_inference_steps",
     "give num_inference_steps or sampling_steps, not both"),
    ("/image-to-image", {"image_url": "https://example.com/cat.png"}, "image_url",
     "this server does not download images (it has no network access)"),
    ("/image-to-image", {"class_label": 1}, "image", "give the input image once"),
]
BAD_WITH_GUIDANCE = [
    ("/generate", {"guidance": [{"name": "nag-pag", "layers": ["blocks.7.attn"]}]}, "guidance[0].layers",
     "unknown attention layer 'blocks.7.attn' (did you mean \"blocks.0.attn\"?); this model has: blocks.0.attn"),
    ("/text-to-image", {"nag_pag_scale": 20.0}, "nag_pag_scale", "invalid value 20.0: 'nag_pag_scale' must be <= 10"),
    ("/text-to-image", {"nag_pag_applied_layers": ["transformer_blocks.8.attn"]}, "nag_pag_applied_layers",
     "unknown attention layer 'transformer_blocks.8.attn'"),
]


@pytest.mark.parametrize("endpoint, body, path, message",
                         BAD + [pytest.param(*case, marks=needs_guidance) for case in BAD_WITH_GUIDANCE])
def test_bad_request_is_a_400_with_the_job_file_message(served, endpoint, body, path, message):
    status, answer = call(served, endpoint, body)
    assert status == 400 and message in answer["error"], answer
    assert answer.get("path") == path
    if path:
        assert answer["error"].startswith(f"at {path}: ")


def test_not_json_unknown_endpoint_and_wrong_method(served):
    status, answer = call(served, "/generate", b"{class_label: 1}")
    assert status == 400 and answer["error"].startswith("the request body is not JSON")
    assert call(served, "/generate", b'{"cfg_scale": NaN}')[0] == 400
    status, answer = call(served, "/generate/x", {})
    assert status == 404 and "POST /generate" in answer["error"]
    status, answer = call(served, "/generate")
    assert (status, answer["error"]) == (405, "/generate takes POST, not GET")


def test_server_error_is_a_500_with_one_line(served, monkeypatch, capsys):
    def broken(model, x, sigmas, **kwargs):
        raise RuntimeError("sampler exploded\nsecond line")

    monkeypatch.setattr(served.service.pipeline, "sampler", broken)
    status, answer = call(served, "/generate", {"class_label": 1, "sampling_steps": 2})
    assert (status, answer) == (500, {"error": "internal error: RuntimeError: sampler exploded"})
    assert "Traceback" in capsys.readouterr().err     # the server's log keeps the details
    monkeypatch.undo()
    assert call(served, "/generate", {"class_label": 1, "sampling_steps": 2})[0] == 200   # the lock was released


def test_health_answers_while_a_generation_waits_for_the_model(served):
    answers = []
    with served.service.lock:       # as if another request were generating
        waiting = threading.Thread(target=lambda: answers.append(call(served, "/generate", {"class_label": 2})))
        waiting.start()
        assert call(served, "/health")[0] == 200
        waiting.join(0.5)
        assert waiting.is_alive() and not answers
    waiting.join(60)
    assert answers[0][0] == 200 and len(answers[0][1]["images"]) == 1


def test_cli_prints_the_port_and_stops_on_ctrl_c(tmp_path):
    job = tmp_path / "serve.toml"
    job.write_text(f'[job]\nkind = "serve"\nport = 0\noutput_dir = "{tmp_path / "out"}"\n'
                   + MODEL.replace('checkpoint = "{weights}"\n', ""))
    process = subprocess.Popen([sys.executable, "-m", "diffcore", "run", str(job)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert url and int(url.group(1)) > 0, line
        with urllib.request.urlopen(url.group(0) + "/health", timeout=30) as response:
            assert json.loads(response.read())["status"] == "ok"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "stopped" in out and "Traceback" not in err, err


def test_every_serve_setting_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "jobs.md").read_text()
    section = doc[doc.index('## `kind = "serve"`'):]
    missing = [a.name for a in attrs.fields(ServeSettings) if f"`{a.name}`" not in section]
    assert not missing, f"docs/jobs.md's serve section does not mention {missing}"
