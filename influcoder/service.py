"""The HTTP API (FastAPI): `create_app(engine, api_key, limits)`; OpenAPI docs at `/docs`.

- `POST /v1/attribute`, `POST /v1/flag`, `GET /v1/examples/{id}`, `GET /v1/index`: need the
  `X-API-Key` header when a key is configured (401 otherwise). `GET /healthz`, `GET /readyz` and
  the docs are open (probes).
- Bad input → 4xx with `{"error": {"status", "code", "message", "field", "errors": [...]}}`:
  invalid JSON 400 (`field: body`), schema errors 422 (`field` is the dotted path, e.g.
  `inputs.0.text`), unknown example 404, body over `max_body_bytes` 413 (by Content-Length, or
  counted while streaming).
- The encoder is shared by concurrent requests: texts arriving within `batch_window_ms` go through
  one forward pass (`EncodeBatcher`).
- Reload: `POST /v1/admin/reload` (or SIGHUP to the `serve` process) loads the index folder again in
  a worker thread and swaps the engine in one assignment. A request takes the engine once when it
  starts, so in-flight requests finish on the old version; nothing is dropped.
"""


import asyncio
import hmac
import logging
import signal
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from . import __version__
from .config import ServiceConfig
from .data import Record
from .engine import Engine, InputError, RerankUnavailable, input_record

log = logging.getLogger("influcoder.service")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


class FieldError(ValueError):
    """A model-level validation error that knows which field it is about."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def error_body(status: int, code: str, message: str, field: str | None, errors: list[dict] | None = None) -> dict:
    return {"error": {"status": status, "code": code, "message": message, "field": field, "errors": errors or []}}


def _json_error(status: int, code: str, message: str, field: str | None = None, errors: list | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, field, errors), status_code=status)


# --- request size ----------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: reject bodies over `max_bytes` with 413, by Content-Length up front or by
    counting a streamed (chunked) body; the app gets the body replayed from memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        cl = headers.get(b"content-length")
        too_big = _json_error(413, "body_too_large", f"request body is over {self.max_bytes} bytes", "body")
        if cl is not None:
            if not cl.isdigit():
                return await _json_error(400, "bad_content_length", "Content-Length is not a number", "body")(scope, receive, send)
            if int(cl) > self.max_bytes:
                return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --- concurrent requests share encoder passes --------------------------------------------------------

class EncodeBatcher:
    """Queue of (engine, texts, future); one task gathers what arrives within `window_s` (up to
    `max_texts`) and embeds each engine's share in one pass, off the event loop."""

    def __init__(self, window_s: float, max_texts: int):
        self.window_s, self.max_texts = window_s, max_texts
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.passes = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    async def embed(self, engine: Engine, texts: list[str]) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((engine, texts, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            n, deadline = len(batch[0][1]), loop.time() + self.window_s
            while n < self.max_texts and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                    n += len(batch[-1][1])
                except TimeoutError:
                    break
            for engine in {id(b[0]): b[0] for b in batch}.values():  # an engine per group: reloads stay consistent
                mine = [b for b in batch if b[0] is engine]
                try:
                    vecs = await run_in_threadpool(engine.embed_queries, [t for b in mine for t in b[1]])  # (Σn, dim)
                    self.passes += 1
                except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                    for b in mine:
                        b[2].done() or b[2].set_exception(e)
                    continue
                at = 0
                for _, texts, fut in mine:
                    fut.done() or fut.set_result(vecs[at:at + len(texts)])
                    at += len(texts)


# --- request models --------------------------------------------------------------------------------

def request_models(lim: ServiceConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """Pydantic models with this service's limits baked in (documented in the OpenAPI page)."""
    Text = Annotated[StrictStr, Field(min_length=1, max_length=lim.max_text_chars)]
    K = Annotated[StrictInt, Field(ge=1, le=lim.max_k, description=f"Results per input (1–{lim.max_k}).")]

    class Input(BaseModel):
        """A model output to attribute: `text`, or a `prompt` + `response` pair."""

        model_config = ConfigDict(extra="forbid")
        text: Text | None = None
        prompt: Text | None = None
        response: Text | None = None

        @model_validator(mode="after")
        def _one_form(self):
            if self.text is not None and (self.prompt is not None or self.response is not None):
                raise FieldError("text", "give `text` or `prompt` + `response`, not both")
            if self.text is None:
                for name in ("prompt", "response"):
                    if getattr(self, name) is None:
                        raise FieldError(name, "Field required (give `text`, or both `prompt` and `response`)")
            return self

    Inputs = Annotated[list[Input], Field(min_length=1, max_length=lim.max_batch)]

    class AttributeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: Inputs
        k: K = 10
        rerank: StrictBool = Field(False, description="Re-score the top `rerank_k` candidates with the exact teacher (slow: a decoder backward per input).")
        rerank_k: Annotated[StrictInt, Field(ge=1, le=lim.max_k)] | None = Field(None, description="Candidates re-ranked (K′); default `index.rerank_k`.")

    class FlagRequest(BaseModel):
        """The batch filter's score (`influcoder filter`) over the index's rows: AGG over `examples` of the
        student cosine, minus the same AGG over `reference` (when given); the `k` highest rows."""

        model_config = ConfigDict(extra="forbid")
        examples: Inputs = Field(description="Behaviour examples (e.g. unwanted outputs).")
        reference: Annotated[list[Input], Field(max_length=lim.max_batch)] | None = Field(
            None, description="Wanted outputs: rows close to these are discounted (flags off-target, not merely on-topic, rows).")
        k: K = 100
        aggregate: Literal["mean", "max", "topm"] | None = Field(
            None, description="`mean`: mean cosine to the examples; `max`: best cosine to any; `topm`: mean of the `top_m` best. Default: the index's `filter.aggregate` (mean).")
        top_m: Annotated[StrictInt, Field(ge=1, le=lim.max_batch)] | None = Field(None, description="`topm`: how many best matches are averaged; default `filter.top_m`.")
        threshold: Annotated[float, Field(strict=True, ge=-2.0, le=2.0, allow_inf_nan=False)] | None = Field(
            None, description="Only rows scoring at least this (and, on a Flat index, count them in `n_at_or_above_threshold`).")

    return AttributeRequest, FlagRequest


def _records(items: list[BaseModel]) -> list[Record]:
    return [input_record(x.model_dump(exclude_none=True), i) for i, x in enumerate(items)]


def _field(loc: tuple, err: dict) -> str:
    if err.get("type") == "json_invalid":
        return "body"
    parts = [str(p) for p in loc if p != "body"]
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, FieldError):
        parts.append(ctx_err.field)
    return ".".join(parts) or "body"


# --- the app ------------------------------------------------------------------------------------

def create_app(engine: Engine, api_key: str | None = None, limits: ServiceConfig | None = None,
               loader: Callable[[], Engine] | None = None, sighup_reload: bool = False) -> FastAPI:
    """An app serving `engine`. `loader` makes the next engine on reload (default: load the same
    index folder again). `sighup_reload`: also reload on SIGHUP (main thread only)."""
    lim = limits or engine.cfg.service
    AttributeRequest, FlagRequest = request_models(lim)
    state: dict[str, Any] = {"engine": engine, "reloads": 0}
    load_next = loader or (lambda: state["engine"].reload())
    batcher = EncodeBatcher(lim.batch_window_ms / 1000, lim.encoder_batch)
    reload_lock = asyncio.Lock()

    async def reload() -> dict:
        async with reload_lock:
            old = state["engine"]
            new = await run_in_threadpool(load_next)
            state["engine"] = new  # one assignment: requests that already took `old` finish on it
            state["reloads"] += 1
            return {"previous_build_id": old.build_id, "build_id": new.build_id, "count": new.count}

    async def reload_logged() -> None:
        try:
            out = await reload()
            log.warning("reloaded index: build %s → %s (%d examples)", out["previous_build_id"][:8], out["build_id"][:8], out["count"])
        except Exception as e:  # noqa: BLE001 - a signal has nobody to answer to
            log.error("reload failed, still serving the previous version: %s", e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        if sighup_reload:
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload_logged()))
            except (RuntimeError, ValueError, NotImplementedError):
                pass  # not the main thread (tests) or no signals here
        yield
        await batcher.stop()

    app = FastAPI(title="influcoder", version=__version__, lifespan=lifespan,
                  description="Which training data caused this model behaviour? Student-encoder attribution over a FAISS index, "
                              "with optional exact re-ranking by the gradient teacher. Scores: cosine, higher = more implicated.")
    app.state.service = state
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return _json_error(e.status, e.code, e.message, e.field)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return _json_error(500, "internal_error", f"{type(e).__name__}: {e}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _json_error(e.status_code, "http_error", str(e.detail), "path" if e.status_code in (404, 405) else None)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, e: InputError):
        return _json_error(422, "invalid_input", e.message, e.field)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = [{"field": _field(tuple(x["loc"]), x), "message": x["msg"].removeprefix("Value error, "), "type": x["type"]}
                for x in e.errors()]
        if any(x["type"] == "json_invalid" for x in e.errors()):
            return _json_error(400, "invalid_json", "request body is not valid JSON", "body", errs)
        first = errs[0] if errs else {"field": "body", "message": "invalid request"}
        return _json_error(422, "validation_error", f"{first['field']}: {first['message']}", first["field"], errs)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(got.encode(), api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key (send it in the X-API-Key header)", "X-API-Key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.post("/attribute")
    async def attribute(req: AttributeRequest) -> dict:  # type: ignore[valid-type]
        """Rank the training examples that most likely caused each input."""
        eng: Engine = state["engine"]
        recs = _records(req.inputs)
        q = await batcher.embed(eng, [r.as_text() for r in recs])
        try:
            answers = await run_in_threadpool(eng.answer, recs, q, req.k, req.rerank, req.rerank_k)
        except RerankUnavailable as e:
            raise ApiError(409, "rerank_unavailable", str(e), "rerank") from None
        return {"index": {"name": eng.manifest["name"], "build_id": eng.build_id}, "answers": answers}

    @v1.post("/flag")
    async def flag(req: FlagRequest) -> dict:  # type: ignore[valid-type]
        """The training examples most implicated in a set of behaviour examples (e.g. to filter them out), scored
        exactly as `influcoder filter` scores a dataset."""
        from .filter_index import flag_index

        eng: Engine = state["engine"]
        texts = [r.as_text() for r in _records(req.examples)]
        refs = [r.as_text() for r in _records(req.reference or [])]
        q = await batcher.embed(eng, texts + refs)  # one pass for both sets
        out = await run_in_threadpool(flag_index, eng, q[:len(texts)], q[len(texts):] if refs else None, req.k, req.aggregate,
                                      req.top_m, req.threshold)
        return {"index": {"name": eng.manifest["name"], "build_id": eng.build_id}, **out}

    @v1.get("/examples/{example_id:path}")
    async def example(example_id: str) -> dict:
        """One training example's preview, source and metadata."""
        eng: Engine = state["engine"]
        ex = eng.example(example_id)
        if ex is None:
            raise ApiError(404, "not_found", f"no training example with id {example_id!r} in this index", "example_id")
        return ex

    @v1.get("/index")
    async def index_info() -> dict:
        """The index manifest: counts, encoder, factory, run settings, OOD calibration summary."""
        return state["engine"].info()

    @v1.post("/admin/reload")
    async def admin_reload() -> dict:
        """Load the index folder again and swap it in; in-flight requests finish on the old version."""
        try:
            return await reload()
        except Exception as e:  # noqa: BLE001 - the old engine keeps serving
            raise ApiError(500, "reload_failed", f"reload failed, still serving the previous version: {e}") from None

    app.include_router(v1)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    async def readyz():
        eng = state["engine"]
        if eng is None or batcher.task is None or batcher.task.done():
            return _json_error(503, "not_ready", "no engine loaded or encoder batcher not running")
        return {"status": "ready", "build_id": eng.build_id, "count": eng.count}

    app.add_middleware(BodyLimit, max_bytes=lim.max_body_bytes)
    return app
