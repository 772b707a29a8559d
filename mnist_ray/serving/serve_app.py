"""The serving replica: a FastAPI app on Ray Serve that loads the model dir once and answers
images over HTTP, concurrent requests grouped into one model call by ``@serve.batch``.

    POST /predict         one image (raw body or a multipart form) -> class, probabilities, timings
    POST /predict/batch   several images (JSON base64 list or multipart files), image by image
    GET  /healthz /readyz /stats, and the page at / (mnist_ray/serving/static)

Worker side: `mnist_ray.serving.serve` builds the application (or writes a Serve config that names
``app_builder``) and runs it. Preprocessing is the one of `mnist-ray predict` and `infer`.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (``request: Request``) at run time, and Serve's ingress wraps them in its own module.
import asyncio
import base64
import binascii
import dataclasses
import importlib.resources
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from mnist_ray.images import preprocess
from mnist_ray.model import export, runtimes
from mnist_ray.serving.stats import Recorder

log = logging.getLogger(__name__)

# A few MB of PNG can inflate to gigabytes of pixels (a 20000x20000 blank PNG is ~1 MB):
# the size is read from the header, before anything is decoded.
MAX_IMAGE_PIXELS = 40_000_000
# The faintest ink that counts as a digit (preprocess.mnist_like's threshold for "blank"): a
# blank 28x28 image passes mnist_like unchanged, so it is checked here too.
BLANK_PEAK = 16
# Raw bodies of these types are read as image bytes (a missing type too: some clients send none).
RAW_TYPES = ("image/", "application/octet-stream")
FORM = "multipart/form-data"
# Images up to this size are decoded on the event loop (a 28x28 PNG takes ~60 µs, less than the
# hop to a thread); larger ones (photos: milliseconds) in a thread, so the loop keeps taking requests.
INLINE_DECODE_BYTES = 16 << 10
CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'")


class BadRequest(Exception):
    """A request the client must change: its HTTP status and a sentence saying what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class AppSettings:
    """What a replica needs, JSON-serializable: the ``args`` of the Serve config's application."""

    model: str
    runtime: str = "tf"
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    max_request_bytes: int = 4 << 20
    max_batch_images: int = 64
    use_gpu: bool = False
    stats_actor: str = "mnist-ray-serve-stats"


# --- plain logic (no Ray, no HTTP) ------------------------------------------------------------

class DigitService:
    """Image bytes -> the 28x28 pixels the model sees -> JSON answers, the model loaded once.

    The model loader is injected, so this is tested without Ray or a model dir."""

    def __init__(self, load_model: Callable[[], Callable], metadata: dict, runtime: str):
        started = time.perf_counter()
        self.model = load_model()
        self.score(np.zeros((1, preprocess.MODEL_SIZE, preprocess.MODEL_SIZE), np.uint8))  # traced before requests
        self.load_seconds = round(time.perf_counter() - started, 3)
        self.class_names = list(metadata["class_names"])
        self.model_version = metadata["version"]
        self.runtime = runtime

    @property
    def ready(self) -> bool:
        return self.model is not None

    @staticmethod
    def prepare(data: bytes) -> np.ndarray:
        """Image bytes -> uint8 (28, 28) as `mnist-ray predict` makes them, or a BadRequest."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise BadRequest(400, "empty image: the request carries no bytes; send a PNG, JPEG, ... file")
        errors = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size  # the header only
        except errors:
            raise BadRequest(400, f"not an image: {len(data):,} bytes that no image format recognizes; "
                                  "send a PNG, JPEG, BMP, GIF, TIFF or WebP file") from None
        if width * height > MAX_IMAGE_PIXELS:
            raise BadRequest(413, f"image too large: {width}x{height} pixels, the limit is "
                                  f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels; scale it down")
        try:
            gray = preprocess.decode_for_model(data)
        except errors as e:
            raise BadRequest(400, f"cannot decode the image ({preprocess.describe_error(e)}): the file is "
                                  "corrupt or truncated") from None
        try:
            pixels = preprocess.mnist_like(gray)  # preprocess.prepare_pixels, one image
        except ValueError as e:
            raise BadRequest(422, f"blank image ({preprocess.describe_error(e)}): the image is empty or "
                                  "uniform; send a picture of one digit") from None
        if pixels.max() < BLANK_PEAK:
            raise BadRequest(422, "blank image: no digit found: the image is empty or uniform; "
                                  "send a picture of one digit")
        return pixels

    def score(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> float32 probabilities (N, 10): one model call."""
        return runtimes.predict_pixels(self.model, pixels)

    def answer(self, probs: np.ndarray, pixels: np.ndarray, *, preprocess_ms: float, model_ms: float,
               batch_size: int, include_image: bool) -> dict:
        top = int(probs.argmax())
        out = {"class": top, "class_name": self.class_names[top], "confidence": float(probs[top]),
               "probabilities": [float(p) for p in probs], "model_version": self.model_version,
               "runtime": self.runtime, "preprocess_ms": round(preprocess_ms, 3), "model_ms": round(model_ms, 3),
               "batch_size": batch_size}
        if include_image:  # what the model saw, for the page
            out["model_input_png"] = base64.b64encode(preprocess.encode_png(pixels[None])[0]).decode()
        return out


def decode_base64(text) -> bytes:
    """A base64 string (a ``data:...;base64,`` URL too) -> bytes, or a BadRequest."""
    if not isinstance(text, str):
        raise BadRequest(400, f"expected a base64 string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "not base64: each image must be a base64 string (or a data: URL)") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request too large: {int(declared):,} bytes, the limit is {limit:,} "
                              "(mnist-ray serve --max-request-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request too large: more than {limit:,} bytes (mnist-ray serve --max-request-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def form_files(request: Request, body: bytes) -> list[bytes]:
    """The files of a multipart form whose body was already read (under the size limit)."""
    from starlette.datastructures import UploadFile

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except Exception as e:  # noqa: BLE001 - Starlette's parser raises several types for bad forms
        raise BadRequest(400, f"malformed multipart form: {e}") from None
    try:
        return [await v.read() for _, v in form.multi_items() if isinstance(v, UploadFile)]
    finally:
        await form.close()


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _page(name: str) -> bytes:
    return (importlib.resources.files("mnist_ray.serving") / "static" / name).read_bytes()


# --- the Serve deployment -----------------------------------------------------------------------

app = FastAPI(title="mnist-ray serve", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    """FastAPI's own errors (404, 405) as the same JSON as ours."""
    return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"}, exc.status_code)


@app.exception_handler(Exception)
async def _bug(request: Request, exc: Exception):
    """A bug outside the handlers' own error handling: still JSON, and the replica lives on."""
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return JSONResponse({"error": f"invalid request: {exc.errors()}"}, 422)


@serve.deployment
@serve.ingress(app)
class MnistServer:
    """A replica: loads the model once (Serve routes to it only after this constructor), then
    answers HTTP requests; concurrent images go to the model together (``_score``)."""

    def __init__(self, settings: dict):
        self.settings = AppSettings(**settings)
        if self.settings.use_gpu:
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                # Several replicas may share a GPU (fractional --gpus-per-replica): grow, don't grab.
                tf.config.experimental.set_memory_growth(gpu, True)
        local, metadata = export.open_model_dir(self.settings.model)
        self.service = DigitService(lambda: runtimes.load(local, self.settings.runtime), metadata,
                                    self.settings.runtime)
        self._score.set_max_batch_size(self.settings.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.recorder = Recorder(self.settings.stats_actor)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pages = {name: _page(name) for name in ("index.html", "app.js", "style.css")}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # both set from the flags in __init__
    async def _score(self, pixels: list[np.ndarray]) -> list[tuple[np.ndarray, float, int]]:
        started = time.perf_counter()
        # In a thread: the event loop keeps taking requests (TF and TFLite release the GIL).
        probs = await asyncio.to_thread(self.service.score, np.stack(pixels))
        ms = (time.perf_counter() - started) * 1000
        return [(p, ms, len(pixels)) for p in probs]

    async def _one(self, data: bytes, include_image: bool) -> dict:
        started = time.perf_counter()
        pixels = self.service.prepare(data) if len(data) <= INLINE_DECODE_BYTES \
            else await asyncio.to_thread(self.service.prepare, data)
        preprocess_ms = (time.perf_counter() - started) * 1000
        probs, model_ms, batch_size = await self._score(pixels)
        return self.service.answer(probs, pixels, preprocess_ms=preprocess_ms, model_ms=model_ms,
                                   batch_size=batch_size, include_image=include_image)

    async def _answer(self, kind: str, request: Request, handle) -> Response:
        """Runs ``handle``; a BadRequest becomes its 4xx, anything else a 500: all as JSON, all counted."""
        started = time.perf_counter()
        images = 0
        try:
            body, images = await handle(request)
            response = JSONResponse(body)
        except BadRequest as e:
            response = JSONResponse({"error": e.message}, e.status)
        except Exception as e:  # noqa: BLE001 - a bug answers 500 but the replica lives on
            log.exception("serve: %s failed", kind)
            response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        self.recorder.add(kind, response.status_code, (time.perf_counter() - started) * 1000, images)
        return response

    @staticmethod
    def _include_image(request: Request) -> bool:
        return request.query_params.get("include_image", "").lower() in ("1", "true", "yes")

    @app.post("/predict")
    async def predict(self, request: Request) -> Response:
        return await self._answer("predict", request, self._predict)

    async def _predict(self, request: Request) -> tuple[dict, int]:
        kind = media_type(request)
        if not (kind == FORM or not kind or kind.startswith(RAW_TYPES)):
            raise BadRequest(415, f"Content-Type {kind!r} is not an image: send the file as the body "
                                  "(Content-Type image/png, image/jpeg, ... or application/octet-stream) "
                                  "or as a multipart form (curl -F image=@digit.png)")
        body = await read_body(request, self.settings.max_request_bytes)
        if kind == FORM:
            files = await form_files(request, body)
            if len(files) != 1:
                raise BadRequest(400, "the form has no file: send the image as a file field (curl -F image=@digit.png)"
                                 if not files else f"the form has {len(files)} files: /predict takes one image; "
                                                   "send several to /predict/batch")
            body = files[0]
        elif not body:
            raise BadRequest(400, "empty body: send an image file (PNG, JPEG, ...) as the request body")
        return await self._one(body, self._include_image(request)), 1

    @app.post("/predict/batch")
    async def predict_batch(self, request: Request) -> Response:
        return await self._answer("batch", request, self._predict_batch)

    async def _predict_batch(self, request: Request) -> tuple[dict, int]:
        kind = media_type(request)
        if kind not in ("application/json", FORM):
            raise BadRequest(415, f"Content-Type {kind or 'none'!r}: /predict/batch takes JSON "
                                  '({"images": [base64, ...]}) or a multipart form with several files')
        body = await read_body(request, self.settings.max_request_bytes)
        if kind == FORM:
            images: list = await form_files(request, body)
        else:
            try:
                doc = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(400, f"the body is not JSON ({e})") from None
            images = doc.get("images") if isinstance(doc, dict) else None
            if not isinstance(images, list):
                raise BadRequest(422, 'expected a JSON object {"images": [base64, ...]}')
        if not images:
            raise BadRequest(400, "no images: send at least one")
        if len(images) > self.settings.max_batch_images:
            raise BadRequest(413, f"too many images: {len(images)} in one request, the limit is "
                                  f"{self.settings.max_batch_images} (mnist-ray serve --max-batch-images)")
        include = self._include_image(request)

        async def one(item) -> dict:
            try:
                return await self._one(item if isinstance(item, bytes) else decode_base64(item), include)
            except BadRequest as e:  # one bad image is one error entry, like a predictions row
                return {"error": e.message, "status": e.status}

        # Each image goes to the batcher on its own, so they share model calls with other requests.
        results = await asyncio.gather(*(one(item) for item in images))
        ok = sum("error" not in r for r in results)
        return {"model_version": self.service.model_version, "runtime": self.service.runtime,
                "images": len(results), "errors": len(results) - ok, "results": results}, ok

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "replica": self.replica}

    @app.get("/readyz")
    async def readyz(self) -> Response:
        s = self.service
        return JSONResponse({"ready": s.ready, "model_version": s.model_version, "runtime": s.runtime,
                             "class_names": s.class_names, "model_load_seconds": s.load_seconds,
                             "replica": self.replica,
                             "max_batch_size": self.settings.max_batch_size}, 200 if s.ready else 503)

    @app.get("/stats")
    async def stats(self) -> Response:
        try:
            state = await self.recorder._actor().state.remote()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"error": f"stats unavailable: {e}"}, 503)
        return JSONResponse(state)

    @app.get("/")
    async def page(self) -> Response:
        return Response(self.pages["index.html"], media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP})

    @app.get("/app.js")
    async def script(self) -> Response:
        return Response(self.pages["app.js"], media_type="text/javascript; charset=utf-8")

    @app.get("/style.css")
    async def style(self) -> Response:
        return Response(self.pages["style.css"], media_type="text/css; charset=utf-8")


def app_builder(args: dict):
    """The Serve application from the ``args`` of a Serve config (`mnist-ray serve --write-config`)."""
    settings = AppSettings(**args)
    return MnistServer.bind(dataclasses.asdict(settings))
