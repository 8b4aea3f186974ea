"""The ``serve`` job: one model, loaded once, answering image requests over HTTP.

    [job]
    kind = "serve"
    port = 8000                  # 0: any free port (the address is printed at start)

    [model]
    family = "dit"

    [[guidance]]                 # the chain of every request that gives no `guidance`
    name = "nag-pag"
    layers = ["blocks.2.attn"]

Endpoints, JSON in and out:

- ``GET /health``; ``GET /layers``: the model's attention layer names (for ``layers = [...]``).
- ``POST /generate``: the ``generate`` job's ``[job]`` settings (``class_label``, ``prompt``,
  ``num_samples``, ``sampling_steps``, ``cfg_scale``, ``seed``, ``strength``, ...) and ``guidance``, an
  array of tables like the job file's ``[[guidance]]``; ``init_image``, ``reference_image``,
  ``image`` and ``mask`` are base64-encoded PNGs rather than file names. The answer is
  ``{"images": [base64 PNG, ...], "parameters": [...]}``, each PNG carrying its parameters in the
  text chunk the generate job writes.
- ``POST /text-to-image``, ``POST /image-to-image``: diffusers-style names. ``num_inference_steps``
  and ``guidance_scale`` are ``sampling_steps`` and ``cfg_scale``; fields plugins register with the
  ``register_request_fields`` hook set an option of a guidance entry of the chain (added at its
  end when there is none): diffcore-guidance's ``nag_pag_scale`` and ``nag_pag_applied_layers``
  are ``nag-pag``'s ``scale`` and ``layers``. The input image is ``image`` (base64) or
  ``image_url`` as a ``data:`` URL.

A request goes through the code that checks job files (``diffcore.config.structure``), so a
mistake is HTTP 400 with the message the job file would get, path included (``at
guidance[0].scale: ...``); anything else is a 500 with one line, the traceback in the server's log.
Besides the job file's checks a request meets the server's limits (``max_batch`` images,
``max_steps``, ``max_pixels`` for the output and each image sent), checked before any tensor is
made, so no request can ask for more memory or time than the job file allows; the HTTP limits
(body size, timeouts, open connections) are in ``diffcore.jobs.serve_http``.

Why the standard library's ``ThreadingHTTPServer`` and no web framework: the model runs one
request at a time behind a lock (a second generation would only split the same accelerator and
double the memory), so an asynchronous stack buys nothing here, and the core stays installable
with torch alone. The threads keep ``/health`` answering while a generation runs. The server is
for trusted networks: it binds to 127.0.0.1 unless told otherwise, and component fields can name
files on the server (learned guidance's ``checkpoint``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import attrs
from attrs import validators as v

from diffcore.config.spec import Spec, component, component_list
from diffcore.config.structure import structure, unstructure
from diffcore.errors import ConfigError
from diffcore.jobs import JobContext, JobSettings, rename_settings
from diffcore.jobs.generate import GenerateJob, GenerateSettings, LoraSettings
from diffcore.jobs.serve_http import JSONServer, Limits, Routes


@attrs.define
class ServeSettings(JobSettings):
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8000, validator=[v.ge(0), v.le(65535)])   # 0: any free port
    max_batch: int = attrs.field(default=4, validator=v.gt(0))   # most images one request may ask for
    max_steps: int = attrs.field(default=1000, validator=v.gt(0))
    max_pixels: int = attrs.field(default=2048 * 2048, validator=v.gt(0))   # output size and each image sent
    max_body_mb: int = attrs.field(default=16, validator=v.gt(0))
    timeout: float = attrs.field(default=30.0, validator=v.gt(0))   # seconds to send a request
    max_connections: int = attrs.field(default=16, validator=v.gt(0))

    @property
    def limits(self) -> Limits:
        return Limits(max_body=self.max_body_mb << 20, timeout=self.timeout, max_connections=self.max_connections)


@attrs.define(kw_only=True)
class ServeJob:
    job: ServeSettings = attrs.Factory(ServeSettings)
    model: Spec = component("models")
    sampler: Spec = component("samplers", default={"name": "euler"})
    schedule: Spec | None = component("schedules", optional=True)
    guidance: list[Spec] = component_list("guidance")
    lora: list[LoraSettings] = attrs.Factory(list)   # applied once, to every request


@attrs.define
class _RequestGuidance:
    """A request's ``guidance`` array, structured exactly as a job file's ``[[guidance]]``."""

    guidance: list[Spec] = component_list("guidance")


# generate settings that belong to the server: its device, its files, its terminal
SERVER_ONLY = ("output_dir", "device", "prompt_file", "progress", "grid")
IMAGE_KEYS = ("init_image", "reference_image", "image", "mask")
SEED_NAMES = {"num_inference_steps": "sampling_steps", "guidance_scale": "cfg_scale"}
# diffusers' StableDiffusionImg2ImgPipeline default
IMG2IMG_STRENGTH = 0.8


class Service:
    """The loaded model and what every request starts from. Requests are checked in parallel; the
    model runs one generation at a time."""

    def __init__(self, config: ServeJob):
        from diffcore.sampling.pipeline import Pipeline

        self.settings = config.job
        self.pipeline = Pipeline.build(config.model, config.sampler, config.schedule, device=config.job.device,
                                       loras=config.lora)
        self.bundle, self.device = self.pipeline.bundle, str(self.pipeline.device)
        self.names = {"model": config.model.name, "sampler": config.sampler.name,
                      **({"lora": [attrs.asdict(t) for t in config.lora]} if config.lora else {})}
        self.guidance = [unstructure(spec) for spec in config.guidance]   # as a request would write them
        self.fields = request_fields()
        self.lock = threading.Lock()

    def routes(self) -> Routes:
        return {"/health": ("GET", self.health), "/layers": ("GET", self.layers), "/generate": ("POST", self.generate),
                "/text-to-image": ("POST", lambda body: self.seed_api(body, image_to_image=False)),
                "/image-to-image": ("POST", lambda body: self.seed_api(body, image_to_image=True))}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.names["model"], "device": self.device}

    def layers(self) -> dict[str, Any]:
        from diffcore.nn.attention import attention_layers

        return {"layers": list(attention_layers(self.bundle.network))}

    def generate(self, body: Any, renames: dict[str, str] | None = None) -> dict[str, Any]:
        """``POST /generate``; ``renames`` maps generate names back to the ones the request used."""
        from diffcore.jobs.generate import generate_images

        renames = dict(renames or {})
        if isinstance(body, dict):   # old setting names: errors name them as the request did
            old_names = {old.removeprefix("job."): new.removeprefix("job.") for old, new in GenerateJob.renamed.items()}
            renames.update({new: old for old, new in old_names.items() if old in body})
        try:
            with tempfile.TemporaryDirectory(prefix="diffcore-serve-") as folder:
                settings, guidance = self.parse(body, Path(folder))
                with self.lock:
                    pipeline = attrs.evolve(self.pipeline, guidance=[spec.build() for spec in guidance])
                    images, params = generate_images(pipeline, settings, names=self.names)
        except ConfigError as exc:
            raise _renamed(exc, renames) from None
        return {"images": [_png_base64(image, p) for image, p in zip(images, params)], "parameters": params}

    def parse(self, body: Any, folder: Path) -> tuple[GenerateSettings, list[Spec]]:
        """The request as the generate code takes it, its images written to ``folder``."""
        from diffcore.jobs.generate import sample_plan

        body = rename_settings({"job": _json_object(body)}, GenerateJob.renamed)[0]["job"]
        for key in SERVER_ONLY:
            if key in body:
                raise ConfigError("set by the server's job file, not per request", path=key)
        tables = body.pop("guidance", self.guidance)
        base = {"device": self.device, "seed": self.settings.seed, "num_samples": 1,
                "batch_size": self.settings.max_batch, "progress": False, "grid": False}
        settings = structure({**base, **body}, GenerateSettings)
        guidance = structure({"guidance": tables}, _RequestGuidance).guidance
        self.check_limits(settings)
        count = sample_plan(settings, self.bundle)[2] * len(settings.seeds or [settings.seed])
        if count > self.settings.max_batch:
            raise ConfigError(f"this request asks for {count} images; this server makes at most "
                              f"{self.settings.max_batch} per request (its job.max_batch)")
        self.check_layers(guidance)
        return attrs.evolve(settings, **_write_images(settings, folder, self.settings.max_pixels)), guidance

    def check_limits(self, s: GenerateSettings) -> None:
        """The server's limits, before any tensor is made: a count the sample plan would build a
        tensor of (``num_samples = 1e12``) stops here, not in the allocator."""
        most = self.settings
        asked = {"num_samples": s.num_samples, "seeds": len(s.seeds or [])}
        if s.class_grid:
            asked["samples_per_class"] = s.samples_per_class
        for key, count in asked.items():
            if count > most.max_batch:
                raise ConfigError(f"asks for at least {count} images; this server makes at most {most.max_batch} per "
                                  "request (its job.max_batch)", path=key)
        if s.sampling_steps is not None and s.sampling_steps > most.max_steps:
            raise ConfigError(f"{s.sampling_steps} steps; this server runs at most {most.max_steps} (its "
                              f"job.max_steps)", path="sampling_steps")
        if (s.height or 1) * (s.width or 1) > most.max_pixels:
            size = f"{s.width or '?'}x{s.height or '?'}"
            raise ConfigError(f"a {size} image is more than this server makes: at most {most.max_pixels} pixels "
                              f"(its job.max_pixels)", path="height" if (s.height or 1) > (s.width or 1) else "width")

    def check_layers(self, guidance: list[Spec]) -> None:
        """A layer the model lacks is the request's mistake: say where before sampling starts
        (the engine would raise the same message at the first step, without the path)."""
        from diffcore.nn.attention import resolve_layers

        for i, spec in enumerate(guidance):
            layers = getattr(spec.config, "layers", None)
            if layers:
                try:
                    resolve_layers(self.bundle.network, list(layers), self.bundle.attention_alias)
                except ConfigError as exc:
                    raise ConfigError(exc.detail, path=f"guidance[{i}].layers") from None

    def seed_api(self, body: Any, *, image_to_image: bool) -> dict[str, Any]:
        """``POST /text-to-image`` and ``/image-to-image``: diffusers' names put into generate's."""
        body, renames = _json_object(body), {}
        for seed_name, name in SEED_NAMES.items():
            if seed_name in body:
                if name in body:
                    raise ConfigError(f"give {seed_name} or {name}, not both", path=seed_name)
                body[name] = body.pop(seed_name)
                renames[name] = seed_name
        self._guidance_fields(body, renames)
        given = [key for key in ("image", "image_url") if key in body]
        if not image_to_image:
            if given:
                raise ConfigError("/text-to-image takes no input image; send it to /image-to-image", path=given[0])
            return self.generate(body, renames)
        if len(given) != 1 or "init_image" in body:
            raise ConfigError("give the input image once: image (base64 PNG) or image_url (a data: URL)",
                              path="image")
        image = body.pop(given[0])
        if given[0] == "image_url" and isinstance(image, str) and not image.startswith("data:"):
            raise ConfigError("this server does not download images (it has no network access); send the image "
                              "itself, base64-encoded in image or as a data: URL", path="image_url")
        body["init_image"] = image
        renames["init_image"] = given[0]
        body.setdefault("strength", IMG2IMG_STRENGTH)
        return self.generate(body, renames)

    def _guidance_fields(self, body: dict[str, Any], renames: dict[str, str]) -> None:
        """Registered request fields tune their guidance entry of the chain, or add one at its end."""
        given = {key: body.pop(key) for key in self.fields if key in body}
        if not given:
            return
        tables = body.get("guidance", self.guidance)
        if not isinstance(tables, list):
            raise ConfigError("expected an array of tables ([[guidance]]), found something else", path="guidance")
        tables = [dict(t) if isinstance(t, dict) else t for t in tables]
        for key, value in given.items():
            name, option = self.fields[key]
            i = next((i for i, t in enumerate(tables) if isinstance(t, dict) and t.get("name") == name), None)
            if i is None:
                i = len(tables)
                tables.append({"name": name})
            tables[i][option] = value
            renames[f"guidance[{i}].{option}"] = key
        body["guidance"] = tables


def request_fields(plugins: Any = None) -> dict[str, tuple[str, str]]:
    """The HTTP fields plugins register (``register_request_fields``): field -> (guidance, option).
    A field two plugins map differently is an error naming both."""
    from diffcore.errors import PluginError
    from diffcore.plugins import get_plugins

    plugins = plugins or get_plugins()
    fields: dict[str, tuple[str, str]] = {}
    owners: dict[str, str] = {}
    for impl in plugins.pm.hook.register_request_fields.get_hookimpls():
        def register(field: str, *, guidance: str, option: str, _plugin: str = impl.plugin_name) -> None:
            if field in fields and fields[field] != (guidance, option):
                raise PluginError(f"request field {field!r} is registered by two plugins: {owners[field]} and "
                                  f"{_plugin}")
            fields[field], owners[field] = (guidance, option), _plugin

        impl.function(register=register)
    return fields


def _json_object(body: Any) -> dict[str, Any]:
    """The request's settings; ``null`` means the server's default, as if the key were absent."""
    if not isinstance(body, dict):
        found = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}
        raise ConfigError(f"expected a JSON object of settings, found {found.get(type(body), 'a number')}")
    return {key: value for key, value in body.items() if value is not None}


def _renamed(exc: ConfigError, renames: dict[str, str]) -> ConfigError:
    """``exc`` in the request's own names: the diffusers-style ones where it used them, and without the
    ``job.`` the generate code's own checks put in front of a setting."""
    path, detail = (exc.path or "").removeprefix("job."), exc.detail
    for name, used in renames.items():
        if path == name or path.startswith((f"{name}.", f"{name}[")):
            path = used + path[len(name):]
            detail = detail.replace(repr(name.rsplit(".", 1)[-1]), repr(used))  # attrs names the field
            break
    return ConfigError(detail, file=exc.file, path=path or None)


def _write_images(s: GenerateSettings, folder: Path, max_pixels: int) -> dict[str, Any]:
    """The request's base64 images as files, so they load exactly as a job file's images do."""
    files: dict[str, Any] = {}
    for key in IMAGE_KEYS:
        value = getattr(s, key)
        if isinstance(value, list):
            files[key] = [_write_image(data, folder / f"{key}-{i}", f"{key}[{i}]", max_pixels)
                          for i, data in enumerate(value)]
        elif value is not None:
            files[key] = _write_image(value, folder / key, key, max_pixels)
    return files


def _write_image(data: str, path: Path, where: str, max_pixels: int) -> str:
    """Decode and check one image; its size is checked from the header, before its pixels are
    decompressed (a few kilobytes of PNG can hold gigabytes of pixels)."""
    from PIL import Image, UnidentifiedImageError

    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise ConfigError(f"expected a base64 data: URL (data:image/png;base64,...), found {header[:40]!r}",
                              path=where)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):    # line breaks (base64's 76-column lines) are fine; nothing else
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"expected a base64-encoded PNG, found text that is not base64 ({exc})",
                              path=where) from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.width * image.height > max_pixels:
                raise ConfigError(f"the image is {image.width}x{image.height} ({image.width * image.height} pixels); "
                                  f"this server takes at most {max_pixels} (its job.max_pixels)", path=where)
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = "no image format Pillow reads" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ConfigError(f"expected a base64-encoded PNG, found {len(raw)} bytes of {reason}", path=where) from None
    path.write_bytes(raw)
    return str(path)


def _png_base64(image: Any, params: dict[str, Any]) -> str:
    """The PNG the generate job would write for this image (same ``parameters`` chunk), base64."""
    from PIL import PngImagePlugin

    from diffcore.io.images import PARAMS_KEY, to_pil

    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True, default=str))
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class DiffcoreServer(JSONServer):
    """The HTTP server with the ``Service`` its routes call."""

    service: Service


def make_server(config: ServeJob) -> DiffcoreServer:
    """Bind first (a busy port fails before a long model load), then load the model."""
    server = DiffcoreServer(config.job.host, config.job.port, config.job.limits)
    try:
        server.service = Service(config)
    except BaseException:
        server.server_close()
        raise
    server.routes = server.service.routes()
    return server


def run_serve(config: ServeJob, ctx: JobContext) -> None:
    server = None
    try:
        server = make_server(config)
        print(f"diffcore serve: {config.model.name} on {server.url} (Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:   # handler threads are daemons: a generation in flight does not hold the exit
        print("diffcore serve: stopped", flush=True)
    finally:
        if server is not None:
            server.server_close()
