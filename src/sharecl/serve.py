"""``sharecl serve``: one model answering for every task of a store over HTTP (FastAPI on uvicorn).

Three parts, each usable on its own:

- :class:`StoreWatcher` holds the store version being served and polls ``manifest.json``;
  when another process (``sharecl learn`` / ``add-adapter``) writes a new version, it loads
  and checks it in the background and then swaps one reference. A batch always runs on
  one snapshot, so no request sees half a version, and a version that fails to load
  (for example deleted by a third writer while being read) is retried at the next poll
  while the old one keeps answering.
- :class:`MicroBatcher` gathers the rows of requests that arrive together, for any tasks,
  up to ``max_batch_size`` rows or ``max_wait_ms``, and runs them as **one** mixed-task
  forward (Share: each row gathers its task's ``M_t = C_B[t] C_A[t]ᵀ``, METHODS.md §1
  "Inference"; :meth:`~sharecl.methods.base.ContinualMethod.mixed_logits`).
- :func:`create_app` builds the FastAPI application: ``POST /predict``, ``GET /tasks``,
  ``GET /health`` and the OpenAPI schema at ``/openapi.json``. Every refusal is a 4xx with
  a JSON body ``{"error": {"code", "message"}}``: body too large (413), malformed JSON or
  wrong types (422), too many inputs or too long a text (422), unknown task (404), a task
  without a head (422); for a vision store (a ViT base model), an input that is not a
  base64-encoded image (422).
"""


import asyncio
import dataclasses
import concurrent.futures
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

__all__ = ["ServeConfig", "Loaded", "StoreWatcher", "MicroBatcher", "create_app", "serve"]


@dataclass
class ServeConfig:
    """Limits and batching of ``sharecl serve``.

    Attributes:
        host, port: where uvicorn listens (loopback by default).
        max_batch_size: rows per forward pass (a request's inputs are never split).
        max_wait_ms: how long the first request of a batch waits for company, in milliseconds.
        max_inputs: inputs per request (≤ ``max_batch_size``).
        max_text_chars: characters per input text.
        max_body_bytes: request body size, in bytes.
        reload_interval_s: seconds between checks of the store's manifest (0: never reload).
        device: where the model runs (``auto``, ``cpu``, ``cuda``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_inputs: int = 64
    max_text_chars: int = 16_000
    max_body_bytes: int = 1_000_000
    reload_interval_s: float = 1.0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("max_batch_size", "max_inputs", "max_text_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_inputs > self.max_batch_size:
            raise ValueError(f"max_inputs ({self.max_inputs}) cannot exceed max_batch_size ({self.max_batch_size}): "
                             f"a request is never split across forward passes")
        if self.max_wait_ms < 0 or self.reload_interval_s < 0:
            raise ValueError("max_wait_ms and reload_interval_s must be ≥ 0")


@dataclass(frozen=True)
class Loaded:
    """One loaded store version: the method and what the API needs to know about its tasks."""

    version: int
    method: object
    classes: dict[str, list[str]]
    kinds: dict[str, str]
    has_head: frozenset[str]
    signature: tuple = ()


def _signature(path: Path) -> tuple:
    st = (path / "manifest.json").stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load(path: Path, device: str) -> Loaded:
    from sharecl.store import load_store, read_manifest

    sig = _signature(path)
    manifest = read_manifest(path)
    method = load_store(path, device=device)
    if method.task_names != [t["name"] for t in manifest["tasks"]]:  # a newer manifest landed between the two reads
        raise RuntimeError("the store changed while it was being read")
    return Loaded(manifest["version"], method, {t: list(method.task_classes[t]) for t in method.task_names},
                  {t["name"]: t.get("kind", "data") for t in manifest["tasks"]},
                  frozenset(t for t in method.task_names if t in method.heads), sig)


class StoreWatcher:
    """The store version being served, swapped atomically when a newer one appears on disk.

    Raises (constructor):
        StoreError: if the store cannot be loaded now.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", interval_s: float = 1.0, log=None):
        self.path, self.device, self.interval_s, self.log = Path(path), device, interval_s, log
        self._current = _load(self.path, device)
        self.reloads, self.failed_reloads = 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> Loaded:
        """The served version (one reference read: a consistent snapshot)."""
        return self._current

    def check(self) -> bool:
        """Load and switch to a newer version if the manifest changed; returns whether it switched."""
        try:
            if _signature(self.path) == self._current.signature:
                return False
            new = _load(self.path, self.device)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old version serving; retried next poll
            self.failed_reloads += 1
            if self.log:
                self.log(f"store reload deferred: {exc}")
            return False
        if new.version <= self._current.version:
            self._current = dataclasses.replace(self._current, signature=new.signature)  # same version, newer file
            return False
        self._current = new
        self.reloads += 1
        if self.log:
            self.log(f"serving store version {new.version} ({len(new.classes)} tasks)")
        return True

    def start(self) -> None:
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="sharecl-store-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


@dataclass
class _Pending:
    task: str
    inputs: list
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class MicroBatcher:
    """Gathers requests for any tasks into mixed-task forward passes on one worker thread.

    Args:
        snapshot: returns the :class:`Loaded` version to run the next batch on.
        max_batch_size: rows per forward.
        max_wait_ms: how long a batch's first request waits for more rows.

    :meth:`submit` returns a future resolving to ``(store_version, probabilities (n, C) float32)``.
    """

    def __init__(self, snapshot, max_batch_size: int = 64, max_wait_ms: float = 5.0):
        self.snapshot, self.max_batch_size, self.max_wait_s = snapshot, max_batch_size, max_wait_ms / 1000.0
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self.batches, self.rows = 0, 0
        self._thread = threading.Thread(target=self._run, name="sharecl-micro-batcher", daemon=True)
        self._thread.start()

    def submit(self, task: str, inputs: list) -> concurrent.futures.Future:
        item = _Pending(task, list(inputs))
        self._queue.put(item)
        return item.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], _Pending | None, bool]:
        batch, rows, deadline = [first], len(first.inputs), time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_size:
            left = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, None, True
            if rows + len(item.inputs) > self.max_batch_size:
                return batch, item, False
            batch.append(item)
            rows += len(item.inputs)
        return batch, None, False

    def _run(self) -> None:
        carry = None
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is None:
                return
            batch, carry, closing = self._gather(first)
            self._forward(batch)
            if closing:
                return

    def _forward(self, batch: list[_Pending]) -> None:
        loaded = self.snapshot()
        inputs = [x for item in batch for x in item.inputs]
        tasks = [item.task for item in batch for _ in item.inputs]
        try:
            with torch.inference_mode():
                rows = loaded.method.mixed_logits(inputs, tasks)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting request
            for item in batch:
                item.future.set_exception(exc)
            return
        self.batches += 1
        self.rows += len(inputs)
        pos = 0
        for item in batch:
            n = len(item.inputs)
            item.future.set_result((loaded.version, torch.stack(rows[pos: pos + n]).float().softmax(-1).cpu()))
            pos += n


#: Largest image accepted by a vision store, in pixels (width × height).
MAX_IMAGE_PIXELS = 4096 * 4096


def _decode_image(data: str, index: int):
    """``inputs[index]``, a base64-encoded image, as an RGB uint8 array ``(H, W, 3)``.

    Raises:
        ValueError: not base64, not an image PIL can read, or more than :data:`MAX_IMAGE_PIXELS`.
    """
    import base64
    import binascii
    import io
    import warnings

    import numpy as np
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"inputs[{index}] is not base64 ({exc}); send each image file's bytes base64-encoded") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"inputs[{index}] is {im.width}×{im.height} pixels; the limit is {MAX_IMAGE_PIXELS:,}")
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds on hostile bytes; all mean "not an image"
        raise ValueError(f"inputs[{index}] is not an image PIL can read ({type(exc).__name__})") from exc


def _error(status: int, code: str, message: str, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message, **extra}})


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, by header or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, "body_too_large", f"request body exceeds {self.max_bytes} bytes; send fewer or shorter inputs")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_large(scope, receive, send)
        seen, exceeded = 0, False

        async def limited_receive():
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # stop reading; the app sees a truncated body
                    exceeded = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            if not exceeded:
                return await send(message)
            if message["type"] == "http.response.start":  # whatever the app answered, the answer is 413
                await too_large(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)


def create_app(watcher: StoreWatcher, config: ServeConfig | None = None):
    """The FastAPI application serving ``watcher``'s store (see the module docstring for the API).

    The micro-batcher starts with the app and stops at shutdown; ``app.state.batcher`` and
    ``app.state.watcher`` give access to both (for tests and metrics).
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from pydantic import BaseModel, Field, StringConstraints
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import sharecl

    cfg = config or ServeConfig()
    vision = getattr(watcher.current.method.encoder, "images", None) is not None  # fixed by the base model
    per_input = cfg.max_body_bytes if vision else cfg.max_text_chars
    Text = Annotated[str, StringConstraints(max_length=per_input)]
    what = "base64-encoded images (PNG, JPEG, …)" if vision else "texts"

    class PredictRequest(BaseModel):
        task: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(description="task name (GET /tasks)")
        inputs: Annotated[list[Text], Field(min_length=1, max_length=cfg.max_inputs)] = Field(
            description=f"{what} to classify (1–{cfg.max_inputs}, each ≤ {per_input} characters)")
        model_config = {"extra": "forbid"}

    class Prediction(BaseModel):
        label: str
        probability: float
        probabilities: list[float]

    class PredictResponse(BaseModel):
        task: str
        store_version: int
        classes: list[str]
        predictions: list[Prediction]

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = MicroBatcher(lambda: watcher.current, cfg.max_batch_size, cfg.max_wait_ms)
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            app.state.batcher.close()

    app = FastAPI(title="sharecl", version=sharecl.__version__, lifespan=lifespan,
                  description="Every task of one continual store, answered by one model.")
    app.state.watcher = watcher
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()][:10]
        return _error(422, "invalid_request", "the request body does not match the schema (see /openapi.json): "
                      + "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details), details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.get("/health")
    def health() -> dict:
        """Liveness, the served store version, and batching counters."""
        cur, b = watcher.current, app.state.batcher
        return {"status": "ok", "store_version": cur.version, "tasks": len(cur.classes), "batches": b.batches,
                "rows": b.rows, "reloads": watcher.reloads}

    @app.get("/tasks")
    def tasks() -> dict:
        """Every task with its classes; ``predict`` is false for adapter-only tasks (no head)."""
        cur = watcher.current
        return {"store_version": cur.version, "method": cur.method.name,
                "tasks": [{"name": t, "classes": c, "kind": cur.kinds.get(t, "data"), "predict": t in cur.has_head}
                          for t, c in cur.classes.items()]}

    @app.post("/predict", response_model=PredictResponse,
              responses={404: {"description": "unknown task"}, 413: {"description": "body too large"},
                         422: {"description": "invalid request or task without a head"}})
    async def predict(req: PredictRequest):
        """Classify ``inputs`` with ``task``; requests for any tasks are micro-batched into one forward."""
        cur = watcher.current
        if req.task not in cur.classes:
            known = list(cur.classes)
            return _error(404, "unknown_task", f"unknown task {req.task!r}; known tasks: {known[:20]}"
                          + (" …" if len(known) > 20 else ""))
        if req.task not in cur.has_head:
            return _error(422, "no_head", f"task {req.task!r} was added as an adapter only and has no classification head")
        inputs = req.inputs
        if vision:
            try:
                inputs = [_decode_image(x, i) for i, x in enumerate(inputs)]
            except ValueError as exc:
                return _error(422, "invalid_image", str(exc))
        try:
            version, probs = await asyncio.wrap_future(app.state.batcher.submit(req.task, inputs))
        except Exception as exc:  # noqa: BLE001 - a fault of the server, not of the request
            return _error(503, "inference_failed", f"the model could not answer ({type(exc).__name__}: {exc}); retry")
        classes = cur.classes[req.task]  # a task's classes never change between store versions
        preds = []
        for row in probs.tolist():
            i = max(range(len(row)), key=row.__getitem__)
            preds.append({"label": classes[i], "probability": row[i], "probabilities": row})
        return {"task": req.task, "store_version": version, "classes": classes, "predictions": preds}

    return app


def serve(store: str | os.PathLike, config: ServeConfig | None = None, log=print) -> None:
    """Load ``store`` and serve it with uvicorn until interrupted.

    Raises:
        StoreError: if the store cannot be loaded.
    """
    import uvicorn

    cfg = config or ServeConfig()
    watcher = StoreWatcher(store, device=cfg.device, interval_s=cfg.reload_interval_s, log=log)
    cur = watcher.current
    log(f"serving {store} (version {cur.version}, method {cur.method.name}, {len(cur.classes)} tasks) "
        f"on http://{cfg.host}:{cfg.port}  (OpenAPI: /docs, /openapi.json)")
    uvicorn.run(create_app(watcher, cfg), host=cfg.host, port=cfg.port, log_level="warning")
