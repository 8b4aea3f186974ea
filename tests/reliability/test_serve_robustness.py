"""The serve job under bad requests and load, against a real server process on a local port.

A tiny DiT (random weights, so every label and seed gives its own image) is served by
``diffcore run serve.toml`` in a subprocess, the way a user starts it. Every bad request in the
tables is a 4xx whose JSON ``error`` reads like a job file's message (the field's path first,
then what was expected); stalled clients hold nothing but their own connection; 100 good
requests from 8 threads, with bad ones and a stalled client interleaved, all get the image a
quiet server gives; and the server's peak memory (``VmHWM``) grows by less than ``MEMORY_BOUND``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("diffcore_dit")
if not Path("/proc/self/status").exists():
    pytest.skip("the memory figures come from /proc/<pid>/status (Linux)", allow_module_level=True)

TIMEOUT = 2.5           # the server's job.timeout, short so stalled clients are dropped quickly
CONNECTIONS = 16        # the server's job.max_connections
MAX_BODY = 16 << 20     # the default job.max_body_mb
MEMORY_BOUND = 100 << 20    # the server's peak RSS may grow by less than this over all the tests here
GOOD, THREADS, HANG_UPS = 100, 8, 4
COMBOS = [(label, seed) for label in (0, 3, 7) for seed in (1, 2, 3)]   # (class_label, seed) of good requests

JOB = """job = {{kind = "serve", port = 0, output_dir = "{out}", max_batch = 4, timeout = {timeout}, \
max_connections = {connections}}}
model = {{family = "dit", variant = "digits", hidden = 32, depth = 1, heads = 2, checkpoint = "{weights}"}}
"""


def random_weights(path: Path) -> Path:
    """A fresh DiT outputs zero (adaLN-Zero): random weights make every label and seed differ."""
    from safetensors.torch import save_file

    from diffcore.plugins import registry
    from diffcore.testing import plugins_for_test

    with plugins_for_test():
        comp = registry("models").get("dit")
        network = comp.build(comp.config(variant="digits", hidden=32, depth=1, heads=2)).network
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(t.shape, generator=g) * 0.2 for k, t in network.state_dict().items()}, str(path))
    return path


def memory(pid: int) -> dict[str, int]:
    """The process's current (VmRSS) and peak (VmHWM) resident memory, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) << 10 for key in ("VmRSS", "VmHWM")}


class Server:
    def __init__(self, process: subprocess.Popen, host: str, port: int, log: Path):
        self.process, self.host, self.port, self.log = process, host, port, log
        self.baseline: dict[str, int] = {}
        self.reference: dict[tuple[int, int], str] = {}

    def connect(self, timeout: float = 60) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)

    def call(self, path: str, body: object = None, method: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        """(status, JSON answer, headers) of one request; ``body`` bytes go as they are."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            connection.request(method or ("GET" if data is None else "POST"), path, body=data, headers=headers or {})
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null"), dict(response.getheaders())
        finally:
            connection.close()

    def raw(self, data: bytes, *, half_close: bool = False) -> tuple[int, dict]:
        """Send ``data`` as it is on a socket (malformed requests http.client would not send)."""
        with self.connect() as sock:
            try:
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass    # the server answered before reading all of it: the answer is still there
            return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-robustness")
    job = folder / "serve.toml"
    job.write_text(JOB.format(timeout=TIMEOUT, connections=CONNECTIONS, out=folder / "out",
                              weights=random_weights(folder / "dit.safetensors")))
    out, log = folder / "stdout.txt", folder / "stderr.txt"
    with open(out, "w") as stdout, open(log, "w") as stderr:   # files, not pipes: a full pipe would stall it
        process = subprocess.Popen([sys.executable, "-m", "diffcore", "run", str(job)], stdout=stdout,
                                   stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (url := re.search(r"http://([\d.]+):(\d+)", out.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        served = Server(process, url.group(1), int(url.group(2)), log)
        for label, seed in COMBOS:     # the answers of a quiet server, and the warm-up before measuring
            status, answer, _ = served.call("/generate", good(label, seed))
            assert status == 200, answer
            served.reference[label, seed] = answer["images"][0]
        served.baseline = memory(process.pid)
        yield served
    finally:
        process.terminate()
        process.wait(30)


def good(label: int, seed: int) -> dict:
    return {"class_label": label, "seed": seed, "num_steps": 2}


def png_base64(size: tuple[int, int], mode: str = "L") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_header_only(width: int, height: int) -> str:
    """A valid PNG header claiming ``width`` x ``height`` grey pixels, with one row of data: what a
    decompression bomb looks like until it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
                            + chunk(b"IEND", b"")).decode()


SMALL_PNG = png_base64((8, 8))
TEN_MB = 10 << 20

# (case, endpoint, body, status, path or None, message fragment); a body of bytes goes as it is
BAD = [
    ("invalid JSON", "/generate", b"{class_label: 1}", 400, None, "the request body is not JSON: Expecting property"),
    ("truncated JSON", "/generate", b'{"class_label": 1', 400, None, "the request body is not JSON"),
    ("not UTF-8", "/generate", b'{"prompt": "\xff\xfe"}', 400, None, "the request body is not JSON"),
    ("empty body", "/generate", b"", 400, None, "the request body is not JSON"),
    ("JSON array", "/generate", b"[1, 2]", 400, None, "expected a JSON object of settings, found an array"),
    ("JSON string", "/generate", b'"class_label"', 400, None, "expected a JSON object of settings, found a string"),
    ("JSON null", "/text-to-image", b"null", 400, None, "expected a JSON object of settings, found null"),
    ("NaN", "/generate", b'{"cfg_scale": NaN}', 400, None, "NaN is not a number JSON allows"),
    ("Infinity", "/generate", b'{"cfg_scale": -Infinity}', 400, None, "-Infinity is not a number JSON allows"),
    ("1e999", "/generate", b'{"cfg_scale": 1e999}', 400, "cfg_scale", "found one too large for a 64-bit float"),
    ("huge integer", "/generate", b'{"seed": 1' + b"0" * 30 + b"}", 400, "seed",
     "expected an integer that fits in 64 bits, found one of 31 digits"),
    ("huge seed in a list", "/generate", b'{"seeds": [1, 99999999999999999999]}', 400, "seeds[1]", "fits in 64 bits"),
    ("duplicate key", "/generate", b'{"seed": 1, "seed": 2}', 400, None, "the key 'seed' is given twice"),
    ("deep nesting", "/generate", b'{"guidance": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "guidance" + "[0]" * 32,
     "nested deeper than 32 levels"),
    # wrong types, field by field
    ("steps as text", "/generate", {"num_steps": "3"}, 400, "num_steps", "expected an integer, found a string '3'"),
    ("steps fractional", "/generate", {"num_steps": 2.5}, 400, "num_steps", "expected an integer, found a number 2.5"),
    ("label as bool", "/generate", {"class_label": True}, 400, "class_label", "expected an integer, found a boolean"),
    ("cfg as text", "/generate", {"cfg_scale": "high"}, 400, "cfg_scale", "expected a number, found a string 'high'"),
    ("seeds as text", "/generate", {"seeds": "1,2"}, 400, "seeds", "expected an array of integers, found a string"),
    ("seed in list as text", "/generate", {"seeds": [1, "2"]}, 400, "seeds[1]", "expected an integer, found a string"),
    ("prompt as number", "/generate", {"prompt": 5}, 400, "prompt", "expected a string or an array of strings"),
    ("class_grid as text", "/generate", {"class_grid": "yes"}, 400, "class_grid", "expected true or false"),
    ("strength as list", "/image-to-image", {"image": SMALL_PNG, "strength": [0.5]}, 400, "strength",
     "expected a number, found an array"),
    ("guidance a table", "/generate", {"guidance": {"name": "cfg"}}, 400, "guidance",
     "expected an array of tables ([[guidance]]), found a table"),
    ("guidance entry text", "/generate", {"guidance": ["cfg"]}, 400, "guidance[0]", "expected a table, found a string"),
    ("guidance scale text", "/generate", {"guidance": [{"name": "cfg", "scale": "2"}]}, 400, "guidance[0].scale",
     "expected a number, found a string '2'"),
    ("image as number", "/generate", {"init_image": 123}, 400, "init_image", "expected a string, found an integer"),
    ("steps a huge text", "/generate", {"num_steps": "x" * 5000}, 400, "num_steps", "characters]"),
    # ranges: zero, negative, huge
    ("zero steps", "/generate", {"num_steps": 0}, 400, "num_steps", "invalid value 0: 'num_steps' must be > 0"),
    ("negative steps", "/text-to-image", {"num_inference_steps": -3}, 400, "num_inference_steps",
     "'num_inference_steps' must be > 0"),
    ("huge steps", "/generate", {"num_steps": 10 ** 12}, 400, "num_steps",
     "1000000000000 steps; this server runs at most 1000 (its job.max_steps)"),
    ("zero samples", "/generate", {"num_samples": 0}, 400, "num_samples", "'num_samples' must be > 0"),
    ("huge samples", "/generate", {"class_label": 1, "num_samples": 10 ** 12}, 400, "num_samples",
     "asks for at least 1000000000000 images; this server makes at most 4 per request (its job.max_batch)"),
    ("huge class grid", "/generate", {"class_grid": True, "samples_per_class": 10 ** 12}, 400, "samples_per_class",
     "this server makes at most 4 per request"),
    ("too many seeds", "/generate", {"seeds": list(range(5))}, 400, "seeds", "asks for at least 5 images"),
    ("batch zero", "/generate", {"batch_size": 0}, 400, "batch_size", "'batch_size' must be > 0"),
    ("negative width", "/generate", {"width": -8}, 400, "width", "'width' must be > 0"),
    ("zero height", "/generate", {"height": 0}, 400, "height", "'height' must be > 0"),
    ("huge width and height", "/generate", {"width": 8192, "height": 8192}, 400, "width",
     "a 8192x8192 image is more than this server makes: at most 4194304 pixels (its job.max_pixels)"),
    ("huge width alone", "/generate", {"width": 10 ** 9}, 400, "width", "'width' must be <= 8192"),
    ("huge height", "/generate", {"width": 100000, "height": 100000}, 400, "height", "'height' must be <= 8192"),
    ("width this model lacks", "/generate", {"width": 16}, 400, "width", "this DiT makes 8x8 images"),
    ("negative seed", "/generate", {"seed": -1}, 400, "seed", "invalid value -1: 'seed' must be >= 0"),
    ("label out of range", "/generate", {"class_label": 10}, 400, "class_label", "this model has 10 classes"),
    ("negative cfg", "/text-to-image", {"guidance_scale": -1.0}, 400, "guidance_scale", "must be >= 0"),
    ("strength zero", "/image-to-image", {"image": SMALL_PNG, "strength": 0}, 400, "strength", "must be > 0"),
    ("strength above 1", "/generate", {"strength": 1.5}, 400, "strength", "must be <= 1"),
    # unknown fields, with did-you-mean
    ("unknown field", "/generate", {"cfg_scal": 2.0}, 400, "cfg_scal",
     "unknown key 'cfg_scal' (did you mean \"cfg_scale\"?)"),
    ("unknown field 2", "/text-to-image", {"sampling_step": 2}, 400, "sampling_step",
     "(did you mean \"sampling_steps\"?)"),
    ("unknown nested field", "/generate", {"guidance": [{"name": "cfg", "scael": 2.0}]}, 400, "guidance[0].scael",
     "unknown key 'scael' (did you mean \"scale\"?)"),
    ("unknown guidance", "/generate", {"guidance": [{"name": "cgf"}]}, 400, "guidance[0].name",
     "unknown guidance 'cgf' (did you mean \"cfg\"?)"),
    ("server's own field", "/generate", {"output_dir": "/tmp"}, 400, "output_dir", "set by the server's job file"),
    # images
    ("image not base64", "/image-to-image", {"image": "not base64!"}, 400, "image", "found text that is not base64"),
    ("image not an image", "/generate", {"init_image": base64.b64encode(b"hello").decode()}, 400, "init_image",
     "found 5 bytes of no image format Pillow reads"),
    ("image truncated", "/generate", {"init_image": png_base64((64, 64), "RGB")[:60]}, 400, "init_image",
     "expected a base64-encoded PNG, found 45 bytes of"),
    ("image too many pixels", "/image-to-image", {"image": png_base64((2100, 2100))}, 400, "image",
     "the image is 2100x2100 (4410000 pixels); this server takes at most 4194304 (its job.max_pixels)"),
    ("image header claims 10000x10000", "/generate", {"mask": png_header_only(10000, 10000)}, 400, "mask",
     "the image is 10000x10000 (100000000 pixels); this server takes at most 4194304"),
    ("decompression bomb", "/generate", {"image": png_header_only(20000, 20000)}, 400, "image",
     "(400000000 pixels) exceeds limit"),
    ("reference too many pixels", "/generate", {"reference_image": [SMALL_PNG, png_base64((1, 5000 * 1000))]}, 400,
     "reference_image[1]", "the image is 1x5000000"),
    ("data URL not base64", "/image-to-image", {"image_url": "data:image/png," + SMALL_PNG}, 400, "image_url",
     "expected a base64 data: URL"),
    ("image URL", "/image-to-image", {"image_url": "https://example.com/cat.png"}, 400, "image_url",
     "this server does not download images"),
    ("10 MB image field", "/generate", b'{"init_image": "' + b"A" * TEN_MB + b'"}', 400, "init_image",
     f"found {TEN_MB * 3 // 4} bytes of no image format Pillow reads"),
    ("10 MB string for a number", "/generate", {"class_label": "7" * TEN_MB}, 400, "class_label",
     "expected an integer, found a string '777"),
    ("10 MB of values", "/generate", b"[" + b"1," * (TEN_MB // 2 - 1) + b"1]", 413, None,
     f"the body holds about {TEN_MB // 2} JSON values; this server takes at most 10000"),
    # routing
    ("unknown path", "/generat", {}, 404, None, "no endpoint /generat; this server has: GET /health"),
    ("GET a POST endpoint", "/generate", None, 405, None, "/generate takes POST, not GET"),
    ("POST a GET endpoint", "/health", {}, 405, None, "/health takes GET, not POST"),
]
BAD_BY_NAME = {case[0]: case[1:] for case in BAD}


def check_bad(served: Server, endpoint: str, body: object, status: int, path: str | None, message: str) -> None:
    got, answer, _ = served.call(endpoint, body)
    assert (got, answer.get("path")) == (status, path), answer
    assert message in (error := answer["error"]) and len(error) <= 1000, error
    if path:
        assert error.startswith(f"at {path}: "), error


@pytest.mark.parametrize("case", [case[0] for case in BAD])
def test_bad_request_is_a_4xx_naming_the_field(server, case):
    check_bad(server, *BAD_BY_NAME[case])


RAW = [  # (case, bytes on the wire, close our side after sending, status, message fragment)
    ("no Content-Length", b"POST /generate HTTP/1.1\r\nHost: x\r\n\r\n{}", False, 411,
     "a POST needs a Content-Length header"),
    ("chunked body", b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
     False, 411, "this server does not take chunked bodies"),
    ("Content-Length not a number", b"POST /generate HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", False, 400,
     "the Content-Length header must be a byte count, found '-5'"),
    ("Content-Length past the body", b"POST /generate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}", True, 400,
     "the body ended after 2 of the 100 bytes its Content-Length declared"),
    ("20 MB body", b"POST /generate HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (20 << 20) + b" " * (20 << 20), False,
     413, f"the body has {20 << 20} bytes; this server takes at most {MAX_BODY} (16 MiB, its job.max_body_mb)"),
    ("1 TB declared", b"POST /generate HTTP/1.1\r\nContent-Length: %d\r\n\r\n{}" % (1 << 40), False, 413,
     "this server takes at most"),
    ("PUT", b"PUT /generate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", False, 405, "/generate takes POST, not PUT"),
    ("DELETE", b"DELETE /health HTTP/1.1\r\n\r\n", False, 405, "/health takes GET, not DELETE"),
    ("unknown method", b"BREW /generate HTTP/1.1\r\n\r\n", False, 405, "/generate takes POST, not BREW"),
    ("malformed request line", b"GET\r\n\r\n", False, 400, "Bad request syntax ('GET')"),
    ("unknown HTTP version", b"GET /health HTTP/9.x\r\n\r\n", False, 400, "Bad request version ('HTTP/9.x')"),
    ("header line too long", b"GET /health HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", False, 431, "Line too long"),
]


@pytest.mark.parametrize("case, data, half_close, status, message", RAW, ids=[case[0] for case in RAW])
def test_malformed_http_is_answered_in_json(server, case, data, half_close, status, message):
    got, answer = server.raw(data, half_close=half_close)
    assert got == status and message in answer["error"], answer


def test_head_is_a_405_without_a_body(server):
    status, answer, headers = server.call("/generate", method="HEAD")
    assert (status, answer, headers["Allow"]) == (405, None, "POST")


def stall(served: Server, data: bytes) -> socket.socket:
    """A client that sends ``data`` and then nothing more."""
    (sock := served.connect()).sendall(data)
    return sock


def test_stalled_clients_hold_only_their_own_connection(server):
    started = time.monotonic()
    headers_only = stall(server, b"POST /generate HTTP/1.1\r\nContent-Length: 50\r\n\r\n")
    half_body = stall(server, b'POST /generate HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"class_label":')
    half_headers = stall(server, b"POST /generate HTTP/1.1\r\nContent-Le")
    status, answer, _ = server.call("/generate", good(3, 1))
    assert status == 200 and answer["images"][0] == server.reference[3, 1]
    assert not select.select([headers_only, half_body, half_headers], [], [], 0)[0]    # it did not wait for them
    for sock in (headers_only, half_body):
        status, answer = read_answer(sock)
        assert status == 408 and "the body was not sent within 2.5 seconds (job.timeout)" in answer["error"], answer
        sock.close()
    assert half_headers.recv(100) == b""    # mid-headers, the server just hangs up
    half_headers.close()
    assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 10


def test_connections_over_the_cap_are_a_503_until_some_close(server):
    stalled = [stall(server, b"GET /health HTTP/1.1\r\n") for _ in range(CONNECTIONS)]
    deadline = time.monotonic() + TIMEOUT
    while (answer := server.call("/health"))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.05)    # until the server has accepted them all
    status, answer, headers = answer
    assert (status, headers.get("Retry-After")) == (503, "1"), answer
    assert f"{CONNECTIONS} connections are open (its job.max_connections)" in answer["error"]
    for sock in stalled:
        assert sock.recv(100) == b""        # dropped after job.timeout
        sock.close()
    assert server.call("/health")[0] == 200


LOAD_BAD = ["invalid JSON", "JSON array", "NaN", "steps as text", "huge steps", "huge samples", "unknown field",
            "unknown nested field", "image not base64", "image too many pixels", "10 MB image field", "unknown path",
            "label out of range", "deep nesting"]
LOAD_BAD += [case for case in LOAD_BAD if "10 MB" not in case]     # twice; 10 MB bodies once (one at a time)


def test_100_requests_from_8_threads_with_bad_ones_between(server):
    jobs = [("good", COMBOS[i % len(COMBOS)]) for i in range(GOOD)]
    for i, case in enumerate(LOAD_BAD):
        jobs.insert(4 * i + 2, ("bad", case))
    for i in range(HANG_UPS):
        jobs.insert(25 * i + 10, ("hang-up", COMBOS[i]))
        jobs.insert(25 * i + 20, ("health", None))
    answered, slow = {"good": 0, "bad": 0, "hang-up": 0, "health": 0}, {}

    def work(job):
        kind, what = job
        if kind == "bad":
            check_bad(server, *BAD_BY_NAME[what])
        elif kind == "hang-up":     # a client that sends a request and leaves before the answer
            with server.connect() as sock:
                sock.sendall(b"POST /generate HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body := json.dumps(good(*what)).encode()), body))
        elif kind == "health":
            assert server.call("/health")[:2] == (200, {"status": "ok", "model": "dit", "device": "cpu"})
        else:
            status, answer, _ = server.call("/generate", good(*what))
            assert status == 200, answer
            assert answer["images"][0] == server.reference[what]     # the image a quiet server gives
        return kind

    def slow_client():      # a client that stalls mid-body while the load runs
        sock = stall(server, b"POST /generate HTTP/1.1\r\nContent-Length: 40\r\n\r\n{")
        slow["status"] = read_answer(sock)[0]
        sock.close()

    started = time.monotonic()
    stalled = threading.Thread(target=slow_client)
    stalled.start()
    with ThreadPoolExecutor(THREADS) as pool:
        for kind in pool.map(work, jobs):
            answered[kind] += 1
    stalled.join(30)
    took = time.monotonic() - started
    assert (answered, slow) == ({"good": GOOD, "bad": len(LOAD_BAD), "hang-up": HANG_UPS, "health": HANG_UPS},
                                {"status": 408})
    assert server.process.poll() is None and server.call("/health")[0] == 200
    after = memory(server.process.pid)
    grew = after["VmHWM"] - server.baseline["VmHWM"]
    print(f"\nserve under load: {GOOD} good + {len(LOAD_BAD)} bad + {HANG_UPS} hung-up + {HANG_UPS} /health "
          f"requests from {THREADS} threads and a stalled client in {took:.1f} s; "
          f"peak RSS {server.baseline['VmHWM'] >> 20} MiB after warm-up -> {after['VmHWM'] >> 20} MiB "
          f"(+{grew / 2 ** 20:.1f} MiB over every test in this file), RSS now {after['VmRSS'] >> 20} MiB")
    assert grew < MEMORY_BOUND
    assert "Traceback" not in (log := server.log.read_text()), log[-3000:]      # no request was a 500
