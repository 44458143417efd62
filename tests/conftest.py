"""Shared fixtures: the golden vectors live in ../shared/golden beside the repository (never copied in)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

# The lookup of ../shared (or FLM_RT_SHARED) and its one skip message live in golden_files.py (bench/ uses it too).
from golden_files import GOLDEN, SHARED, TINY, missing_reason, require_golden, require_golden_dir  # noqa: F401


@functools.lru_cache(maxsize=1)
def _vectors() -> dict:
    from safetensors.torch import load_file

    return load_file(str(require_golden() / "vectors.safetensors"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return require_golden()


@pytest.fixture(scope="session")
def vectors() -> dict:
    return _vectors()


@pytest.fixture(scope="session")
def golden_meta() -> dict:
    return json.loads((require_golden() / "meta.json").read_text())


@pytest.fixture(scope="session")
def schedule_table() -> dict:
    require_golden()
    return json.loads((GOLDEN / "schedule.json").read_text())


@pytest.fixture(scope="session")
def fmlm_model():
    import flm_rt

    return flm_rt.load(require_golden() / "fmlm.ckpt", device="cpu")


@pytest.fixture(scope="session")
def flm_model():
    import flm_rt

    return flm_rt.load(require_golden() / "flm.ckpt", device="cpu")


def small_config(**kw):
    from flm_rt import ModelConfig

    base = dict(vocab_size=50258, length=16, hidden_size=32, n_blocks=1, n_heads=2, cond_dim=16, two_time=True,
                tokenizer="gpt2")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture()
def poison():
    """A tensor full of NaN: outputs that stay NaN were never written."""
    def make(*shape, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype)
    return make


@pytest.fixture(scope="session")
def loader_worker():
    """A process that loads untrusted files one at a time, with a time and memory limit per case (tests/hostile.py)."""
    from hostile import Worker

    w = Worker()
    yield w
    w.close()
