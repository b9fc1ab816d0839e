"""The HTTP API (A1111 / SD.Next-compatible and native) and the web page, over one engine and its job queue.

Errors are JSON `{"error": <type>, "detail": <message>}` with the status the error type carries (4xx for the
caller's mistakes, 5xx only for real faults), and the same message the CLI prints.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..engine import Engine
from ..errors import AuthError, ImpromptError, MethodNotAllowedError, NotFoundError, PayloadTooLargeError, bounded
from ..errors import RequestError
from ..conditioning.controlnet import DEFAULT_RESOLUTION
from ..preprocess import detect, locate_weights
from ..util.images import load_image
from ..models import catalog
from ..conditioning.loras import lora_fits
from ..plan import describe_store
from ..request import validation_error
from .a1111 import OPTION_DEFAULTS, Img2ImgPayload, Txt2ImgPayload, apply_options, png_base64, to_response
from .controlnet import control_types, detect_module, model_list, module_list, module_warnings, slider_values
from .sdnext import DetectPayload, control_response, from_control_payload, named_unit, pulid_script_request
from .sdnext import sdnext_preprocessor_list
from .jobs import JobQueue
from .origins import add_origin_checks

log = logging.getLogger("imprompt")


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 64 * 2**20
    max_queue: int = 16
    batch_max: int | None = None  # rows one batched pipeline call may hold (None: sized from device memory, jobs.py)
    batch_wait: float = 0.0  # seconds the worker waits for jobs to batch with the one it took (0: no batching)
    model: str | None = None  # the current model (A1111's sd_model_checkpoint)
    preload: bool = False  # load the current model while the server starts (`imprompt serve` does)
    # Who may call it from a browser (server/origins.py): host names it answers to besides loopback and the address
    # a connection came in on ("*": any), and other sites' pages that may call it (A1111's CORS flags)
    allowed_hosts: tuple[str, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    cors_allow_origins_regex: str | None = None


def create_app(engine: Engine, settings: ServerSettings | None = None, jobs=None) -> FastAPI:
    """`jobs`: who runs the generations — by default one `JobQueue` over `engine`; a cluster's ingress passes its
    `cluster.ingress.ClusterJobs` (same methods), and `engine` then only plans (lists models, refuses requests)."""
    settings = settings or ServerSettings()
    jobs = jobs if jobs is not None else JobQueue(engine, settings.max_queue, settings.batch_max, settings.batch_wait)
    # the current model (A1111's sd_model_checkpoint) and the other options POST /sdapi/v1/options set
    state = {"model": settings.model or _first_model(engine), "options": dict(OPTION_DEFAULTS)}
    if settings.preload and state["model"]:
        jobs.preload(state["model"])
    app = FastAPI(
        title="imprompt",
        version=__version__,
        description="Stable Diffusion with image prompts (IP-Adapters): A1111/SD.Next-compatible and native API.",
    )
    # Bodies that do not declare their length (chunked) are limited while they stream, route by route (inside the
    # exception handlers, so the 413 has imprompt's JSON shape); a declared Content-Length is refused by `Limits`.
    app.router.max_body_size = settings.max_body_bytes
    app.state.engine, app.state.jobs = engine, jobs

    # ------------------------------------------------------------------------------------------------ errors

    # Every answer's detail goes through `bounded`: whatever value a message repeats, the answer stays small.

    @app.exception_handler(ImpromptError)
    async def imprompt_error(request: Request, exc: ImpromptError):
        headers = {"WWW-Authenticate": AUTH_CHALLENGE} if isinstance(exc, AuthError) else None
        return JSONResponse({"error": type(exc).__name__, "detail": bounded(str(exc))}, exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_payload(request: Request, exc: RequestValidationError):
        """A payload of the wrong shape: 422 naming each field, or 413 for a list over its ceiling."""
        error = validation_error(exc.errors())
        return JSONResponse({"error": type(error).__name__, "detail": bounded(str(error))}, error.http_status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """The framework's own answers (unknown route, wrong method, body over the limit) in imprompt's shape."""
        if exc.status_code == 413:
            error: ImpromptError = _too_large(None, settings.max_body_bytes)
        elif exc.status_code == 404:
            error = NotFoundError(f"no such endpoint: {request.method} {request.url.path}; the API is listed at /docs")
        elif exc.status_code == 405:
            error = MethodNotAllowedError(f"{request.url.path} does not take {request.method}; the API is listed at /docs")
        else:
            return JSONResponse({"error": "HTTPError", "detail": bounded(str(exc.detail))}, exc.status_code,
                                headers=exc.headers)  # fmt: skip
        return JSONResponse({"error": type(error).__name__, "detail": bounded(str(error))}, exc.status_code,
                            headers=exc.headers)  # fmt: skip

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception):
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc, exc_info=exc)
        detail = bounded(f"internal error: {type(exc).__name__}: {exc}")
        return JSONResponse({"error": "InternalError", "detail": detail}, 500)

    # --------------------------------------------------------------------------------------- A1111 / SD.Next

    async def generate(payload: Txt2ImgPayload, http: Request) -> dict:
        """Handlers await their job on the event loop: no thread is held while it waits in the queue."""
        # reading the payload may read the disk
        converted = await run_in_threadpool(pulid_script_request, payload, state["model"], engine.store,
                                            state["options"])  # to_request, SD.Next's PuLID script read first
        engine.check_limits(converted.request)  # before the job is queued, before any image is decoded
        results = await run_named(converted, payload.n_iter, http)
        units = results[0].info["ip_adapters"] if results else []
        warnings = converted.warnings + module_warnings(converted.modules, units, engine.store)
        limits = (engine.state.limits.max_image_pixels, engine.state.limits.max_image_bytes)
        # PNG encoding off the event loop
        return await run_in_threadpool(to_response, results, payload, warnings, converted.input_maps, limits,
                                       converted.own_controlnets)  # fmt: skip

    async def run_named(converted, iterations: int, http: Request) -> list:
        """Run a converted request; an error about one of its ControlNet units names the unit as the client sent
        it (`alwayson_scripts.controlnet.args.2`, `control.0`), not its place in imprompt's request."""
        try:
            return await jobs.run_async(converted.request, iterations, http.is_disconnected)
        except ImpromptError as exc:
            raise named_unit(exc, converted.control_wheres) from None

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(payload: Txt2ImgPayload, http: Request) -> dict:
        return await generate(payload, http)

    @app.post("/sdapi/v1/img2img")
    async def img2img(payload: Img2ImgPayload, http: Request) -> dict:
        return await generate(payload, http)

    @app.get("/sdapi/v1/sd-models")
    def sd_models() -> list[dict]:
        return [
            {"title": e.name, "model_name": e.name, "hash": None, "sha256": None, "filename": str(e.path),
             "config": None, "family": e.spec.family}  # fmt: skip
            for e in engine.store.pipelines
        ]

    @app.get("/sdapi/v1/options")
    def get_options() -> dict:
        return {"sd_model_checkpoint": state["model"], "sd_checkpoint_hash": None, **state["options"]}

    @app.post("/sdapi/v1/options")
    def set_options(options: dict[str, Any]) -> dict:
        """The options that change pictures hold for the requests that follow (their own override_settings win);
        one imprompt cannot honour is refused naming it (nothing is then set), the others named in `warnings`."""
        current = {"sd_model_checkpoint": state["model"], **state["options"]}
        chosen, answer = apply_options(current, options, engine.store)
        if chosen["sd_model_checkpoint"] != state["model"]:
            log.info("current model: %s", chosen["sd_model_checkpoint"])
        state["model"] = chosen.pop("sd_model_checkpoint")
        state["options"] = chosen
        return answer

    @app.get("/sdapi/v1/ip-adapters")
    def ip_adapters() -> list[str]:
        """SD.Next's shape: the names of the adapters that fit the current model, "None" first."""
        return ["None"] + [a["name"] for a in adapters_listing()]

    @app.get("/v1/ip-adapters")
    def adapters_listing() -> list[dict]:
        """The adapters that fit the current model, with their files and the encoder each needs."""
        listing = describe_store(engine.store)
        return [
            {"name": a["friendly_name"] or a["name"], "file": a["path"], "variant": a["variant"], "needs": a["needs"],
             "encoder": a["encoder"], "encoder_present": a["encoder_present"]}  # fmt: skip
            for a in listing["adapters"]
            if state["model"] in a["fits_models"]
        ]

    @app.get("/sdapi/v1/samplers")
    def samplers() -> list[dict]:
        from ..util.samplers import SAMPLERS

        return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]

    @app.get("/sdapi/v1/scripts")
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}  # no A1111 scripts; webuiapi asks on connect

    @app.get("/sdapi/v1/loras")
    def loras() -> list[dict]:
        """A1111's shape: the LoRAs in the models folders that fit the current model (all, if none is chosen)."""
        current = engine.store.pipeline(state["model"]) if state["model"] else None
        return [{"name": e.name, "alias": e.name, "path": str(e.path), "metadata": {}, "family": e.spec.family}
                for e in _read(engine.store, "lora") if current is None or lora_fits(e, current)]  # fmt: skip

    @app.get("/sdapi/v1/sd-vae")
    def sd_vae() -> list[dict]:
        """A1111's shape: the VAE files (any fits SD 1.x / 2.x / SDXL models; SD 3 / FLUX VAEs are left out)."""
        return [{"model_name": e.path.name, "filename": str(e.path)} for e in _read(engine.store, "vae")
                if e.spec.latent_channels == 4]  # fmt: skip

    @app.get("/sdapi/v1/sd-modules")
    def sd_modules() -> list[dict]:
        """Forge's shape: the VAE and text-encoder files a transformer alone (ComfyUI's split FLUX / SD 3.5) can run
        with, which `forge_additional_modules` names."""
        files = [*_read(engine.store, "vae"), *_read(engine.store, "text-encoder")]
        return [{"model_name": e.path.name, "filename": str(e.path)} for e in files]

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict:
        """A1111's shape: textual-inversion embeddings that fit the current model "loaded", the others "skipped"."""
        current = engine.store.pipeline(state["model"]) if state["model"] else None
        listing = {"loaded": {}, "skipped": {}}
        for e in _read(engine.store, "textual-inversion"):
            item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": sum(e.spec.widths),
                    "vectors": e.spec.vectors}  # fmt: skip
            usable = current is not None and e.spec.fits(current.spec)
            listing["loaded" if usable else "skipped"][e.name] = item
        return listing

    @app.post("/sdapi/v1/refresh-checkpoints")
    @app.post("/sdapi/v1/refresh-loras")
    @app.post("/sdapi/v1/refresh-vae")
    def refresh_a1111() -> None:
        """A1111's rescans (it answers null): a model added to the folders since is then listed."""
        refresh_models()

    @app.post("/v1/models/refresh")
    def refresh_models() -> dict:
        """Scan the models folders again; files that did not change are not read again."""
        engine.store.refresh()
        kinds = sorted({e.kind for e in engine.store.entries})
        return {kind: len(engine.store.of_kind(kind)) for kind in kinds}

    # ---------------------------------------------------------------------------- the ControlNet extension's API

    @app.get("/controlnet/version")
    async def controlnet_version() -> dict:
        return {"version": 3}

    @app.get("/controlnet/model_list")
    def controlnet_model_list(update: bool = True) -> dict:
        """The IP-Adapters and the ControlNets imprompt can run, named as the extension names models
        (`stem [hash]`)."""
        if update:
            engine.store.refresh()
        _read(engine.store, "controlnet")
        return {"model_list": model_list(engine.store)}

    @app.get("/controlnet/module_list")
    async def controlnet_module_list(alias_names: bool = False) -> dict:
        """The preprocessors imprompt runs and the IP-Adapter ones (any of them: the adapter's weights choose the
        encoder), as the extension lists them: internal names, or with `alias_names` its labels, and their sliders."""
        return await run_in_threadpool(module_list, alias_names, engine.store.roots)  # looks for weights on disk

    @app.get("/controlnet/control_types")
    def controlnet_control_types() -> dict:
        _read(engine.store, "controlnet")
        return control_types(engine.store)

    @app.get("/controlnet/settings")
    async def controlnet_settings() -> dict:
        """The extension's unit count setting: here, how many units a request may have."""
        return {"control_net_unit_count": engine.state.limits.max_units}

    @app.post("/controlnet/detect")
    async def controlnet_detect(body: DetectPayload) -> dict:
        """Run a preprocessor alone on each image, as the extension's detect: the map at the preprocessor's own
        resolution (its short side), not fitted to any generation size."""
        pre = detect_module(body.controlnet_module)
        if not body.controlnet_input_images:
            raise RequestError("No image selected: controlnet_input_images is empty; send base64 images")
        limits = engine.state.limits

        def run() -> list[str]:
            weights = locate_weights(pre, engine.store.roots)
            values = slider_values(pre.label, pre, body.controlnet_processor_res, body.controlnet_threshold_a,
                                   body.controlnet_threshold_b, "controlnet")  # fmt: skip
            answers = []
            for i, given in enumerate(body.controlnet_input_images):
                image = load_image(given, f"controlnet_input_images.{i}", limits.max_image_pixels, allow_paths=False,
                                   max_bytes=limits.max_image_bytes)  # fmt: skip
                found = detect(pre, image, values["processor_res"] or DEFAULT_RESOLUTION, values["threshold_a"],
                               values["threshold_b"], weights, cache=engine.state.detections)  # fmt: skip
                answers.append(png_base64(found))
            return answers

        return {"info": "Success", "images": await run_in_threadpool(run)}

    @app.post("/sdapi/v1/control")
    async def sdnext_control(payload: dict[str, Any], http: Request) -> dict:
        """SD.Next's control API: its `control` units (and `ip_adapter`, `face`) with SD.Next's defaults; the
        answer is {images, processed, params, info}."""
        limits = (engine.state.limits.max_image_pixels, engine.state.limits.max_image_bytes)
        converted = await run_in_threadpool(from_control_payload, payload, engine.store,
                                            {"sd_model_checkpoint": state["model"], **state["options"]}, limits)  # fmt: skip
        engine.check_limits(converted.request)
        results = await run_named(converted, converted.iterations, http)
        return await run_in_threadpool(control_response, results, payload, converted)

    @app.get("/sdapi/v1/preprocessors")
    async def sdnext_preprocessors() -> list[dict]:
        return sdnext_preprocessor_list()

    @app.get("/sdapi/v1/controlnets")
    def sdnext_controlnets() -> list[str]:
        """SD.Next's list of control models: the names of the ControlNets imprompt can run."""
        _read(engine.store, "controlnet")
        return [engine.store.controlnet_title(e).rsplit(" [", 1)[0] for e in engine.store.controlnets
                if e.spec is not None and not e.spec.unsupported]  # fmt: skip

    @app.get("/sdapi/v1/progress")
    def progress() -> dict:  # a thread: a cluster asks its job board
        return jobs.progress()

    @app.post("/sdapi/v1/interrupt")
    def interrupt() -> dict:
        return {"interrupted": jobs.interrupt()}

    # ------------------------------------------------------------------------------------------------ native

    @app.get("/v1/models")
    def models() -> dict:
        listing = describe_store(engine.store)
        listing["current_model"] = state["model"]
        listing["known_adapters"] = [a.name for a in catalog.KNOWN_ADAPTERS]
        return listing

    @app.get("/v1/cache")
    def cache() -> dict:
        return jobs.cache_info()

    @app.delete("/v1/cache")
    def clear_cache() -> dict:
        return {"cleared": jobs.clear_cache()}

    @app.get("/v1/events")
    def events(since: float = 0.0) -> list[dict]:
        """Recent encoder loads, reuses, cache hits and evictions, oldest first."""
        return jobs.recent_events(since)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__, "queue": jobs.waiting, "busy": jobs.busy}

    # -------------------------------------------------------------------------------------------------- page

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("imprompt.server").joinpath("static/index.html").read_text()

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        files = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in files:
            return JSONResponse({"error": "NotFoundError", "detail": f"no static file {name!r}"}, 404)
        return Response(resources.files("imprompt.server").joinpath(f"static/{name}").read_text(), media_type=files[name])

    app.add_middleware(Auth, api_key=settings.api_key)
    add_origin_checks(app, settings.allowed_hosts, settings.cors_allow_origins, settings.cors_allow_origins_regex)
    app.add_middleware(Limits, max_body_bytes=settings.max_body_bytes)  # outermost: refuses before anything reads
    return app


def _read(store, kind: str) -> list:
    """Every entry of `kind`, pickles read first (a listing says what every file is)."""
    store.read_all()
    return store.of_kind(kind)


def _first_model(engine: Engine) -> str | None:
    """The current model until a client sets one: the first runnable, UNet families (SD 1.5, SDXL) before SD 3.5
    and FLUX, whose transformers are several times larger and which A1111 clients that never choose a model do
    not expect."""
    runnable = [p for p in engine.store.pipelines if not p.spec.unsupported]
    runnable.sort(key=lambda p: p.spec.architecture != "unet")  # stable: folder order otherwise
    return runnable[0].name if runnable else None


# Browsers prompt for a user and password only on a Basic challenge (Chromium reads one scheme per header);
# Bearer clients send their header unasked.
AUTH_CHALLENGE = 'Basic realm="imprompt", charset="UTF-8"'


class Auth:
    """Every path but /healthz needs the API key, as `Authorization: Bearer KEY` or A1111-style HTTP Basic
    (any user name, the key as password)."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_key or scope["path"] == "/healthz" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        given = "missing" if not dict(scope["headers"]).get(b"authorization") else "wrong"
        error = AuthError(f"{given} API key: send 'Authorization: Bearer <key>' (or HTTP Basic with the key as password)")
        await _json(send, error.http_status, error, {"www-authenticate": AUTH_CHALLENGE})

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        kind, _, value = header.partition(b" ")
        if kind.lower() == b"bearer":
            given = value.strip()
        elif kind.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except binascii.Error:
                return False
        else:
            return False
        return secrets.compare_digest(given, self.api_key.encode())  # bytes: any header byte compares, none raises


class Limits:
    """Refuse a body whose Content-Length is over the limit (413) before anything reads it. Bodies that do not
    declare their length are limited while they stream, by FastAPI's `max_body_size`."""

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = dict(scope["headers"]).get(b"content-length") if scope["type"] == "http" else None
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _json(send, 413, _too_large(int(length), self.max_body_bytes))
            return
        await self.app(scope, receive, send)


def _too_large(size: int | None, limit: int) -> PayloadTooLargeError:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return PayloadTooLargeError(f"{what} is over the {limit} byte limit; send smaller images")


async def _json(send: Send, status: int, error: ImpromptError, headers: dict | None = None) -> None:
    """A JSON error response sent from middleware (before FastAPI's handlers see the request)."""
    body = json.dumps({"error": type(error).__name__, "detail": bounded(str(error))}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
