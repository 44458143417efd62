"""Exceptions raised by flm_rt. Each names the problem and what to do about it."""


class FlmError(Exception):
    """Base class of every error flm_rt raises on purpose."""


class CheckpointError(FlmError, ValueError):
    """A checkpoint file or directory is missing, corrupt, truncated or inconsistent."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint pickle asks for code execution (e.g. os.system through __reduce__); it is never run."""


class NonFiniteWeightsError(CheckpointError):
    """A checkpoint holds NaN or infinite weights."""


class ConfigError(FlmError, ValueError):
    """Architecture or generation settings are missing, invalid, or disagree with the weights."""


class GenerationError(FlmError, ValueError):
    """Invalid arguments to generate() (steps, stochasticity, noise, num_samples, seq_len...)."""


class DeviceError(FlmError, RuntimeError):
    """The requested device is not available."""


class TokenizerError(FlmError, RuntimeError):
    """No tokenizer is known for this vocabulary, or its data files cannot be found."""


class HubError(FlmError, OSError):
    """A model named by Hugging Face Hub repo id is not in the cache and cannot be fetched (offline, no such repo,
    revision or file, a download that failed); the message names the repo, the revision and the cache folder."""


class ExportError(FlmError, ValueError):
    """An export request that cannot be carried out (bad format/what/steps, unwritable output, unsupported model)."""
