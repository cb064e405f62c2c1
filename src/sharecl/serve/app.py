"""The HTTP application of ``sharecl serve``: configuration, limits and routes (FastAPI).

A store of classification tasks answers ``POST /predict`` (with a ``task``, or without one: every
task's classes compete, :meth:`~sharecl.methods.base.ContinualMethod.cil_logits`, and each
prediction names its task); a store on a causal LM (generation
tasks) answers ``POST /generate``; each refuses the other's route with a 422 that names the
right one. Every refusal is a 4xx with a JSON body ``{"error": {"code", "message"}}``: body too
large (413; the body is read and dropped first, up to ``max_drain_bytes``, so a client that
writes the whole body before reading still gets the answer), malformed JSON or wrong types
(422), too many inputs or too long a text (422), unknown task (404), a task without a head
(422); for a vision store, an input that is not a base64-encoded image (422) or whose declared
size is over the limits of :mod:`sharecl.vision.decode` (413); for a generation store, a prompt
over ``max_prompt_tokens`` tokens (413) or ``max_new_tokens`` out of range (422). Images are
decoded off the event loop on a small pool of threads, so decoding never stalls other clients
and at most that many images are decoded at full size at once.
"""

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Annotated, Optional

from sharecl.serve.batcher import MicroBatcher
from sharecl.serve.watcher import StoreWatcher

__all__ = ["ServeConfig", "create_app"]


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
        max_prompt_tokens: generation: tokens per prompt after the chat template (capped by the
            store's ``max_length``, which the model was trained with).
        max_new_tokens: generation: the largest ``max_new_tokens`` a request may ask for.
        max_drain_bytes: how much of a too-large body is read and dropped before the 413 is
            sent, in bytes (a larger body is cut off: its client may see the connection reset).
        decode_workers: threads decoding images (vision stores); also the most images decoded
            at full size at once.
        reload_interval_s: seconds between checks of the store's manifest (0: never reload).
        device: where the model runs (``auto``, ``cpu``, ``cuda``).
        precision: ``fp32``, or ``bf16`` (bfloat16 autocast of the backbone; on CPUs with
            bfloat16 instructions it decodes SmolLM2 about 2.6× faster, see the README).
        top_tasks: requests without a task id run under each input's M likeliest tasks only
            (aligned Share stores; ``ShareConfig.cil_top_tasks``); None: under every task.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_inputs: int = 64
    max_text_chars: int = 16_000
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_drain_bytes: int = 64 << 20
    decode_workers: int = 2
    reload_interval_s: float = 1.0
    device: str = "cpu"
    precision: str = "fp32"
    top_tasks: int | None = None

    def __post_init__(self):
        if self.top_tasks is not None and self.top_tasks < 1:
            raise ValueError(f"top_tasks must be ≥ 1 or None, got {self.top_tasks}")
        for name in ("max_batch_size", "max_inputs", "max_text_chars", "max_body_bytes", "decode_workers",
                     "max_prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_inputs > self.max_batch_size:
            raise ValueError(f"max_inputs ({self.max_inputs}) cannot exceed max_batch_size ({self.max_batch_size}): "
                             f"a request is never split across forward passes")
        if self.max_wait_ms < 0 or self.reload_interval_s < 0 or self.max_drain_bytes < 0:
            raise ValueError("max_wait_ms, reload_interval_s and max_drain_bytes must be ≥ 0")


def _error(status: int, code: str, message: str, **extra):
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message, **extra}})


async def _drain(receive, budget: int) -> None:
    """Read and drop the rest of a request body, at most ``budget`` bytes (so the connection
    can close cleanly after the answer instead of being reset with unread data)."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, by header or while streaming."""

    def __init__(self, app, max_bytes: int, drain_bytes: int):
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, "body_too_large", f"request body exceeds {self.max_bytes} bytes; send fewer or shorter inputs")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _drain(receive, self.drain_bytes)
            return await too_large(scope, receive, send)
        seen, exceeded, done = 0, False, False

        async def limited_receive():
            nonlocal seen, exceeded, done
            if exceeded:
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > self.max_bytes:  # stop reading; the app sees a truncated body
                    exceeded = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            if not exceeded:
                return await send(message)
            if message["type"] == "http.response.start":  # whatever the app answered, the answer is 413
                if not done:
                    await _drain(receive, self.drain_bytes)
                await too_large(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)


def _decode_base64_images(inputs: list[str], max_side: int) -> list:
    """``inputs`` (base64 image files) as RGB uint8 arrays, shorter side ``max_side``.

    Raises:
        ImageTooLarge / ImageRefused: see :func:`sharecl.vision.decode.decode_image`.
    """
    import base64
    import binascii

    from sharecl.vision.decode import ImageRefused, decode_image

    out = []
    for i, data in enumerate(inputs):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageRefused(f"inputs[{i}] is not base64 ({exc}); send each image file's bytes base64-encoded") from exc
        out.append(decode_image(raw, max_side, what=f"inputs[{i}]"))
    return out


def create_app(watcher: StoreWatcher, config: ServeConfig | None = None):
    """The FastAPI application serving ``watcher``'s store (see the module docstring for the API).

    The micro-batcher starts with the app and stops at shutdown; ``app.state.batcher`` and
    ``app.state.watcher`` give access to both (for tests and metrics).
    """
    from contextlib import asynccontextmanager
    from typing import Literal

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from pydantic import BaseModel, Field, StringConstraints
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import sharecl

    cfg = config or ServeConfig()
    vision = getattr(watcher.current.method.encoder, "images", None) is not None  # fixed by the base model
    lm = getattr(watcher.current.method.encoder, "modality", None) == "lm"  # likewise: a causal LM with generation tasks
    per_input = cfg.max_body_bytes if vision else cfg.max_text_chars
    Text = Annotated[str, StringConstraints(max_length=per_input)]
    what = "base64-encoded images (PNG, JPEG, …)" if vision else "texts"

    class PredictRequest(BaseModel):
        task: Optional[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
            default=None, description="task name (GET /tasks); omitted: no task id, every task's classes compete")
        inputs: Annotated[list[Text], Field(min_length=1, max_length=cfg.max_inputs)] = Field(
            description=f"{what} to classify (1–{cfg.max_inputs}, each ≤ {per_input} characters)")
        model_config = {"extra": "forbid"}

    class Prediction(BaseModel):
        label: str
        probability: float
        probabilities: list[float]
        task: Optional[str] = Field(default=None, description="the task the label belongs to (requests without a task)")

    class PredictResponse(BaseModel):
        task: Optional[str]
        store_version: int
        classes: list[str]
        predictions: list[Prediction]

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: Text
        model_config = {"extra": "forbid"}

    Chat = Annotated[list[Message], Field(min_length=1, max_length=64)]

    class GenerateRequest(BaseModel):
        task: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(description="task name (GET /tasks)")
        inputs: Annotated[list[Text | Chat], Field(min_length=1, max_length=cfg.max_inputs)] = Field(
            description=f"prompts (1–{cfg.max_inputs}): each a text, or a chat as a list of {{role, content}} messages "
                        f"ending with a user turn; each ≤ {cfg.max_prompt_tokens} tokens once formatted")
        max_new_tokens: Annotated[int, Field(ge=1, le=cfg.max_new_tokens)] = Field(
            default=min(64, cfg.max_new_tokens), description=f"most tokens per answer (1–{cfg.max_new_tokens}); greedy decoding")
        model_config = {"extra": "forbid"}

    class Generation(BaseModel):
        text: str
        tokens: int

    class GenerateResponse(BaseModel):
        task: str
        store_version: int
        generations: list[Generation]

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = MicroBatcher(lambda: watcher.current, cfg.max_batch_size, cfg.max_wait_ms,
                                         kind="generate" if lm else "classify")
        app.state.decoder = concurrent.futures.ThreadPoolExecutor(cfg.decode_workers, thread_name_prefix="sharecl-decode")
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            app.state.batcher.close()
            app.state.decoder.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="sharecl", version=sharecl.__version__, lifespan=lifespan,
                  description="Every task of one continual store, answered by one model.")
    app.state.watcher = watcher
    app.add_middleware(_BodyLimit, max_bytes=cfg.max_body_bytes, drain_bytes=cfg.max_drain_bytes)

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
        """Liveness, the served store version, batching counters, and the last failed reload.

        ``status`` is ``ok``, or ``stale`` while a newer store version on disk fails to load
        (``reload_error`` says why; the version named here keeps answering)."""
        cur, b, failed = watcher.current, app.state.batcher, watcher.health()
        return {"status": "stale" if failed else "ok", "store_version": cur.version, "tasks": len(cur.classes),
                "batches": b.batches, "rows": b.rows, "isolated_batches": b.isolated, "reloads": watcher.reloads,
                "reload_error": failed}

    @app.get("/tasks")
    def tasks() -> dict:
        """Every task with its classes; ``predict`` is false for adapter-only tasks (no head) and
        for generation tasks, ``generate`` true for every task of a store on a causal LM."""
        cur = watcher.current
        return {"store_version": cur.version, "method": cur.method.name,
                "tasks": [{"name": t, "classes": c, "kind": cur.kinds.get(t, "data"), "predict": t in cur.has_head,
                           "generate": lm} for t, c in cur.classes.items()]}

    def _unknown(task: str, cur):
        known = list(cur.classes)
        return _error(404, "unknown_task", f"unknown task {task!r}; known tasks: {known[:20]}" + (" …" if len(known) > 20 else ""))

    @app.post("/predict", response_model=PredictResponse,
              responses={404: {"description": "unknown task"}, 413: {"description": "body too large"},
                         422: {"description": "invalid request or task without a head"}})
    async def predict(req: PredictRequest):
        """Classify ``inputs`` with ``task``; requests for any tasks are micro-batched into one forward.

        A request whose own rows make the forward fail gets a 503; the requests batched with it
        are answered (they are rerun one by one)."""
        cur = watcher.current
        if lm:
            return _error(422, "wrong_route", "this store generates text with a causal LM; use POST /generate")
        if req.task is None:
            headless = [t for t in cur.classes if t not in cur.has_head]
            if headless or not cur.classes:
                return _error(422, "no_head", "a request without a task compares every task's classes, but "
                              + (f"task(s) {headless[:5]} were added as adapters only and have no classification head; "
                                 "name a task" if headless else "the store has no task yet"))
        elif req.task not in cur.classes:
            return _unknown(req.task, cur)
        elif req.task not in cur.has_head:
            return _error(422, "no_head", f"task {req.task!r} was added as an adapter only and has no classification head")
        inputs = req.inputs
        if vision:
            from sharecl.vision.decode import ImageRefused, ImageTooLarge

            side = cur.method.encoder.images.decode_side
            try:
                inputs = await asyncio.get_running_loop().run_in_executor(app.state.decoder, _decode_base64_images, inputs, side)
            except ImageTooLarge as exc:
                return _error(413, "image_too_large", str(exc))
            except ImageRefused as exc:
                return _error(422, "invalid_image", str(exc))
        try:
            version, probs = await asyncio.wrap_future(app.state.batcher.submit(req.task, inputs))
        except Exception as exc:  # noqa: BLE001 - a fault of the server, not of the request
            return _error(503, "inference_failed", f"the model could not answer ({type(exc).__name__}: {exc}); retry")
        if req.task is not None:
            classes = cur.classes[req.task]  # a task's classes never change between store versions
            labels = [(req.task, c) for c in classes]
        else:  # tasks are only ever appended: the answering version's classes open the current one's list
            now = watcher.current
            labels = [(t, c) for t in now.classes for c in now.classes[t]][: probs.shape[1]]
            classes = [f"{t}/{c}" for t, c in labels]
        preds = []
        for row in probs.tolist():
            i = max(range(len(row)), key=row.__getitem__)
            preds.append({"label": labels[i][1], "probability": row[i], "probabilities": row,
                          **({"task": labels[i][0]} if req.task is None else {})})
        return {"task": req.task, "store_version": version, "classes": classes, "predictions": preds}

    @app.post("/generate", response_model=GenerateResponse,
              responses={404: {"description": "unknown task"}, 413: {"description": "body or prompt too large"},
                         422: {"description": "invalid request, or a store that classifies"}})
    async def generate(req: GenerateRequest):
        """Greedy answers to ``inputs`` under ``task``; requests for any tasks are micro-batched
        into one ``generate`` call in which every row decodes under its own task (Share).

        A request whose own rows make the batch fail gets a 503; the requests batched with it
        are answered (they are rerun one by one)."""
        cur = watcher.current
        if not lm:
            return _error(422, "wrong_route", "this store classifies (its base model is not a causal LM); use POST /predict")
        if req.task not in cur.classes:
            return _unknown(req.task, cur)
        prompts = [p if isinstance(p, str) else [m.model_dump() for m in p] for p in req.inputs]
        encoder = cur.method.encoder
        limit = min(cfg.max_prompt_tokens, encoder.max_length)
        try:  # tokenising long prompts takes a while: off the event loop
            lengths = await asyncio.get_running_loop().run_in_executor(
                app.state.decoder, lambda: [encoder.prompt_length(p) for p in prompts])
        except ValueError as exc:
            return _error(422, "invalid_prompt", str(exc))
        over = [i for i, n in enumerate(lengths) if n > limit]
        if over:
            return _error(413, "prompt_too_long", f"inputs[{over[0]}] takes {lengths[over[0]]} tokens, over the limit of "
                          f"{limit} (the server's --max-prompt-tokens and the store's max_length); shorten it")
        try:
            version, ids = await asyncio.wrap_future(app.state.batcher.submit(req.task, prompts, req.max_new_tokens))
        except Exception as exc:  # noqa: BLE001 - a fault of the server, not of the request
            return _error(503, "inference_failed", f"the model could not answer ({type(exc).__name__}: {exc}); retry")
        return {"task": req.task, "store_version": version,
                "generations": [{"text": encoder.decode(row), "tokens": len(row)} for row in ids]}

    return app
