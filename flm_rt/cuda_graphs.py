"""CUDA graphs for ``generate``: one whole seeded generation captured per shape, then replayed.

At batch 1 a one-step OWT generation is a few hundred kernels of microseconds each, so launch overhead is a large
share of it. A :class:`GraphedGeneration` captures the sampler loop (``samplers.run_plan``) once for a fixed
(batch, length, steps, stochasticity, noise space, kernels) on the model's device and dtype, with the random draws
made inside the graph by per-sample CUDA generators registered with it. Replaying with a seed re-seeds those
generators first, so the replay draws exactly what an eager ``generate(seed=...)`` draws: sample k's draws come
from a generator seeded with ``sample_seed(seed, k)``, in the same order. Inputs and outputs are static buffers
owned by the graph; :meth:`GraphedGeneration.replay` returns the static ids, valid until the next replay.

A model keeps its captured graphs (:func:`graph_for`, a small LRU per model), so the first call of a shape pays
for warm-up and capture and later calls only replay. ``generate(..., cuda_graph=...)`` decides when to use them.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import GenerationError
from .noise import draw_layout, sample_seed, seeded_draw
from .samplers import make_plan, run_plan

MAX_GRAPHS_PER_MODEL = 8
AUTO_MAX_BATCH = 16  # "auto" captures up to this batch size: above it, launches are a small share of a step


@dataclass(frozen=True)
class GraphKey:
    batch: int
    length: int
    steps: int
    stochasticity: float
    space: str
    kernels: Optional[str]


class GraphedGeneration:
    """One captured generation. ``replay(seed)`` -> static int64 ids [B, L] on the device."""

    def __init__(self, model, key: GraphKey):
        dev = model.device
        if dev.type != "cuda":
            raise GenerationError(f"CUDA graphs need a CUDA model, this one is on {dev}")
        cfg = model.config
        self.key = key
        self.device = dev
        plan = make_plan(two_time=cfg.two_time, steps=key.steps, stochasticity=key.stochasticity,
                         vocab_size=cfg.vocab_size)
        shape, finish = draw_layout(model, key.batch, key.length, key.space)
        self.gens = [torch.Generator(device=dev) for _ in range(key.batch)]
        draw = seeded_draw(self.gens, shape, dev, finish)
        self.graph = torch.cuda.CUDAGraph()
        for g in self.gens:
            self.graph.register_generator_state(g)

        def run() -> torch.Tensor:
            return run_plan(model.denoiser, plan, draw, kernels=key.kernels, space=key.space)

        # Warm-up on a side stream (cuBLAS handles, workspaces, lazy module loading), then capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for k, g in enumerate(self.gens):
                g.manual_seed(k)
            run()
        torch.cuda.current_stream(dev).wait_stream(side)
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.ids = run()
        self.replays = 0

    def replay(self, seed: int) -> torch.Tensor:
        for k, g in enumerate(self.gens):
            g.manual_seed(sample_seed(seed, k))
        self.graph.replay()
        self.replays += 1
        return self.ids


def graph_for(model, key: GraphKey) -> GraphedGeneration:
    """The model's captured graph for ``key`` (captured on first use; at most MAX_GRAPHS_PER_MODEL kept, least
    recently used dropped first)."""
    cache: OrderedDict = model.__dict__.setdefault("_cuda_graphs", OrderedDict())
    g = cache.get(key)
    if g is None:
        g = GraphedGeneration(model, key)
        cache[key] = g
        while len(cache) > MAX_GRAPHS_PER_MODEL:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return g


def wanted(mode, *, device: torch.device, batch: int, seeded: bool, callback: bool) -> bool:
    """Whether ``generate`` replays a graph. ``mode``: "auto" (CUDA, a seeded call, no per-step callback,
    batch <= AUTO_MAX_BATCH), True/"on" (the same conditions, or a GenerationError that names the one not met),
    False/"off". None reads env FLM_RT_CUDA_GRAPHS (default auto)."""
    if mode is None:
        mode = os.environ.get("FLM_RT_CUDA_GRAPHS", "auto").strip().lower() or "auto"
    if mode in (False, "0", "off", "false", "no"):
        return False
    forced = mode in (True, "1", "on", "true", "yes")
    if not forced and mode != "auto":
        raise GenerationError(f"cuda_graph must be 'auto', True or False (env FLM_RT_CUDA_GRAPHS: auto|on|off), "
                              f"got {mode!r}")
    why = None
    if device.type != "cuda":
        why = f"the model is on {device}, not a CUDA device"
    elif not seeded:
        why = "the call passes explicit noise or a generator (graphs replay seeded draws only)"
    elif callback:
        why = "a per-step callback or progress bar needs the host between steps"
    elif not forced and batch > AUTO_MAX_BATCH:
        why = f"batch {batch} > {AUTO_MAX_BATCH}"
    if why is not None and forced:
        raise GenerationError(f"cuda_graph=True cannot be used here: {why}")
    return why is None
