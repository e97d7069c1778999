"""The HTTP ingress of ``ldmseg serve``: a FastAPI app that reads and checks requests, then asks the
model deployment (:mod:`pipelines.serve_model`) through its handle.

- ``POST /v1/segment``: an image as a multipart file (field ``image``) or the raw body
  (``image/png``, ``image/jpeg``, ``image/webp``); parameters in the query or as form fields.
- ``POST /v1/inpaint``: multipart ``image``, ``map`` (PNG in COCO colours, black = unknown) and
  optionally ``known`` (PNG mask, white = known; default: the non-black pixels of ``map``).
- Both answer JSON, or the id map PNG itself with ``Accept: image/png`` (segments in the
  ``X-Segments`` header as JSON).
- ``GET /healthz``, ``GET /readyz``, ``GET /v1/model``, ``GET /`` (the web page), ``/docs``,
  ``/openapi.json``.

Every response carries ``X-Request-Id`` (the client's, when it sent a sane one); the logs carry it
too. Bodies over ``serve.max_request_bytes`` get 413 before they are read (Content-Length) or as
soon as the count passes the cap (chunked bodies).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import Request

from ldmseg.logs import get_logger
from ldmseg.serve_config import ServeConfig
from pipelines.serve_request import (IMAGE_TYPES, PARAMS, ApiError, check_options, decode_id_map, decode_mask,
                                     decode_upload, encode_result)

log = get_logger("serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def error_body(status: int, code: str, message: str, request_id: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": code, "detail": message, "request_id": request_id}).encode()


class GuardMiddleware:
    """Pure ASGI: a request id for every HTTP request, and the body cap (413) before the app reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            # Serve's proxy gives every request an X-Request-Id and echoes it on the response: add
            # ours only when the request came without one (the app run outside Serve)
            if message["type"] == "http.response.start" and not given:
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        async def refuse(status: int, code: str, message: str):
            status, body = error_body(status, code, message, request_id)
            await send_with_id({"type": "http.response.start", "status": status,
                                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send_with_id({"type": "http.response.body", "body": body})
            log.info(f"[{request_id}] {scope.get('method')} {scope.get('path')} -> {status} {code}")

        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await refuse(400, "bad_content_length", f"Content-Length {length!r} is not a number")
            if int(length) > self.max_bytes:
                return await refuse(413, "request_too_large", f"the body of {length} bytes is over this server's "
                                    f"cap of {self.max_bytes} bytes; send a smaller image")
        received = 0
        too_large = False

        async def counted_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted_receive, send_with_id)
        except _TooLarge:
            await refuse(413, "request_too_large", f"the body passed this server's cap of {self.max_bytes} bytes; "
                                                   "send a smaller image")


class _TooLarge(Exception):
    pass


def page() -> str:
    """The web page (``pipelines/serve_page/index.html``, shipped with the package)."""
    return resources.files("pipelines").joinpath("serve_page", "index.html").read_text(encoding="utf-8")


def _image_body(kind: str) -> dict:
    fields = {"image": {"type": "string", "format": "binary", "description": f"the {kind} (PNG, JPEG, WebP, BMP, TIFF)"}}
    if kind == "image to complete":
        fields["map"] = {"type": "string", "format": "binary",
                         "description": "partial id map: PNG in COCO colours, black = unknown"}
        fields["known"] = {"type": "string", "format": "binary", "description": "optional known-region mask PNG"}
    for name in PARAMS:
        fields[name] = {"type": "integer" if name in ("steps", "seed", "samples") else
                        "number" if name.endswith("_th") else "string"}
    content = {"multipart/form-data": {"schema": {"type": "object", "properties": fields, "required": ["image"]}}}
    if kind == "image":
        content.update({t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES})
    return {"requestBody": {"required": True, "content": content}}


MODEL_DEPLOYMENT = "ModelServer"


def make_app(cfg: ServeConfig, info: dict[str, Any]):
    """The FastAPI app; ``info`` is what ``GET /v1/model`` reports. The handle of the model
    deployment (:data:`MODEL_DEPLOYMENT` of the same Serve application) is looked up on first use."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    app = FastAPI(title="ldmseg", version="1", description="Panoptic segmentation and mask inpainting by "
                  "latent diffusion (LDMSeg). Errors are JSON: error (a code), detail, request_id.")
    app.add_middleware(GuardMiddleware, max_bytes=cfg.max_request_bytes)
    samplers = list(info["samplers"])
    handles: dict[str, Any] = {}

    def model_handle():
        if "model" not in handles:
            from ray import serve

            handles["model"] = serve.get_deployment_handle(MODEL_DEPLOYMENT, serve.get_replica_context().app_name)
        return handles["model"]

    def rid(request: Request) -> str:
        return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        log.info(f"[{rid(request)}] {request.method} {request.url.path} -> {exc.status} {exc.code}")
        headers = {"Retry-After": str(cfg.retry_after_s)} if exc.status == 503 else None
        return JSONResponse({"error": exc.code, "detail": str(exc), "request_id": rid(request)}, exc.status,
                            headers=headers)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(exc.detail), "request_id": rid(request)}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "bad_request", "detail": str(exc)[:500], "request_id": rid(request)}, 400)

    async def read_request(request: Request, files: tuple[str, ...]) -> tuple[dict[str, bytes], dict[str, str]]:
        """The uploaded files and the parameters (query, then form fields) of a request."""
        params = dict(request.query_params)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        uploads: dict[str, bytes] = {}
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=len(files), max_fields=len(PARAMS))
            except _TooLarge:
                raise
            except Exception as exc:  # noqa: BLE001 - malformed multipart
                raise ApiError(400, "bad_multipart", f"the multipart body cannot be read ({exc})") from None
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    if key not in files:
                        raise ApiError(400, "unexpected_file", f"unexpected file field {key!r}; files: {', '.join(files)}")
                    uploads[key] = await value.read()
                else:
                    params[key] = value
        elif ctype in IMAGE_TYPES and files == ("image",):
            uploads["image"] = await request.body()
        elif not ctype:
            raise ApiError(415, "missing_content_type", "no Content-Type; send multipart/form-data with an 'image' "
                                                        f"file{', or a raw ' + ', '.join(IMAGE_TYPES) if files == ('image',) else ''}")
        else:
            accepted = "multipart/form-data" + (", " + ", ".join(IMAGE_TYPES) if files == ("image",) else "")
            raise ApiError(415, "unsupported_content_type", f"Content-Type {ctype} is not accepted; send {accepted}")
        if "image" not in uploads:
            raise ApiError(400, "missing_image", "no image: send it as the multipart file field 'image'")
        return uploads, params

    async def ask_model(request: Request, method: str, *args) -> dict:
        try:
            call = getattr(model_handle(), method).remote(*args)
            return await asyncio.wait_for(call, timeout=cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no answer within {cfg.request_timeout_s} s (serve.request_timeout_s); "
                                           "try again, with fewer steps, or later") from None
        except Exception as exc:  # noqa: BLE001
            if type(exc).__name__ == "BackPressureError":
                raise ApiError(503, "overloaded", "the model replicas are full; retry after the Retry-After "
                                                  "seconds") from None
            raise

    def respond(request: Request, result: dict, timings: dict[str, float]):
        body, png = encode_result(result, rid(request), timings)
        log.info(f"[{rid(request)}] {request.method} {request.url.path} -> 200 ({len(body['segments'])} segments, "
                 f"{body['timings_ms']['total']:.0f} ms)")
        if "image/png" in request.headers.get("accept", "") and "application/json" not in request.headers.get("accept", ""):
            headers = {"X-Segments": json.dumps(body["segments"]), "X-Width": str(body["width"]),
                       "X-Height": str(body["height"])}
            return Response(png, media_type="image/png", headers=headers)
        return JSONResponse(body)

    @app.post("/v1/segment", openapi_extra=_image_body("image"),
              summary="Segment an image (multipart 'image' or a raw PNG/JPEG/WebP body)")
    async def segment(request: Request):
        t0 = time.perf_counter()
        uploads, params = await read_request(request, ("image",))
        options = check_options(params, cfg, samplers)
        image = await asyncio.to_thread(decode_upload, uploads["image"], "image", cfg)
        t1 = time.perf_counter()
        result = await ask_model(request, "segment", image, options.sampling, options.seed, options.samples)
        t2 = time.perf_counter()
        return respond(request, result, {"decode": round(1000 * (t1 - t0), 2), "queue_and_model":
                                         round(1000 * (t2 - t1), 2), "total": round(1000 * (time.perf_counter() - t0), 2)})

    @app.post("/v1/inpaint", openapi_extra=_image_body("image to complete"),
              summary="Complete a partial id map (multipart 'image', 'map', optional 'known')")
    async def inpaint(request: Request):
        t0 = time.perf_counter()
        uploads, params = await read_request(request, ("image", "map", "known"))
        if "map" not in uploads:
            raise ApiError(400, "missing_map", "no partial map: send it as the multipart file field 'map' (PNG in "
                                               "COCO colours, black = unknown)")
        options = check_options(params, cfg, samplers)
        if options.samples not in (None, 1):
            raise ApiError(400, "samples_not_supported", "inpainting draws one sample; leave 'samples' out")
        image = await asyncio.to_thread(decode_upload, uploads["image"], "image", cfg)
        partial = decode_id_map(uploads["map"], "map", image.shape[:2], cfg)
        known = decode_mask(uploads["known"], "known", image.shape[:2]) if "known" in uploads else None
        t1 = time.perf_counter()
        result = await ask_model(request, "inpaint", image, partial, known, options.sampling, options.seed)
        t2 = time.perf_counter()
        return respond(request, result, {"decode": round(1000 * (t1 - t0), 2), "queue_and_model":
                                         round(1000 * (t2 - t1), 2), "total": round(1000 * (time.perf_counter() - t0), 2)})

    @app.get("/healthz", summary="Alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded and warmed up")
    async def readyz(request: Request):
        try:
            await asyncio.wait_for(model_handle().ready.remote(), timeout=5)
        except Exception:  # noqa: BLE001 - not ready, whatever the reason
            raise ApiError(503, "not_ready", "the model is not loaded yet; retry shortly") from None
        return {"status": "ready"}

    @app.get("/v1/model", summary="Model URI and version, config hash, samplers, limits")
    async def model_info():
        return info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page())

    return app
