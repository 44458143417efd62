"""The benchmark files (a package, so that pytest imports bench/conftest.py as ``bench.conftest`` beside
tests/conftest.py, which the tests import as ``conftest``)."""
