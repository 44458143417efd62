"""The flm-rt command line, run as a user would (subprocess)."""
import json
import os
import subprocess
import sys

import pytest

import flm_rt

from conftest import small_config


def run(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flm_rt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "gpt2-random"
    flm_rt.random_model(small_config(), seed=0, output_scale=6.0).save(path)
    return path


def test_generate_prints_gpt2_text(gpt2_dir):
    out = run("generate", gpt2_dir, "-n", "2", "--steps", "2", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert "=== sample 1 ===" in out.stdout and "ms/token" in out.stdout
    assert "[no text" not in out.stdout
    text = out.stdout.split("=== sample 0 ===")[1].split("=== sample 1 ===")[0].strip()
    assert text and not text.replace(" ", "").isdigit()  # decoded words, not ids


def test_generate_golden_prints_ids_and_reason(golden_dir):
    out = run("generate", golden_dir / "fmlm.ckpt", "-n", "2")
    assert out.returncode == 0, out.stderr
    first = out.stdout.split("=== sample 0 ===")[1].split("===")[0].split()
    assert len(first) == 32 and all(tok.isdigit() for tok in first)
    assert "[no text: no tokenizer is known for a vocabulary of 1000 tokens" in out.stdout


def test_generate_json(golden_dir):
    out = run("generate", golden_dir / "flm.ckpt", "-n", "1", "--steps", "4", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert len(d["token_ids"][0]) == 32 and d["text"] is None and d["steps"] == 4


def test_info_and_convert(golden_dir, tmp_path):
    out = run("info", golden_dir / "fmlm.ckpt")
    assert out.returncode == 0, out.stderr
    assert "FMLM" in out.stdout and "V=1000" in out.stdout and "parameters" in out.stdout
    dst = tmp_path / "conv"
    out = run("convert", golden_dir / "fmlm.ckpt", dst)
    assert out.returncode == 0 and (dst / "config.json").is_file() and (dst / "model.safetensors").is_file()


@pytest.mark.parametrize("args,match", [
    (["generate", "/nonexistent/model.ckpt"], "no such file"),
    (["generate", "{golden}/fmlm.ckpt", "--steps", "0"], "steps must be"),
    (["generate", "{golden}/fmlm.ckpt", "--stochasticity", "2"], "stochasticity"),
    (["generate", "{golden}/fmlm.ckpt", "-n", "0"], "num_samples"),
    (["generate", "{golden}/fmlm.ckpt", "--device", "cuda:7"], "CUDA|device"),
])
def test_errors_are_clean(request, args, match):
    golden = request.getfixturevalue("golden_dir") if any("{golden}" in a for a in args) else None
    out = run(*[a.format(golden=golden) for a in args])
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "flm-rt: error:" in out.stderr and "Traceback" not in out.stderr
    import re
    assert re.search(match, out.stderr)


def test_demo_runs(tmp_path):
    out = run("demo", "-n", "1", env={"FLM_RT_DEMO_MODEL": str(tmp_path / "demo")})
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout and "ms/token" in out.stdout


def test_delegated_subcommands_take_options():
    out = run("bench", "--help")
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr
    out = run("export", "--help")
    assert out.returncode == 0 and "--format" in out.stdout, out.stderr
