"""flm_rt: a compiled inference runtime for Flow Map Language Models (FMLM) and Flow Language Models (FLM).

    import flm_rt
    model = flm_rt.load("david3684/FMLM-B-OWT")      # a Hub name (cached), .ckpt, hub or flm_rt directory
    out = flm_rt.generate(model, num_samples=4, steps=1, seed=0)
    print(out.text[0], out.ms_per_token)
"""
from ._version import __version__  # noqa: E402  (pyproject.toml is the one place)

from ._ext import build_info  # noqa: E402  (loads the compiled ops, or says why not, once)
from . import hub, ops  # noqa: E402  (hub: the published-models table; huggingface_hub is imported on use)
from .api import Generation, Model, convert, generate, load, random_model  # noqa: E402
from .exporting import export, load_exported  # noqa: E402  (the machinery: flm_rt.exporting)
from .errors import (  # noqa: E402
    CheckpointError, ConfigError, DeviceError, ExportError, FlmError, GenerationError, HubError,
    NonFiniteWeightsError, TokenizerError, UnsafeCheckpointError,
)
from .model import ModelConfig  # noqa: E402

__all__ = [
    "__version__", "build_info", "hub", "ops", "load", "generate", "convert", "export", "load_exported",
    "random_model", "Model", "ModelConfig", "ExportError",
    "Generation", "FlmError", "CheckpointError", "UnsafeCheckpointError", "NonFiniteWeightsError", "ConfigError",
    "GenerationError", "DeviceError", "TokenizerError", "HubError",
]
