"""The benchmark's research-code reference sampler reproduces the golden ids and flm_rt's ids (fp32), and the
report writer produces its three files from a tiny run."""
from __future__ import annotations

import json

import pytest
import torch

from golden_files import require_golden as _need_golden


@pytest.fixture(scope="module")
def noises():
    from safetensors.torch import load_file

    return load_file(str(_need_golden() / "vectors.safetensors"))


@pytest.fixture(scope="module")
def fmlm():
    import flm_rt

    return flm_rt.load(_need_golden() / "fmlm.ckpt", device="cpu")


@pytest.fixture(scope="module")
def flm():
    import flm_rt

    return flm_rt.load(_need_golden() / "flm.ckpt", device="cpu")


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("s", [0.0, 0.8, 1.0])
def test_reference_fmlm_matches_golden_and_flm_rt(fmlm, noises, s, steps):
    import flm_rt
    from flm_rt.benchmarks.reference import draws_needed, reference_generate

    want = noises[f"fmlm.fp32.g{s}.steps{steps}.ids"]
    draws = noises["noises"][:draws_needed(True, steps, s)]
    ref = reference_generate(fmlm, draws, steps, s)
    assert ref.dtype == torch.int64 and ref.shape == want.shape
    assert torch.equal(ref, want.to(torch.int64))
    rt = flm_rt.generate(fmlm, noise=draws, steps=steps, stochasticity=s, decode=False, kernels="auto").token_ids
    assert torch.equal(rt, ref)


@pytest.mark.parametrize("steps", [1, 4])
def test_reference_flm_matches_golden_and_flm_rt(flm, noises, steps):
    import flm_rt
    from flm_rt.benchmarks.reference import reference_generate

    want = noises[f"flm.fp32.steps{steps}.ids"].to(torch.int64)
    ref = reference_generate(flm, noises["noises"][:1], steps, 0.0)
    assert torch.equal(ref, want)
    rt = flm_rt.generate(flm, noise=noises["noises"][:1], steps=steps, decode=False).token_ids
    assert torch.equal(rt, ref)


@pytest.mark.parametrize("steps", [1, 4])
def test_reference_bf16_autocast_matches_golden(fmlm, noises, steps):
    from flm_rt.benchmarks.reference import reference_generate

    want = noises[f"fmlm.bf16autocast.g0.0.steps{steps}.ids"].to(torch.int64)
    ref = reference_generate(fmlm, noises["noises"][:1], steps, 0.0, autocast_dtype=torch.bfloat16)
    assert torch.equal(ref, want)


def test_reference_generator_mode_matches_explicit_noise(fmlm):
    from flm_rt.benchmarks.reference import reference_generate

    shape = (2, 32, 1000)
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([torch.randn(shape, generator=g) for _ in range(2)])
    a = reference_generate(fmlm, draws, 2, 0.8)
    b = reference_generate(fmlm, torch.Generator().manual_seed(3), 2, 0.8, batch=2, seq_len=32)
    assert torch.equal(a, b)


def test_flop_count_formula():
    from flm_rt.benchmarks.suite import flops_per_call, flops_per_sample
    from flm_rt.model import preset_config

    cfg = preset_config("lm1b")
    L, V, D = 128, 30522, 768
    matmuls = 2 * L * V * D * 2 + 12 * (24 * L * D * D + 4 * L * L * D)
    f = flops_per_call(cfg)
    assert matmuls < f < matmuls * 1.01  # adaLN and time MLPs are tiny
    assert flops_per_sample(cfg, 4) == 4 * f
    # owt is ~0.37 TFLOP per one-step sample
    owt = preset_config("owt")
    assert 3.5e11 < flops_per_call(owt) < 3.9e11


def test_report_writes_three_files_from_tiny_run(tmp_path):
    from flm_rt.benchmarks.report import write_report
    from flm_rt.benchmarks.suite import BenchSettings, Suite

    settings = BenchSettings(device="cpu", dtype="float32", repeats=1, warmup=1, rate_n=256,
                             cases=[("tiny", "reference", 1, 1), ("tiny", "flm_rt", 1, 1),
                                    ("tiny", "flm_rt[torch-kernels]", 1, 1), ("tiny", "reference", 2, 1),
                                    ("tiny", "flm_rt", 2, 1), ("tiny", "flm_rt[bfloat16]", 2, 1),
                                    ("tiny", "flm_rt[embedding-noise]", 2, 1),
                                    ("tiny", "flm_rt[bfloat16+embedding-noise]", 2, 1), ("tiny", "nonexistent-row", 1, 1)])
    suite = Suite(settings)
    results = suite.run()
    ok = [r for r in results if r.status == "ok"]
    assert len(ok) == 8
    rates = suite.meta["matmul_rates"]
    assert set(rates) == {"float32", "bfloat16"} and all(r["best"] >= r["torch.mm"] > 0 for r in rates.values())
    from flm_rt import prepack
    from flm_rt.benchmarks.suite import RATE_LIBRARIES

    # every library flm_rt.prepack may run is timed (MKL's packed sgemm in fp32 only), and the best one is used
    assert ("mkl_prepacked" in rates["float32"]) == prepack._HAVE_MKL_LINEAR
    assert "mkl_prepacked" not in rates["bfloat16"]
    for r in rates.values():
        timed = {k: r[k] for k in RATE_LIBRARIES if k in r}
        assert r["best"] == max(timed.values()) and r["best_library"] == max(timed, key=timed.get)
    assert f"({rates['float32']['best_library']} won)" in suite.peak()["peak_source"]  # the library of the kept rate
    by_row = {(r.row, r.steps): r for r in ok}
    bf = by_row[("flm_rt[bfloat16]", 2)]
    assert bf.rate_dtype == "bfloat16" and bf.peak_tflops == pytest.approx(rates["bfloat16"]["best"] / 1e3)
    assert 0.5 <= bf.extra["tokens_match_fp32"] <= 1.0
    emb = by_row[("flm_rt[embedding-noise]", 2)]
    assert emb.flops_per_sample < by_row[("flm_rt", 2)].flops_per_sample  # its own process's FLOPs
    both = by_row[("flm_rt[bfloat16+embedding-noise]", 2)]  # bf16 against the fp32 embedding-space row (same draws)
    assert both.rate_dtype == "bfloat16" and both.flops_per_sample == emb.flops_per_sample
    assert 0.5 <= both.extra["tokens_match_fp32"] <= 1.0 and both.tokens_match_reference is None
    assert by_row[("flm_rt", 2)].frac_peak == pytest.approx(
        by_row[("flm_rt", 2)].achieved_tflops * 1e3 / rates["float32"]["best"])
    prof = suite.meta["gemm_profile"]
    assert [p["shape"] for p in prof] == ["tiny"] and len(prof[0]["gemms"]) == 8
    assert all(g["gflops"] > 0 and g["min_ms"] <= g["median_ms"] <= g["max_ms"] for g in prof[0]["gemms"])
    bad = [r for r in results if r.row == "nonexistent-row"]
    assert len(bad) == 1 and bad[0].status == "error" and "unknown row" in bad[0].reason
    for r in ok:
        assert r.median_s > 0 and r.per_token_ms > 0 and r.flops_per_sample > 0 and r.weight_bytes > 0
        assert r.frac_peak is not None and r.min_s <= r.median_s <= r.max_s
        before, after = r.extra["adjacent_rate_gflops"]  # measured around this case, in the row's dtype
        assert before > 0 and after > 0 and r.adjacent_tflops == pytest.approx(max(before, after) / 1e3, rel=1e-3)
        assert r.frac_adjacent == pytest.approx(r.achieved_tflops / r.adjacent_tflops)
        if r.row in ("flm_rt", "flm_rt[torch-kernels]"):
            assert r.tokens_match_reference == 1.0
    written = write_report(results, suite.meta, str(tmp_path))
    for name in ("results.json", "results.md", "latency_vs_steps.png"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["peak_tflops"] == pytest.approx(rates["float32"]["best"] / 1e3) and len(data["results"]) == 9
    assert "| tiny | flm_rt | 1 |" in written["markdown"] and "eff. % adjacent" in written["markdown"]
    assert "Per-GEMM profile" in written["markdown"] and "MKL packed sgemm GFLOP/s" in written["markdown"]
    assert not (tmp_path / "throughput_vs_batch.png").exists()  # one batch size only

    # Each run appends one line to history.jsonl; results.md lists the runs; a rewrite does not append.
    from flm_rt.benchmarks.report import read_history, rewrite_from_json

    again = write_report(results, dict(suite.meta, git_commit="abcdef0123"), str(tmp_path))
    hist = read_history(str(tmp_path))
    assert len(hist) == 2 and hist[1]["git_commit"] == "abcdef0123"
    case = next(c for c in hist[0]["cases"] if (c["row"], c["steps"]) == ("flm_rt", 1))
    ref = next(c for c in hist[0]["cases"] if (c["row"], c["steps"]) == ("reference", 1))
    assert case["vs_reference"] == pytest.approx(ref["median_ms"] / case["median_ms"], rel=1e-3)
    assert "| abcdef0 | " in again["markdown"] and "Earlier runs" in again["markdown"]
    rewrite_from_json(str(tmp_path / "results.json"))
    assert len(read_history(str(tmp_path))) == 2


def test_cli_bench_parses_quick_subset():
    from flm_rt.benchmarks.cli import build_parser, settings_from_args

    s = settings_from_args(build_parser().parse_args(["--quick", "--device", "cpu"]))
    shapes = {c[0] for c in s.cases}
    assert shapes == {"lm1b", "owt"}
    assert ("owt", "autoregressive", None, 1) in s.cases
    assert {c[2] for c in s.cases if c[0] == "lm1b" and c[1] == "flm_rt"} == {1, 2, 4, 8}
    assert all(c[3] == 1 for c in s.cases)
    full = settings_from_args(build_parser().parse_args(["--device", "cpu", "--shapes", "tiny", "--batch", "1,8"]))
    assert full.batches == [1, 8] and full.cases is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--shapes", "huge"])
    picked = settings_from_args(build_parser().parse_args(
        ["--device", "cpu", "--cases", "lm1b:flm_rt,flm_rt[bfloat16+embedding-noise]:1,4:1,8; owt:autoregressive:-:1"]))
    assert picked.cases == [(s_, r, n, b) for s_, b, n in (("lm1b", 1, 1), ("lm1b", 1, 4), ("lm1b", 8, 1),
                                                           ("lm1b", 8, 4))
                            for r in ("flm_rt", "flm_rt[bfloat16+embedding-noise]")] + [("owt", "autoregressive", None, 1)]
    for bad in ("lm1b:flm_rt:-:1", "lm1b:autoregressive:1:1", "lm1b:flm_rt:1", "lm1b:nope:1:1", ";"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--cases", bad])


def test_autoregressive_flop_count():
    from types import SimpleNamespace

    from flm_rt.benchmarks.autoregressive import SMOLLM2_135M, ar_flops_per_sample

    cfg = SimpleNamespace(**SMOLLM2_135M)
    one = ar_flops_per_sample(cfg, 1)
    # ~ 2 x (non-embedding parameters + LM head) per token
    non_emb = 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert abs(one - 2 * (non_emb + 576 * 49152)) / one < 0.01
    assert ar_flops_per_sample(cfg, 1024) > 1000 * one


def test_cli_bench_end_to_end_tiny(tmp_path, capsys):
    """The `flm-rt bench` entry point (a leading "--" from the top-level parser's remainder is accepted)."""
    from flm_rt.benchmarks.cli import cli_bench

    rc = cli_bench(["--", "--shapes", "tiny", "--steps", "1", "--batch", "1", "--rows", "reference,flm_rt",
                    "--repeats", "1", "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--rate-size", "256"])
    assert rc == 0
    assert "| tiny | flm_rt | 1 |" in capsys.readouterr().out
    assert {"results.json", "results.md", "latency_vs_steps.png"} <= {p.name for p in tmp_path.iterdir()}
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["command"].startswith("flm-rt bench --shapes tiny --steps 1") and "Command: `flm-rt bench" in (
        tmp_path / "results.md").read_text()


def test_cli_bench_a_users_checkpoint(tmp_path, capsys, monkeypatch):
    """`flm-rt bench --model PATH`: the checkpoint's own shape, rows labelled "model"; a missing path: exit 2."""
    import flm_rt
    from flm_rt.benchmarks.cli import cli_bench
    from flm_rt.model import ModelConfig

    ckpt = tmp_path / "mine"
    cfg = ModelConfig(vocab_size=300, length=16, hidden_size=32, n_blocks=1, n_heads=2, cond_dim=16)
    flm_rt.random_model(cfg, seed=1).save(str(ckpt))
    rc = cli_bench(["--model", str(ckpt), "--steps", "1", "--batch", "1", "--rows", "reference,flm_rt",
                    "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress",
                    "--rate-size", "256"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["row"]: r for r in data["results"]}
    assert rows["flm_rt"]["shape"] == "model" and rows["flm_rt"]["vocab_size"] == 300
    assert rows["flm_rt"]["tokens_match_reference"] == 1.0 and data["meta"]["model_path"] == str(ckpt)
    assert cli_bench(["--model", str(tmp_path / "absent")]) == 2
    assert "no such file" in capsys.readouterr().err
    # a Hub name that is not in the (empty, offline) cache: a clear error naming it, exit 2
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert cli_bench(["--model", "nobody/no-such-model"]) == 2
    assert "nobody/no-such-model" in capsys.readouterr().err
