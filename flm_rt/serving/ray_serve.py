"""Scale-out on Ray Serve: replicas of the batching engine behind the same OpenAI-compatible app.

* ``FlmGenerator``: one model per replica; ``@serve.batch`` merges concurrent jobs (counted in samples), and
  ``run_batch`` runs each (steps, stochasticity, length) group in one ``generate`` call, as the local server does.
* ``OpenAIIngress``: the FastAPI app of :mod:`flm_rt.serving.app` in front, calling the replicas by handle.

``flm-rt serve MODEL --ray --replicas N`` (or ``--autoscale MIN:MAX``) starts both; ``serve run
flm_rt.serving.ray_serve:app_builder model=PATH replicas=N`` does the same from Ray's own CLI. See docs/SERVING.md.
"""
from __future__ import annotations

import asyncio
import collections
import signal
import threading
from dataclasses import dataclass, replace
from typing import Optional

from ray import serve
from ray.serve.exceptions import BackPressureError

from ..api import load
from ..errors import ConfigError
from .app import Limits, ModelCard, create_app
from .engine import EngineConfig, QueueFullError, RequestTimeoutError, group_jobs, run_batch
from .metrics import ServingMetrics
from .server import ServeSettings, model_card, model_id, warm_up


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    autoscale: Optional[tuple] = None   # (min, max) replicas
    num_gpus: Optional[float] = None    # per replica; default 1 when the device is CUDA, else 0
    address: Optional[str] = None       # an existing cluster ("auto", "ray://host:10001"...), else a local one

    @classmethod
    def from_args(cls, args) -> "RayOptions":
        auto = None
        if args.autoscale:
            try:
                lo, hi = (int(x) for x in args.autoscale.split(":"))
            except ValueError:
                raise ConfigError(f"--autoscale takes MIN:MAX, got {args.autoscale!r}") from None
            if not 0 <= lo <= hi or hi < 1:
                raise ConfigError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {args.autoscale!r}")
            auto = (lo, hi)
        return cls(replicas=args.replicas, autoscale=auto, num_gpus=args.num_gpus, address=args.address)


@serve.deployment(name="FlmGenerator")
class FlmGenerator:
    def __init__(self, model_ref: str, device: Optional[str], dtype: Optional[str], n_heads: Optional[int],
                 engine: EngineConfig, warmup: bool = True):
        self.model = load(model_ref, device=device, dtype=dtype, n_heads=n_heads)
        self.max_batch = engine.max_batch
        self.complete.set_max_batch_size(engine.max_batch)
        self.complete.set_batch_wait_timeout_s(engine.max_wait_ms / 1e3)
        if warmup:
            warm_up(self.model)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=lambda jobs: sum(j.n for j in jobs))
    async def complete(self, jobs: list) -> list:
        return await asyncio.get_running_loop().run_in_executor(None, self._run, jobs)

    def _run(self, jobs: list) -> list:
        results = [None] * len(jobs)
        for idx in group_jobs(jobs, self.max_batch):
            for i, r in zip(idx, run_batch(self.model, [jobs[i] for i in idx])):
                results[i] = r
        return results


class RayBackend:
    """The app's backend: jobs go to the FlmGenerator replicas through a deployment handle."""
    step_stream = False
    ready = True

    def __init__(self, handle, card: ModelCard, timeout_s: float, metrics: ServingMetrics):
        self.handle, self.card, self.timeout_s, self.metrics = handle, card, timeout_s, metrics
        self._in_flight = 0
        self._seen_batches: collections.OrderedDict = collections.OrderedDict()

    def enqueue(self, job, on_step=None):
        self._in_flight += 1
        return self.handle.complete.remote(job)

    async def result(self, response):
        try:
            r = await asyncio.wait_for(response, self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestTimeoutError(f"the request did not finish within {self.timeout_s:g} s") from None
        except BackPressureError as e:
            raise QueueFullError(f"the replicas' queues are full; retry later ({e})") from None
        finally:
            self._in_flight -= 1
        if r.batch_id not in self._seen_batches:  # one observation per batch, as the local engine does
            self._seen_batches[r.batch_id] = None
            if len(self._seen_batches) > 4096:
                self._seen_batches.popitem(last=False)
            self.metrics.batch_size.observe(r.batch_size)
        return r

    @property
    def queue_depth(self) -> int:
        return self._in_flight


@serve.deployment(name="OpenAIIngress")
@serve.ingress()
class OpenAIIngress:
    def __init__(self, generator, card: ModelCard, limits: Limits, timeout_s: float):
        self.metrics = ServingMetrics()
        self.backend = RayBackend(generator, card, timeout_s, self.metrics)
        self.limits = limits

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.limits, self.metrics)


def build_app(settings: ServeSettings, options: RayOptions, card: ModelCard):
    """The Ray Serve application: ingress -> FlmGenerator replicas."""
    e = settings.engine
    gpus = options.num_gpus
    if gpus is None:
        gpus = 1 if (settings.device or "").startswith("cuda") else 0
    scaling = ({"autoscaling_config": {"min_replicas": options.autoscale[0], "max_replicas": options.autoscale[1],
                                       "target_ongoing_requests": max(2, e.max_batch // 2)}}
               if options.autoscale else {"num_replicas": options.replicas})
    generator = FlmGenerator.options(
        ray_actor_options={"num_gpus": gpus, "num_cpus": 1}, max_ongoing_requests=max(2 * e.max_batch, 8),
        max_queued_requests=e.max_queue, **scaling,
    ).bind(settings.model, settings.device, settings.dtype, settings.n_heads, e, settings.warmup)
    limits = replace(settings.limits, max_n=min(settings.limits.max_n, e.max_batch))
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(generator, card, limits, e.timeout_s)


def describe(settings: ServeSettings) -> ModelCard:
    """Load the model once here (CPU) to check it and describe it; the replicas load their own copy."""
    model = load(settings.model, device="cpu", dtype=None, n_heads=settings.n_heads)
    return model_card(model, model_id(settings.model, settings.model_name))


def serve_ray(settings: ServeSettings, options: RayOptions) -> int:
    import ray

    card = describe(settings)
    ray.init(address=options.address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, options, card), name="flm_rt", route_prefix="/")
    print(f"flm-rt serve: Ray Serve app 'flm_rt' ready on http://{settings.host}:{settings.port}/v1 "
          f"({options.autoscale or options.replicas} replica(s)); Ctrl-C or SIGTERM stops it", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas finish their requests in flight (graceful_shutdown_timeout_s)
    ray.shutdown()
    return 0


def app_builder(args: dict):
    """For ``serve run flm_rt.serving.ray_serve:app_builder model=PATH [replicas=N] [max_batch=64] ...``."""
    known = {"model", "model_name", "device", "dtype", "replicas", "max_batch", "max_wait_ms", "max_queue",
             "timeout_s", "max_n", "num_gpus", "min_replicas", "max_replicas"}
    unknown = set(args) - known
    if unknown or "model" not in args:
        raise ConfigError(f"app_builder takes model=... and optionally {sorted(known - {'model'})}; "
                          f"got {sorted(args)}")
    d = EngineConfig()
    engine = EngineConfig(max_batch=int(args.get("max_batch", d.max_batch)),
                          max_wait_ms=float(args.get("max_wait_ms", d.max_wait_ms)),
                          max_queue=int(args.get("max_queue", d.max_queue)),
                          timeout_s=float(args.get("timeout_s", d.timeout_s)))
    settings = ServeSettings(model=args["model"], model_name=args.get("model_name"), device=args.get("device"),
                             dtype=args.get("dtype"), engine=engine,
                             limits=Limits(max_n=int(args.get("max_n", Limits().max_n))))
    auto = None
    if "max_replicas" in args:
        auto = (int(args.get("min_replicas", 1)), int(args["max_replicas"]))
    options = RayOptions(replicas=int(args.get("replicas", 1)), autoscale=auto,
                         num_gpus=float(args["num_gpus"]) if "num_gpus" in args else None)
    return build_app(settings, options, describe(settings))
