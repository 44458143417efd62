"""flm_rt's version, from one place: ``[project] version`` in pyproject.toml.

A source checkout reads pyproject.toml beside the package (so an editable install never reports a stale value);
an installed wheel reads its own metadata, which setuptools wrote from the same field.
"""
from __future__ import annotations

import os
import re


def _from_pyproject() -> str | None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if not project or not re.search(r'^name\s*=\s*"flm_rt"', project.group(1), re.M):
        return None  # not flm_rt's checkout (e.g. a stray pyproject.toml beside an installed package)
    m = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    return m.group(1) if m else None


def _from_metadata() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flm_rt")
    except PackageNotFoundError:
        return None


__version__ = _from_pyproject() or _from_metadata() or "0+unknown"
