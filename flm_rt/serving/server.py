"""`flm-rt serve MODEL`: load the model, then run the OpenAI-compatible app on uvicorn with the batching engine
(or hand over to Ray Serve with ``--ray``). SIGTERM / Ctrl-C: stop accepting, finish the requests in flight, exit.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .. import cli_args
from ..api import Model, load
from ..errors import ConfigError

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:
    raise ConfigError(f"serving needs the 'serve' extra ({e.name} is not installed): pip install 'flm_rt[serve]'") \
        from None
from .app import Limits, ModelCard, create_app
from .engine import BatchingEngine, EngineConfig, Job, run_batch
from .metrics import ServingMetrics

log = logging.getLogger("flm_rt.serving")


@dataclass
class ServeSettings:
    model: str
    model_name: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: Optional[str] = None
    dtype: Optional[str] = None
    n_heads: Optional[int] = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    warmup: bool = True
    graceful_s: float = 60.0     # how long SIGTERM waits for requests in flight
    log_level: str = "info"


def model_id(ref: str, name: Optional[str]) -> str:
    """The id clients pass as ``model``: --model-name, else a path's last component, else the name as given."""
    if name:
        return name
    return os.path.basename(os.path.normpath(ref)) if os.path.exists(ref) else ref


def model_card(model: Model, ident: str) -> ModelCard:
    c = model.config
    return ModelCard(id=ident, length=c.length, vocab_size=c.vocab_size, two_time=c.two_time,
                     default_stochasticity=float(c.default_stochasticity),
                     tokenizer=model.tokenizer.kind if model.tokenizer is not None else None, created=int(time.time()))


def warm_up(model: Model) -> None:
    """One small batch through the whole path (kernels, prepacking, tokenizer) before /health says ok."""
    run_batch(model, [Job(n=1, steps=1, stochasticity=0.0, length=model.config.length, seed=0,
                          max_tokens=model.config.length)])


class LocalBackend:
    """The batching engine in this process."""
    step_stream = True

    def __init__(self, model: Model, card: ModelCard, config: EngineConfig, metrics: ServingMetrics,
                 warmup: bool = True):
        self.model, self.card, self.warmup = model, card, warmup
        self.engine = BatchingEngine(model, config, metrics)
        self.ready = False
        self.error: Optional[str] = None

    async def start(self) -> None:
        self.engine.start()
        if self.warmup:
            try:
                await self.engine.call(warm_up, self.model)
            except Exception as e:  # /health keeps answering 503 with the reason
                self.error = f"warm-up failed: {type(e).__name__}: {e}"
                log.error("flm-rt serve: %s", self.error)
                return
        self.ready = True
        log.info("flm-rt serve: model '%s' loaded and warmed; ready", self.card.id)

    async def stop(self) -> None:
        self.ready = False
        await self.engine.stop()

    def enqueue(self, job, on_step=None):
        return self.engine.enqueue(job, on_step)

    async def result(self, handle):
        return await self.engine.result(handle)

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth


def build_local_app(model: Model, settings: ServeSettings):
    metrics = ServingMetrics()
    backend = LocalBackend(model, model_card(model, model_id(settings.model, settings.model_name)),
                           settings.engine, metrics, warmup=settings.warmup)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # Warm up in the background: /health answers 503 "loading" until it is done.
        starting = asyncio.create_task(backend.start())
        yield
        await starting
        await backend.stop()
    return create_app(backend, settings.limits, metrics, lifespan=lifespan)


def serve(settings: ServeSettings) -> int:
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(message)s")
    model = load(settings.model, device=settings.device, dtype=settings.dtype, n_heads=settings.n_heads)
    app = build_local_app(model, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.graceful_s, access_log=False)
    _server_class()(config).run()  # SIGTERM / SIGINT: stop accepting, finish the requests in flight, exit 0
    return 0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM after its graceful shutdown (the process then dies by the
        signal); here a completed graceful shutdown is a normal exit (status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()
    return Server


# ------------------------------------------------------------------------------------------------------ CLI
def _positive(kind):
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flm-rt serve",
                                description="Serve a model over an OpenAI-compatible HTTP API with dynamic batching.")
    cli_args.add_model(p)
    p.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: the path's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    cli_args.add_device(p)
    p.add_argument("--n-heads", type=int, default=None, help="override the number of attention heads")
    p.add_argument("--max-batch", type=_positive(int), default=64, help="samples per generate call (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for company")
    p.add_argument("--max-queue", type=_positive(int), default=256, help="requests waiting; more get 429")
    p.add_argument("--timeout-s", type=_positive(float), default=120.0, help="per-request timeout (504)")
    p.add_argument("--max-n", type=_positive(int), default=16, help="largest n per request")
    p.add_argument("--max-steps", type=_positive(int), default=1024, help="largest steps per request")
    p.add_argument("--max-body-kb", type=_positive(int), default=64, help="largest request body (413)")
    p.add_argument("--graceful-s", type=_positive(float), default=60.0,
                   help="on SIGTERM, how long to wait for requests in flight")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    r = p.add_argument_group("Ray Serve (scale-out)")
    r.add_argument("--ray", action="store_true", help="run on Ray Serve: replicas of the batching engine")
    r.add_argument("--replicas", type=_positive(int), default=1)
    r.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="autoscale between MIN and MAX replicas")
    r.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default 1 when CUDA is used)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start or join a local one)")
    return p


def settings_from_args(args) -> ServeSettings:
    return ServeSettings(
        model=args.model, model_name=args.model_name, host=args.host, port=args.port, device=args.device,
        dtype=args.dtype, n_heads=args.n_heads,
        engine=EngineConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                            timeout_s=args.timeout_s),
        limits=Limits(max_n=args.max_n, max_steps=args.max_steps, max_body_bytes=args.max_body_kb * 1024),
        warmup=not args.no_warmup, graceful_s=args.graceful_s, log_level=args.log_level)


def cli_serve(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.max_wait_ms < 0:
        parser.error("--max-wait-ms must be >= 0")
    settings = settings_from_args(args)
    if args.ray:
        from .ray_serve import RayOptions, serve_ray

        return serve_ray(settings, RayOptions.from_args(args))
    return serve(settings)
