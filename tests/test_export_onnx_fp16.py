"""The float16 ONNX variant and run_onnx.py's providers: the converted graph is really float16 (weights), keeps its
fp32-noise-in / int64-ids-out interface, runs on ONNX Runtime's CPU provider (load_exported and run_onnx.py through
IOBinding) and agrees with the float32 sampler on nearly every position; --provider cuda is refused cleanly where
onnxruntime has no CUDA provider, and runs where it has one (@pytest.mark.cuda)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flm_rt
from flm_rt.errors import ExportError
from flm_rt.exporting import load_exported, read_sidecar

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")

RUN_ONNX = Path(__file__).resolve().parents[1] / "export" / "run_onnx.py"
STEPS, S = 4, 1.0
BATCH = 32  # 32 x 32 = 1024 positions
# Measured on the tiny golden FMLM (4 steps, s = 1, 1024 positions, seeds 0-2): 99.7-100% of the fp16 graph's ids
# equal the float32 sampler's (one step, and 4 steps at s = 0: 99.9-100%). The bound leaves room for other CPUs'
# fp16 kernels.
MIN_AGREEMENT = 0.97


@pytest.fixture(scope="module")
def fp16_graph(tmp_path_factory, fmlm_model) -> Path:
    path = tmp_path_factory.mktemp("onnx-fp16") / "fmlm-fp16.onnx"
    flm_rt.export(fmlm_model, path, steps=STEPS, stochasticity=S, dtype="float16")
    return path


@pytest.fixture(scope="module")
def noise_and_ids(fmlm_model, fp16_graph):
    draws = read_sidecar(fp16_graph)["draws"]
    cfg = fmlm_model.config
    noise = torch.randn(draws, BATCH, cfg.length, cfg.vocab_size, generator=torch.Generator().manual_seed(0))
    want = fmlm_model.generate(steps=STEPS, stochasticity=S, noise=noise, decode=False, kernels="torch").token_ids
    return noise, want


def _run_onnx(path, *args):
    env = dict(os.environ, PYTHONPATH="")  # the consumer must not need flm_rt
    return subprocess.run([sys.executable, str(RUN_ONNX), str(path), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(Path(path).parent))


def test_fp16_graph_is_float16_with_fp32_interface(fp16_graph):
    meta = read_sidecar(fp16_graph)
    assert meta["dtype"] == "float16"
    assert meta["inputs"][0]["dtype"] == "float32" and meta["outputs"][0]["dtype"] == "int64"
    m = onnx.load(str(fp16_graph))
    floats = [i for i in m.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    n16 = sum(int(np.prod(i.dims)) for i in floats if i.data_type == onnx.TensorProto.FLOAT16)
    n32 = sum(int(np.prod(i.dims)) for i in floats if i.data_type == onnx.TensorProto.FLOAT)
    assert n16 / (n16 + n32) > 0.9, (n16, n32)  # measured: all 301,622 weights are float16
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert any(n.op_type == "MatMul" for n in m.graph.node)
    assert meta["export_info"]["float16_initializers"] > 0


def test_fp16_graph_agrees_with_fp32_generate(fp16_graph, noise_and_ids):
    noise, want = noise_and_ids
    ids = load_exported(fp16_graph)(noise)
    assert ids.dtype == torch.int64 and ids.shape == want.shape
    agreement = (ids == want).float().mean().item()
    assert agreement >= MIN_AGREEMENT, agreement


def test_run_onnx_fp16_cpu_provider(fp16_graph, noise_and_ids, tmp_path):
    noise, _ = noise_and_ids
    want = load_exported(fp16_graph)(noise[:, :3])
    npy = tmp_path / "noise.npy"
    np.save(npy, noise[:, :3].numpy())
    r = _run_onnx(fp16_graph, "--noise", npy, "--provider", "cpu", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["provider"] == "CPUExecutionProvider" and out["dtype"] == "float16"
    assert out["token_ids"] == want.tolist()
    r = _run_onnx(fp16_graph, "--batch", "2", "--provider", "auto")  # text mode names the provider that ran
    assert r.returncode == 0 and "ExecutionProvider" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime has CUDA here")
def test_run_onnx_provider_cuda_refused_without_it(fp16_graph):
    r = _run_onnx(fp16_graph, "--provider", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "CUDAExecutionProvider" in r.stderr, r.stderr


def test_onnx_bfloat16_refused(tmp_path, fmlm_model):
    with pytest.raises(ExportError, match="no bfloat16 kernels"):
        flm_rt.export(fmlm_model, tmp_path / "bf16.onnx", dtype="bfloat16")
    assert not any(tmp_path.iterdir())


@pytest.mark.cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
def test_run_onnx_cuda_provider(fp16_graph, noise_and_ids, tmp_path):
    noise, want = noise_and_ids
    npy = tmp_path / "noise.npy"
    np.save(npy, noise.numpy())
    r = _run_onnx(fp16_graph, "--noise", npy, "--provider", "cuda", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["provider"] == "CUDAExecutionProvider"
    agreement = (torch.tensor(out["token_ids"]) == want).float().mean().item()
    assert agreement >= MIN_AGREEMENT, agreement


def test_fp16_denoiser_and_self_noise_graphs(tmp_path, fmlm_model, vectors):
    """The other two graph kinds convert too: the denoiser keeps float32 x/t/logits and is close to the golden
    logits; the self-noise graph (its draws stay float32) loads and samples through run_onnx.py."""
    from flm_rt.model import softcap_logits

    den = flm_rt.export(fmlm_model, tmp_path / "den16.onnx", what="denoiser", dtype="float16")
    x = vectors["fmlm.forward.t0.3_0.7.input"]
    b = x.shape[0]
    out = load_exported(den)(x, torch.full((b,), 0.3), torch.full((b,), 0.7))
    want = softcap_logits(vectors["fmlm.forward.t0.3_0.7.raw_logits"])
    assert out.dtype == torch.float32 and out.shape == want.shape
    # measured: max |diff| 0.012 on logits up to ~24 (fp16 rounding), argmax agreement 100%
    assert (out - want).abs().max().item() < 0.05 * want.abs().max().item()
    assert (out.argmax(-1) == want.argmax(-1)).float().mean().item() >= MIN_AGREEMENT
    selfn = flm_rt.export(fmlm_model, tmp_path / "self16.onnx", steps=1, self_noise=True, dtype="float16")
    r = _run_onnx(selfn, "--batch", "3", "--json", "--provider", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    ids = np.array(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"])
    assert ids.shape == (3, 32) and ids.min() >= 0 and ids.max() < 1000 and len(np.unique(ids)) > 16
