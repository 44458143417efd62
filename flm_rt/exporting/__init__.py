"""Export a model to self-contained graphs: ONNX, TorchScript or an AOTInductor package.

``flm_rt.export(model, path, format=...)`` is :func:`flm_rt.exporting.export`; this package holds the rest:

* :mod:`.graphs`: the exported modules (``GenerateGraph`` runs the one sampler loop, ``DenoiserGraph``);
* :mod:`.formats`: one writer per format, and the ONNX attention op;
* :mod:`.writer`: ``export()`` itself (checks, the sidecar, atomic writes);
* :mod:`.artifacts`: ``read_sidecar``, ``load_exported``, ``time_exported``;
* :mod:`.cli`: ``flm-rt export``.

Two graphs can be exported (``what``):

* ``"generate"``: the whole sampler, unrolled over ``steps`` with its schedule (network times and update
  coefficients of :func:`flm_rt.samplers.make_plan`) baked in as constants.
  ``forward(noise [S, B, L, V] float32) -> token_ids [B, L] int64``; ``S`` = the number of Gaussian draws the
  plan consumes (z_0, then one per stochastic step, SPEC order), so feeding the golden draws reproduces the golden
  ids. With ``self_noise=True`` the draws are taken inside the graph instead and the input is
  ``batch_like int64 [B]`` (only its length matters: it sets the batch size).
* ``"denoiser"``: one network call, ``forward(x [B, L, V], t [B][, t_prime [B]]) -> soft-capped logits [B, L, V]``.

Every artifact gets a JSON sidecar ``<path>.json`` (shapes, schedule, tokenizer, inputs/outputs, version) that the
standalone consumers in ``export/`` read; they do not need flm_rt. Writes are atomic: a failed export leaves
nothing under the requested name.
"""
from __future__ import annotations

from ..errors import ExportError
from .artifacts import load_exported, read_sidecar, time_exported
from .cli import cli_export
from .graphs import DenoiserGraph, GenerateGraph
from .writer import FORMATS, WHATS, export

__all__ = ["export", "cli_export", "ExportError", "GenerateGraph", "DenoiserGraph", "FORMATS", "WHATS", "read_sidecar",
           "load_exported", "time_exported"]
