"""The OpenAI-compatible HTTP layer (FastAPI): /v1/completions, /v1/models, /health, /metrics.

It talks to a backend (the local ``BatchingEngine``, or Ray Serve replicas) through ``enqueue``/``result``;
request checking, the OpenAI response and error formats, streaming, the body-size limit and the request
metrics live here, once for both.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FlmError, GenerationError
from ..samplers import SamplerSettingsError, check_settings
from .engine import Job, JobResult, QueueFullError, RequestTimeoutError, ShuttingDownError
from .metrics import CONTENT_TYPE, ServingMetrics

log = logging.getLogger("flm_rt.serving")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ModelCard:
    """What the HTTP layer needs to know about the served model."""
    id: str
    length: int
    vocab_size: int
    two_time: bool
    default_stochasticity: float
    tokenizer: Optional[str]
    created: int


@dataclass(frozen=True)
class Limits:
    max_n: int = 16
    max_steps: int = 1024
    max_body_bytes: int = 64 * 1024


class Backend(Protocol):
    card: ModelCard
    ready: bool
    step_stream: bool      # can report the estimate after every step

    def enqueue(self, job: Job, on_step=None) -> Any: ...
    async def result(self, handle: Any) -> JobResult: ...
    @property
    def queue_depth(self) -> int: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class CompletionRequest(BaseModel):
    """OpenAI's completion request, plus flm_rt's ``steps``, ``stochasticity`` and ``seq_len``."""
    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]], None] = None
    n: StrictInt = 1
    max_tokens: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[dict] = None
    steps: StrictInt = 1
    stochasticity: Optional[float] = Field(default=None, strict=True)
    seq_len: Optional[StrictInt] = None
    # OpenAI fields accepted and ignored: they do not apply to a one-shot denoiser.
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    user: Optional[StrictStr] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    echo: Optional[StrictBool] = None
    # OpenAI fields flm_rt cannot honour: refused unless neutral.
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


def _prompt_is_empty(prompt) -> bool:
    if prompt is None or prompt == "" or prompt == []:
        return True
    return isinstance(prompt, list) and all(p == "" or p == [] for p in prompt)


def make_job(req: CompletionRequest, card: ModelCard, limits: Limits) -> Job:
    """Check a request against the model and the limits; ApiError (400/404) names the parameter."""
    if req.model != card.id:
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{card.id}'",
                       param="model", code="model_not_found")
    if not _prompt_is_empty(req.prompt):
        raise ApiError(400, "flm_rt models generate unconditionally: the prompt must be empty (\"\")",
                       param="prompt", code="prompt_not_supported")
    if not 1 <= req.n <= limits.max_n:
        raise ApiError(400, f"n must be between 1 and {limits.max_n}, got {req.n}", param="n")
    if not 1 <= req.steps <= limits.max_steps:
        raise ApiError(400, f"steps must be between 1 and {limits.max_steps}, got {req.steps}", param="steps")
    length = card.length if req.seq_len is None else req.seq_len
    if not 1 <= length <= card.length:
        raise ApiError(400, f"seq_len must be between 1 and the model's length {card.length}, got {req.seq_len}",
                       param="seq_len")
    max_tokens = length if req.max_tokens is None else req.max_tokens
    if not 1 <= max_tokens <= length:
        raise ApiError(400, f"max_tokens must be between 1 and the generated length {length}, got {max_tokens}",
                       param="max_tokens")
    s = card.default_stochasticity if req.stochasticity is None else req.stochasticity
    try:
        _, s = check_settings(two_time=card.two_time, steps=req.steps, stochasticity=s)
    except SamplerSettingsError as e:
        raise ApiError(400, str(e), param=e.param) from None
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise ApiError(400, f"seed must be between 0 and {MAX_SEED}, got {req.seed}", param="seed")
    if req.logprobs:
        raise ApiError(400, "logprobs are not supported by flm_rt", param="logprobs")
    if req.best_of not in (None, 1, req.n):
        raise ApiError(400, "best_of is not supported by flm_rt (leave it out)", param="best_of")
    if req.suffix:
        raise ApiError(400, "suffix is not supported: flm_rt models generate unconditionally", param="suffix")
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(7), "little")
    return Job(n=req.n, steps=req.steps, stochasticity=float(s), length=length, seed=seed, max_tokens=max_tokens,
               stream_steps=req.stream and req.steps > 1)


def _validation_message(exc: RequestValidationError) -> tuple:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if e.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if e.get("type") == "missing":
        return f"missing required parameter: {param}", param
    if e.get("type") == "model_attributes_type":
        return "the request body must be a JSON object", None
    return f"invalid value for {'.'.join(loc) or 'the body'}: {e.get('msg')}", param


class _RequestGuard:
    """Pure ASGI middleware: the body-size limit (413) and the completion request metrics."""

    def __init__(self, app, limits: Limits, metrics: ServingMetrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tracked = scope["path"] == "/v1/completions"
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            body_receive = await self._bounded_body(scope, receive)
            if body_receive is None:
                status["code"] = 413
                err = ApiError(413, f"request body larger than {self.limits.max_body_bytes} bytes",
                               code="request_too_large")
                return await err.response()(scope, receive, send)
            await self.app(scope, body_receive, send_tracked)
        finally:
            if tracked:
                self.metrics.requests.labels(status=str(status["code"])).inc()
                self.metrics.latency.observe(time.perf_counter() - t0)

    async def _bounded_body(self, scope, receive):
        """Read the body up front (it is small); None when it exceeds the limit."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        limit = self.limits.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return None
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return receive if msg["type"] == "http.disconnect" else None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def body_receive():
            return replay.pop() if replay else await receive()
        return body_receive


def create_app(backend: Backend, limits: Limits = Limits(), metrics: Optional[ServingMetrics] = None,
               lifespan=None) -> FastAPI:
    metrics = metrics or ServingMetrics()
    app = FastAPI(title="flm_rt", description="OpenAI-compatible completions from FLM / FMLM models",
                  lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.backend, app.state.metrics, app.state.limits = backend, metrics, limits
    app.add_middleware(_RequestGuard, limits=limits, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error while serving %s", request.url.path)
        return ApiError(500, "internal server error (details are in the server log)", type="server_error").response()

    @app.get("/health")
    async def health():
        if not backend.ready:
            error = getattr(backend, "error", None)
            return JSONResponse({"status": "error", "message": error} if error else {"status": "loading"},
                                status_code=503)
        return {"status": "ok", "model": backend.card.id}

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(backend.queue_depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        c = backend.card
        return {"object": "list", "data": [{
            "id": c.id, "object": "model", "created": c.created, "owned_by": "flm_rt",
            "length": c.length, "vocab_size": c.vocab_size, "kind": "FMLM" if c.two_time else "FLM",
            "tokenizer": c.tokenizer, "default_stochasticity": c.default_stochasticity}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if not backend.ready:
            raise ApiError(503, "the model is still loading; retry when /health says ok", type="server_error",
                           code="not_ready")
        job = make_job(req, backend.card, limits)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if req.stream and job.stream_steps and backend.step_stream:
            events: asyncio.Queue = asyncio.Queue()
            handle = _enqueue(backend, job, lambda step, samples: events.put_nowait((step, samples)))
            return _sse(_stream_steps(backend, handle, events, job, cid, created, include_usage))
        result = await _result(backend, _enqueue(backend, job, None))
        metrics.tokens.inc(job.n * job.max_tokens)
        if req.stream:
            return _sse(_stream_final(result, job, cid, created, include_usage))
        return _completion(result, job, cid, created)

    def _completion(result: JobResult, job: Job, cid: str, created: int) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": backend.card.id,
                "system_fingerprint": "flm_rt", "seed": job.seed,
                "choices": [{"index": i, "text": s.text, "finish_reason": s.finish_reason, "logprobs": None,
                             "token_ids": s.token_ids} for i, s in enumerate(result.samples)],
                "usage": _usage(job)}

    def _chunk(cid, created, choices, **extra) -> str:
        return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                      "model": backend.card.id, "choices": choices, **extra}) + "\n\n"

    async def _stream_final(result: JobResult, job: Job, cid, created, include_usage):
        for i, s in enumerate(result.samples):
            yield _chunk(cid, created, [{"index": i, "text": s.text, "finish_reason": s.finish_reason,
                                         "logprobs": None, "token_ids": s.token_ids}], seed=job.seed)
        if include_usage:
            yield _chunk(cid, created, [], usage=_usage(job))
        yield "data: [DONE]\n\n"

    async def _stream_steps(backend, handle, events: asyncio.Queue, job: Job, cid, created, include_usage):
        """A chunk per sample after every step: empty ``text`` (so that joined texts are the final text) and
        the current estimate in ``estimate``; the final chunk per sample carries the text."""
        waiter = asyncio.ensure_future(_result(backend, handle))
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    step, samples = getter.result()
                    for i, s in enumerate(samples):
                        yield _chunk(cid, created, [{"index": i, "text": "", "finish_reason": None,
                                                     "logprobs": None, "estimate": s.text}], step=step)
                    continue
                getter.cancel()
                while not events.empty():  # estimates that arrived with the result are already stale
                    events.get_nowait()
                try:
                    result = waiter.result()
                except ApiError as e:
                    yield "data: " + json.dumps(e.body()) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                metrics.tokens.inc(job.n * job.max_tokens)
                async for part in _stream_final(result, job, cid, created, include_usage):
                    yield part
                return
        finally:
            waiter.cancel()

    return app


def _usage(job: Job) -> dict:
    return {"prompt_tokens": 0, "completion_tokens": job.n * job.max_tokens, "total_tokens": job.n * job.max_tokens}


def _sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _enqueue(backend: Backend, job: Job, on_step):
    try:
        return backend.enqueue(job, on_step)
    except QueueFullError as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
    except ShuttingDownError as e:
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None


async def _result(backend: Backend, handle) -> JobResult:
    try:
        return await backend.result(handle)
    except QueueFullError as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="queue_full") from None
    except RequestTimeoutError as e:
        raise ApiError(504, str(e), type="server_error", code="timeout") from None
    except ShuttingDownError as e:
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
    except GenerationError as e:
        raise ApiError(400, str(e)) from None
    except FlmError as e:
        raise ApiError(500, f"generation failed: {e}", type="server_error") from None
