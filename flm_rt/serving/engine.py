"""Dynamic batching, independent of HTTP: jobs that arrive together are merged into one ``generate`` call.

A ``Job`` is one completion request (n samples of one seed). ``run_batch`` runs jobs that share (steps,
stochasticity, length) in one call, giving sample k of a job the generator of ``sample_seed(seed, k)``: the
draws of ``flm_rt.generate(seed=seed)``, whatever else is in the batch. ``BatchingEngine`` queues jobs on an
asyncio loop, forms batches (up to ``max_batch`` samples, waiting at most ``max_wait_ms`` after the oldest job
arrived) and runs them on one worker thread, so the event loop keeps answering while a batch runs.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..api import Model, generate, sample_seed
from ..errors import FlmError


class QueueFullError(FlmError):
    """The queue holds --max-queue jobs already (HTTP 429)."""


class RequestTimeoutError(FlmError):
    """A job did not finish within the per-request timeout (HTTP 504)."""


class ShuttingDownError(FlmError):
    """The engine is stopping and takes no new jobs (HTTP 503)."""


@dataclass(frozen=True)
class Job:
    n: int
    steps: int
    stochasticity: float
    length: int          # generated sequence length (the model's length unless seq_len is given)
    seed: int
    max_tokens: int      # returned tokens: the generated sequence cut there
    stream_steps: bool = False  # wants the estimate after every step

    @property
    def key(self) -> tuple:
        return (self.steps, self.stochasticity, self.length)


@dataclass
class Sample:
    text: str
    token_ids: list
    finish_reason: str   # "stop": the whole sequence; "length": cut at max_tokens


@dataclass
class JobResult:
    samples: list
    batch_size: int      # samples in the generate call that served this job
    batch_id: str
    generate_s: float    # time of that generate call


StepCallback = Callable[[int, list], None]  # (step, samples) with the current estimates


def _samples(model: Model, rows: torch.Tensor, max_tokens: int, final: bool) -> list:
    tok = model.tokenizer
    out = []
    for row in rows:
        ids = row[:max_tokens].tolist()
        text = tok.decode(ids) if tok is not None else " ".join(map(str, ids))  # no tokenizer: ids as text
        out.append(Sample(text, ids, "stop" if final and max_tokens >= rows.shape[1] else "length"))
    return out


def run_batch(model: Model, jobs: list, on_step: Optional[list] = None) -> list:
    """Run jobs with one key in one generate call; one JobResult per job. ``on_step[j]`` (optional, per job)
    receives job j's estimates after each step, for jobs with ``stream_steps``."""
    if len({j.key for j in jobs}) != 1:
        raise ValueError("run_batch takes jobs with one (steps, stochasticity, length) key")
    first = jobs[0]
    gens = [torch.Generator(device=model.device).manual_seed(sample_seed(j.seed, k)) for j in jobs for k in range(j.n)]
    starts = [0]
    for j in jobs:
        starts.append(starts[-1] + j.n)
    callbacks = [(i, cb) for i, cb in enumerate(on_step or []) if cb is not None and jobs[i].stream_steps]

    def report(step: int, t: float, ids: torch.Tensor) -> None:
        if step == first.steps - 1:
            return  # the final output is delivered as the result
        ids = ids.cpu()
        for i, cb in callbacks:
            cb(step, _samples(model, ids[starts[i]:starts[i + 1]], jobs[i].max_tokens, final=False))

    gen = generate(model, steps=first.steps, stochasticity=first.stochasticity, seq_len=first.length,
                   generator=gens, decode=False, callback=report if callbacks else None)
    batch_id = uuid.uuid4().hex[:12]
    return [JobResult(_samples(model, gen.token_ids[starts[i]:starts[i + 1]], j.max_tokens, final=True),
                      len(gens), batch_id, gen.elapsed_s) for i, j in enumerate(jobs)]


def group_jobs(jobs: list, max_batch: int) -> list:
    """Indices of jobs split into runnable batches: same key, at most max_batch samples (a bigger job alone)."""
    groups: dict = collections.OrderedDict()
    for i, j in enumerate(jobs):
        groups.setdefault(j.key, []).append(i)
    out = []
    for idx in groups.values():
        cur, size = [], 0
        for i in idx:
            if cur and size + jobs[i].n > max_batch:
                out.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += jobs[i].n
        out.append(cur)
    return out


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 64          # samples per generate call (1 turns batching off)
    max_wait_ms: float = 5.0     # how long the oldest job waits for company
    max_queue: int = 256         # jobs waiting; more get QueueFullError
    timeout_s: float = 120.0     # per job, from arrival to result


@dataclass(eq=False)
class _Pending:
    job: Job
    future: asyncio.Future
    on_step: Optional[StepCallback]
    arrived: float = field(default_factory=time.monotonic)


class BatchingEngine:
    """Queue + scheduler on the running asyncio loop; generation on one worker thread."""

    def __init__(self, model: Model, config: EngineConfig = EngineConfig(), metrics=None):
        self.model = model
        self.config = config
        self.metrics = metrics
        self._pending: collections.deque = collections.deque()
        self._wake: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._stopping = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flm_rt-generate")

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="flm_rt-batcher")

    async def stop(self) -> None:
        """Finish every queued job, then stop (new jobs get ShuttingDownError)."""
        self._stopping = True
        if self._task is not None:
            self._wake.set()
            await self._task
        self._executor.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def call(self, fn, *args):
        """Run fn(*args) on the generation thread (e.g. a warm-up), in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- submitting --------------------------------------------------------------------------------------
    def enqueue(self, job: Job, on_step: Optional[StepCallback] = None) -> _Pending:
        """Queue a job now (raises QueueFullError / ShuttingDownError); ``await engine.result(p)`` for it."""
        if self._stopping or self._task is None:
            raise ShuttingDownError("the server is shutting down")
        if len(self._pending) >= self.config.max_queue:
            raise QueueFullError(f"the queue is full ({self.config.max_queue} requests waiting); retry later")
        p = _Pending(job, asyncio.get_running_loop().create_future(), on_step)
        self._pending.append(p)
        self._gauge()
        self._wake.set()
        return p

    async def result(self, p: _Pending) -> JobResult:
        """Wait for a queued job; on timeout or cancellation (client gone) it leaves the queue, and a batch
        that already holds it runs on for the others."""
        left = self.config.timeout_s - (time.monotonic() - p.arrived)
        try:
            return await asyncio.wait_for(asyncio.shield(p.future), max(left, 0.0))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request did not finish within {self.config.timeout_s:g} s") from None
        finally:
            if not p.future.done():
                p.future.cancel()
            if p in self._pending:
                self._pending.remove(p)
                self._gauge()

    async def submit(self, job: Job, on_step: Optional[StepCallback] = None) -> JobResult:
        return await self.result(self.enqueue(job, on_step))

    # -- scheduling ----------------------------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    def _take_batch(self) -> list:
        """The oldest live job's key group, up to max_batch samples, in arrival order."""
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()
        if not self._pending:
            return []
        key, batch, size = self._pending[0].job.key, [], 0
        for p in list(self._pending):
            if p.future.done() or p.job.key != key:
                continue
            if batch and size + p.job.n > self.config.max_batch:
                break
            batch.append(p)
            size += p.job.n
        for p in batch:
            self._pending.remove(p)
        self._gauge()
        return batch

    def _group_size(self, key) -> int:
        return sum(p.job.n for p in self._pending if p.job.key == key and not p.future.done())

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._pending[0]
            deadline = head.arrived + self.config.max_wait_ms / 1e3
            while (not self._stopping and self._group_size(head.job.key) < self.config.max_batch
                   and not head.future.done()):
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if batch:
                await self._run(loop, batch)

    async def _run(self, loop, batch: list) -> None:
        def relay(p: _Pending) -> Optional[Callable]:
            if p.on_step is None:
                return None
            return lambda step, samples: loop.call_soon_threadsafe(p.on_step, step, samples)

        jobs = [p.job for p in batch]
        size = sum(j.n for j in jobs)
        if self.metrics is not None:
            self.metrics.running.set(size)
        try:
            results = await loop.run_in_executor(self._executor, run_batch, self.model, jobs,
                                                  [relay(p) for p in batch])
        except Exception as e:  # reported to each waiting request; the engine keeps serving
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        finally:
            if self.metrics is not None:
                self.metrics.running.set(0)
        if self.metrics is not None:
            self.metrics.batch_size.observe(size)
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)
