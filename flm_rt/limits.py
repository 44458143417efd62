"""Limits on untrusted input, and the checks that enforce them before anything big is allocated.

A checkpoint, a config file or a request may come from anyone. Every reader in flm_rt bounds what such input can
cost: bytes read, objects and nesting in a pickle, nodes in a config, memory for a model or a request. The
defaults let the published models (about 170M parameters, 0.7 GB) load with a wide margin; raise the memory
limit with the environment variable ``FLM_RT_MAX_MODEL_BYTES`` for larger models.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, Optional

from .errors import CheckpointError, ConfigError, GenerationError
from .spec import TIME_FREQ_DIM

MODEL_BYTES_ENV = "FLM_RT_MAX_MODEL_BYTES"
REQUEST_BYTES_ENV = "FLM_RT_MAX_REQUEST_BYTES"
MAX_SEED = 2**64 - 1
MAX_STEPS = 100_000
MAX_SAMPLES = 1 << 20


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw)) if any(c in raw for c in ".eE") else int(raw)
    except (ValueError, OverflowError):
        raise ConfigError(f"{name} must be a number of bytes, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be a positive number of bytes, got {raw!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """What one checkpoint may cost. ``max_model_bytes`` defaults to env FLM_RT_MAX_MODEL_BYTES, else 32 GiB."""

    max_pickle_bytes: int = 64 << 20        # the data.pkl member of a .ckpt
    max_pickle_objects: int = 4_000_000     # opcodes executed / objects created while unpickling
    max_pickle_memo: int = 1_000_000        # entries in the pickle memo
    max_depth: int = 100                    # nesting of containers (pickle, config)
    max_config_nodes: int = 200_000         # distinct nodes in a pickled config
    max_json_bytes: int = 16 << 20          # flm_rt.json / config.json
    max_zip_entries: int = 100_000          # members of a .ckpt archive
    max_compression_ratio: int = 100        # decompressed / stored size of a .ckpt member (torch stores, ratio 1)
    max_blocks: int = 1024                  # transformer blocks
    max_length: int = 1 << 20               # sequence length
    max_model_bytes: Optional[int] = None   # fp32 parameters of the model

    def model_bytes_limit(self) -> int:
        return self.max_model_bytes if self.max_model_bytes is not None else _env_bytes(MODEL_BYTES_ENV, 32 << 30)


DEFAULT_LIMITS = Limits()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def brief(value: Any, width: int = 40) -> str:
    """A short description of an untrusted value, safe to put in a message (never a full repr of a container:
    a shared or cyclic structure can have an exponential or infinite repr)."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value) if not isinstance(value, int) or value.bit_length() < 128 else f"<int of {value.bit_length()} bits>"
    elif isinstance(value, (str, bytes)):
        text = repr(value[:width])
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        text = f"<{type(value).__name__} of {len(value)} items>"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width + 4 else text[:width] + "..."


# ------------------------------------------------------------------------------------------ files
def regular_file(path: str, what: str = "file") -> int:
    """Refuse anything but a regular file (FIFOs, devices, sockets block or never end). Returns its size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} missing") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise CheckpointError(f"{path}: {what} is {kind}; flm_rt reads regular files only")
    return st.st_size


def open_regular(path: str, what: str = "file"):
    """Open ``path`` for reading only if it is a regular file, checked on the open descriptor (O_NONBLOCK: opening
    a FIFO does not wait for a writer), so that nothing can be swapped in between the check and the read."""
    regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: {what} is not a regular file; flm_rt reads regular files only")
    return os.fdopen(fd, "rb")


# ------------------------------------------------------------------------------------------ config values
def config_int(value: Any, name: str, source: str, lo: int = 1, hi: Optional[int] = None) -> int:
    """An int as written (4.0, "4", True are refused, never coerced) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {name} must be an integer, got {brief(value)}")
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{source}: {name} must be an integer in [{lo}, {hi if hi is not None else 'inf'}], "
                          f"got {brief(value)}")
    return value


def config_unit_float(value: Any, name: str, source: str) -> float:
    """A real number in [0, 1] (int or float; bool, NaN, strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ConfigError(f"{source}: {name} must be a number in [0, 1], got {brief(value)}")
    return float(value)


# ------------------------------------------------------------------------------------------ memory
def denoiser_param_count(vocab_size: int, hidden_size: int, n_blocks: int, cond_dim: int, two_time: bool) -> int:
    """Parameters of a denoiser (SPEC section 2), computed without building it (a hostile config may ask for
    millions of blocks); tests/test_hostile_inputs.py checks it against ``loading.param_count``."""
    v, d, c = vocab_size, hidden_size, cond_dim
    time_mlp = (TIME_FREQ_DIM * c + c) + (c * c + c)
    block = 2 * d + 3 * d * d + d * d + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * c + 6 * d)
    out = d + (2 * d * c + 2 * d) + (v * d + v)
    return v * d + time_mlp * (2 if two_time else 1) + n_blocks * block + out


def model_bytes(cfg) -> int:
    """fp32 bytes of a model's parameters (the rotary buffer is negligible)."""
    return 4 * denoiser_param_count(cfg.vocab_size, cfg.hidden_size, cfg.n_blocks, cfg.cond_dim, cfg.two_time)


def available_memory(device=None) -> Optional[int]:
    """Bytes that can still be allocated on ``device`` (CPU: MemAvailable; CUDA: free + cached), or None."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
        except Exception:
            return None
    if dev.type != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # in a container (cgroup v2 memory limit), what is left under the limit counts too
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read().strip())
            with open("/sys/fs/cgroup/memory.stat") as f:  # page cache the kernel can reclaim is not "used"
                stats = dict(line.split()[:2] for line in f if line.strip())
            used -= int(stats.get("inactive_file", 0))
            avail = min(avail, max(0, int(cap) - used))
    except (OSError, ValueError):
        pass
    return avail


def check_model_memory(cfg, source: str, limits: Limits = DEFAULT_LIMITS) -> int:
    """Refuse a model whose parameters exceed the limit or the memory available, before allocating them."""
    if cfg.n_blocks > limits.max_blocks:
        raise CheckpointError(f"{source}: {cfg.n_blocks} transformer blocks (flm_rt's limit is {limits.max_blocks})")
    if cfg.length > limits.max_length:
        raise ConfigError(f"{source}: sequence length {cfg.length} exceeds flm_rt's limit of {limits.max_length}")
    need = model_bytes(cfg)
    limit = limits.model_bytes_limit()
    if need > limit:
        raise CheckpointError(
            f"{source}: the model needs {gib(need)} for its weights, above the limit of {gib(limit)} "
            f"(raise it with {MODEL_BYTES_ENV}=<bytes> if the file is trusted and the machine has the memory)")
    avail = available_memory("cpu")
    if avail is not None and need > avail:
        raise CheckpointError(f"{source}: the model needs {gib(need)} for its weights but only {gib(avail)} of "
                              "memory is available")
    return need


def generation_bytes(batch: int, length: int, vocab_size: int, hidden_size: int, *, embedded: bool) -> int:
    """Peak working memory of one generate() call: the [B, L, V] logits, the V-space state, draw and noise
    (vocab space), and the activations ([B, L, 4D] MLP and a few [B, L, D] / [B, H, L, L] tensors)."""
    blv = batch * length * vocab_size * 4
    act = batch * length * (16 * hidden_size + 2 * length) * 4
    return (1 if embedded else 4) * blv + act


def check_request_memory(nbytes: int, device, what: str) -> None:
    """Refuse a request that cannot fit, before allocating: limit = env FLM_RT_MAX_REQUEST_BYTES if set, else the
    memory available on the device."""
    limit = _env_bytes(REQUEST_BYTES_ENV, 0) if os.environ.get(REQUEST_BYTES_ENV, "").strip() else None
    avail = available_memory(device)
    if limit is not None and nbytes > limit:
        raise GenerationError(f"{what} needs about {gib(nbytes)} of working memory, above {REQUEST_BYTES_ENV}="
                              f"{limit}; use fewer samples or a shorter seq_len")
    if avail is not None and nbytes > avail:
        raise GenerationError(f"{what} needs about {gib(nbytes)} of working memory but only {gib(avail)} is "
                              f"available on {device}; use fewer samples or a shorter seq_len")


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off environment variable (``FLM_RT_PREPACK``, ``FLM_RT_FUSED_VOCAB``, ``FLM_RT_SCREEN``): 0/1,
    false/true or off/on in any case; unset or empty gives ``default``; anything else is a ConfigError naming it."""
    v = os.environ.get(name, "").strip().lower()
    if v == "":
        return default
    if v not in ("0", "1", "false", "true", "off", "on"):
        raise ConfigError(f"flm_rt: {name} must be 0 or 1, got {v!r:.40}")
    return v in ("1", "true", "on")
