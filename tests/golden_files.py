"""Where the golden vectors are: ../shared beside the repository, or the folder FLM_RT_SHARED names (the GPU kit
carries a staged copy). Every test, fixture and benchmark that reads them goes through require_golden(), so that
without them each one skips with the same message: the path looked at and the variable that moves it."""
from __future__ import annotations

import os
from pathlib import Path

ENV = "FLM_RT_SHARED"
SHARED = Path(os.environ.get(ENV) or Path(__file__).resolve().parents[1].parent / "shared")
GOLDEN = SHARED / "golden"
TINY = GOLDEN / "tiny"


def missing_reason() -> str | None:
    """None when the golden folder is there, else the one message that says where it was looked for."""
    if (TINY / "vectors.safetensors").is_file():
        return None
    where = f"from {ENV}" if os.environ.get(ENV) else f"../shared beside the repository, {ENV} unset"
    return f"golden vectors not found at {TINY} ({where}): set {ENV} to the shared folder (the one holding golden/)"


def require_golden_dir() -> Path:
    """The golden folder (golden/tiny), or a FileNotFoundError that says where it was looked for (for scripts)."""
    reason = missing_reason()
    if reason:
        raise FileNotFoundError(reason)
    return TINY


def require_golden() -> Path:
    """The golden folder, or a skip of the calling test (or fixture) with missing_reason()."""
    import pytest

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    return TINY
