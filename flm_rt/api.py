"""The public API: load a checkpoint into a Model, generate text, convert to flm_rt's format."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from . import loading
from .errors import ConfigError, DeviceError, GenerationError, TokenizerError
from .model import Denoiser, ModelConfig
from .samplers import draws_needed, make_plan, run_plan

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ConfigError(f"unsupported dtype {dtype!r}: use float32, bfloat16 or float16")


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine "
                              "(torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise DeviceError(f"unsupported device type {dev.type!r}: use 'cpu' or 'cuda'")
    return dev


class Model:
    """A loaded FLM/FMLM denoiser with its config, tokenizer and where it came from."""

    def __init__(self, config: ModelConfig, denoiser: Denoiser, *, device: torch.device, dtype: torch.dtype,
                 source: Optional[str] = None, format: str = "memory", weights: str = "ema",
                 notes: Optional[list] = None):
        self.config = config
        self.denoiser = denoiser
        self.device = device
        self.dtype = dtype
        self.source = source
        self.format = format
        self.weights = weights
        self.notes = list(notes or [])
        self._tokenizer = None
        self._tokenizer_error: Optional[str] = None

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: dict, *, device=None, dtype=None, **kw) -> "Model":
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        with torch.device("meta"):
            net = Denoiser(config)
        net.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False, assign=True)
        if "rotary_emb.inv_freq" not in state_dict:  # a buffer: recompute when a file does not carry it
            net.rotary_emb.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, config.head_dim, 2,
                                                                      dtype=torch.float32) / config.head_dim))
        net = net.to(dev).eval().requires_grad_(False).set_compute_dtype(dt)
        from .cpu_features import warn_if_emulated

        warn_if_emulated(dt, dev.type)  # bf16 without avx512_bf16 / AMX: slower than fp32
        return cls(config, net, device=dev, dtype=dt, **kw)

    # -- tokenizer --------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The text tokenizer, or None (then ``tokenizer_status`` says why)."""
        if self._tokenizer is None and self._tokenizer_error is None:
            from .tokenizer import get_tokenizer

            try:
                self._tokenizer = get_tokenizer(self.config.tokenizer, self.config.vocab_size)
            except TokenizerError as e:
                self._tokenizer_error = str(e)
        return self._tokenizer

    @property
    def tokenizer_status(self) -> str:
        tok = self.tokenizer
        return f"{tok.kind} ({tok.vocab_size} tokens)" if tok is not None else f"none: {self._tokenizer_error}"

    def embedded_noise_factor(self) -> torch.Tensor:
        """C (lower triangular [D, D], fp32) with C C^T = E^T E: for u ~ N(0, I_D), u @ C^T is distributed as
        eps @ E with eps ~ N(0, I_V). Computed once per model (Gram matrix in fp32, Cholesky in float64)."""
        if getattr(self, "_noise_factor", None) is None:
            e = self.denoiser.vocab_embed.embedding.detach().float()
            gram = (e.T @ e).double().cpu()
            try:
                factor = torch.linalg.cholesky(gram)
            except RuntimeError:
                raise ConfigError("the embedding matrix is rank-deficient (E^T E is not positive definite); "
                                  "use noise_space='vocab'") from None
            self._noise_factor = factor.float().to(self.device)
        return self._noise_factor

    # -- convenience ------------------------------------------------------------------------------------
    def generate(self, **kwargs) -> "Generation":
        return generate(self, **kwargs)

    def save(self, dst: str, *, dtype=None) -> str:
        """Write this model in flm_rt's own directory format (safetensors + JSON)."""
        sd = {k: v for k, v in self.denoiser.state_dict().items()}
        return loading.write_flm_rt(dst, self.config, sd, dtype=None if dtype is None else resolve_dtype(dtype),
                                    source=self.source, weights=self.weights)

    def info(self) -> dict:
        return {
            "source": self.source, "format": self.format, "weights": self.weights,
            "kind": "FMLM (two-time flow map)" if self.config.two_time else "FLM (one-time flow)",
            "config": self.config.to_dict(), "parameters": loading.param_count(self.config),
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "tokenizer": self.tokenizer_status, "notes": self.notes,
        }

    def __repr__(self) -> str:
        c = self.config
        return (f"flm_rt.Model({'FMLM' if c.two_time else 'FLM'}, V={c.vocab_size}, L={c.length}, D={c.hidden_size}, "
                f"N={c.n_blocks}, H={c.n_heads}, device={self.device}, dtype={str(self.dtype).replace('torch.', '')})")


def load(path: Union[str, os.PathLike], *, device=None, dtype=None, n_heads: Optional[int] = None,
         use_ema: bool = True) -> Model:
    """Load a Lightning ``.ckpt``, a hub directory (``model.safetensors`` + ``config.json``) or an flm_rt directory.

    Checkpoints are untrusted: pickles are read without executing anything (see :mod:`flm_rt.safe_pickle`).
    EMA weights are used by default, as the reference samples with them. ``n_heads`` overrides the config.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    ck = loading.read_checkpoint(os.fspath(path), n_heads=n_heads, use_ema=use_ema)
    return Model.from_state_dict(ck.config, ck.state_dict, device=dev, dtype=dt, source=os.fspath(path),
                                 format=ck.format, weights=ck.weights, notes=ck.notes)


def convert(src, dst, *, dtype=None, n_heads: Optional[int] = None, use_ema: bool = True) -> str:
    """Convert any supported checkpoint to flm_rt's format (EMA weights only, no optimizer state). Atomic."""
    ck = loading.read_checkpoint(os.fspath(src), n_heads=n_heads, use_ema=use_ema)
    return loading.write_flm_rt(os.fspath(dst), ck.config, ck.state_dict,
                                dtype=None if dtype is None else resolve_dtype(dtype), source=os.fspath(src),
                                weights=ck.weights)


def random_model(config: ModelConfig, *, seed: int = 0, device=None, dtype=None, output_scale: float = 1.0) -> Model:
    """A model with random weights (for demos, tests and benchmarks). ``output_scale`` scales the output
    projection so that predicted distributions are peaked, as in a trained model."""
    g = torch.Generator().manual_seed(seed)
    shapes = loading.expected_shapes(config)
    sd = {}
    for k, shape in shapes.items():
        if k == "rotary_emb.inv_freq":
            continue
        if k.endswith("norm1.weight") or k.endswith("norm2.weight") or k.endswith("norm_final.weight"):
            sd[k] = torch.ones(shape) + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".bias"):
            sd[k] = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            sd[k] = torch.randn(shape, generator=g) / fan_in**0.5
    sd["output_layer.linear.weight"] *= output_scale
    return Model.from_state_dict(config, sd, device=device, dtype=dtype, source="random", format="memory",
                                 weights="random")


# ------------------------------------------------------------------------------------------------ generate
@dataclass
class Generation:
    token_ids: torch.Tensor             # int64 [B, L], CPU
    text: Optional[list]                # one str per sample, or None when no tokenizer is known
    steps: int
    stochasticity: float
    seed: Optional[int]
    elapsed_s: float                    # sampling time (device synchronised), excluding decoding
    decode_s: float = 0.0
    text_unavailable_reason: Optional[str] = None
    device: str = "cpu"
    dtype: str = "float32"
    documents: Optional[list] = field(default=None, repr=False)  # per sample: documents / sentences

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.elapsed_s / max(self.num_tokens, 1)


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)


def sample_seed(seed: int, k: int) -> int:
    """Seed of sample k's private generator: its draws depend on (seed, k) only, not on the batch size."""
    return (seed * _MIX[0] + (k + 1) * _MIX[1]) % (2**63 - 1)


def _check_int(name, v, lo=1, hi=None):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f" and <= {hi}" if hi is not None else ""
        raise GenerationError(f"{name} must be an int >= {lo}{bound}, got {v!r}")


def generate(model: Union[Model, str, os.PathLike], *, num_samples: int = 1, steps: int = 1,
             stochasticity: Optional[float] = None, seq_len: Optional[int] = None, seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None,
             decode: bool = True, kernels: Optional[str] = None, noise_space: str = "vocab") -> Generation:
    """Generate ``num_samples`` sequences in ``steps`` network calls.

    ``noise`` [S, B, L, V]: explicit standard-normal draws consumed in SPEC order (z_0, eps_0, eps_1, ...); it
    fixes B and L. ``seed``: reproducible; sample k's draws depend only on (seed, k). ``generator``: draws the
    whole batch from that generator. Default stochasticity: the checkpoint's (0.0 if it says nothing).
    ``kernels``: "auto" | "torch" | "ext" (default: env FLM_RT_KERNELS, else auto).
    ``noise_space``: "vocab" (default) runs the SPEC's V-space process; "embedding" runs the same process
    through the embedding (draws of N(0, E^T E) in R^D, no [B, L, V] noise, no embedding matmul of the noise):
    the same output distribution, faster, but other draws than "vocab" for a given seed. With explicit
    ``noise`` both spaces give the same ids (up to float rounding).
    """
    if not isinstance(model, Model):
        model = load(model)
    cfg = model.config
    _check_int("steps", steps)
    if stochasticity is None:
        stochasticity = cfg.default_stochasticity
    if isinstance(stochasticity, bool) or not isinstance(stochasticity, (int, float)) or not 0.0 <= stochasticity <= 1.0:
        raise GenerationError(f"stochasticity must be a number in [0, 1], got {stochasticity!r}")
    stochasticity = float(stochasticity)
    if not cfg.two_time and stochasticity != 0.0:
        raise GenerationError("stochasticity applies to two-time (FMLM) models only; this is an FLM model")
    if sum(x is not None for x in (seed, generator, noise)) > 1:
        raise GenerationError("give at most one of seed, generator and noise")
    if noise_space not in ("vocab", "embedding"):
        raise GenerationError(f"noise_space must be 'vocab' or 'embedding', got {noise_space!r}")
    embedded = noise_space == "embedding"
    plan = make_plan(two_time=cfg.two_time, steps=steps, stochasticity=stochasticity, vocab_size=cfg.vocab_size)
    need = draws_needed(plan)
    dev = model.device

    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.dim() != 4:
            raise GenerationError(f"noise must be a float tensor [S, B, L, V], got "
                                  f"{type(noise).__name__}{list(noise.shape) if isinstance(noise, torch.Tensor) else ''}")
        if not noise.is_floating_point():
            raise GenerationError(f"noise must be floating point (standard-normal draws), got {noise.dtype}")
        s_, b_, l_, v_ = noise.shape
        if v_ != cfg.vocab_size:
            raise GenerationError(f"noise has V={v_} but the model's vocabulary is {cfg.vocab_size}")
        if l_ < 1 or l_ > cfg.length:
            raise GenerationError(f"noise has L={l_}; it must be between 1 and the trained length {cfg.length}")
        if b_ < 1:
            raise GenerationError("noise has an empty batch dimension")
        if s_ < need:
            raise GenerationError(f"noise holds {s_} draws but {steps} step(s) at stochasticity {stochasticity} "
                                  f"need {need} (z_0 plus one per stochastic step)")
        if num_samples not in (1, b_) and num_samples is not None:
            raise GenerationError(f"num_samples={num_samples} disagrees with the noise batch size {b_}")
        if seq_len is not None and seq_len != l_:
            raise GenerationError(f"seq_len={seq_len} disagrees with the noise length {l_}")
        # A finite sum proves every draw finite (one cheap pass); only a non-finite sum needs the exact check.
        if not bool(torch.isfinite(noise[:need].sum())) and not bool(torch.isfinite(noise[:need]).all()):
            raise GenerationError("noise contains NaN or infinite values")
        b, length = b_, l_

        def draw(j: int) -> torch.Tensor:
            x = noise[j].to(device=dev, dtype=torch.float32)
            return x @ model.denoiser.vocab_embed.embedding.float() if embedded else x
    else:
        _check_int("num_samples", num_samples)
        length = cfg.length if seq_len is None else seq_len
        _check_int("seq_len", length, 1, cfg.length)
        b = num_samples
        shape = (b, length, cfg.hidden_size if embedded else cfg.vocab_size)
        factor = model.embedded_noise_factor() if embedded else None

        def finish(u: torch.Tensor) -> torch.Tensor:
            return u @ factor.T if embedded else u
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise GenerationError(f"generator must be a torch.Generator, got {type(generator).__name__}")

            def draw(j: int) -> torch.Tensor:
                return finish(torch.randn(shape, generator=generator, device=generator.device).to(dev))
        else:
            if seed is None:
                seed = int.from_bytes(os.urandom(7), "little")
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise GenerationError(f"seed must be a non-negative int, got {seed!r}")
            gens = [torch.Generator(device=dev).manual_seed(sample_seed(seed, k)) for k in range(b)]

            def draw(j: int) -> torch.Tensor:
                out = torch.empty(shape, device=dev)
                for k, g in enumerate(gens):
                    torch.randn(shape[1:], generator=g, device=dev, out=out[k])
                return finish(out)

    t0 = time.perf_counter()
    with torch.inference_mode():
        ids = run_plan(model.denoiser, plan, draw, kernels=kernels, space=noise_space)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    ids = ids.to("cpu", torch.int64)

    text = documents = reason = None
    t1 = time.perf_counter()
    if decode:
        tok = model.tokenizer
        if tok is None:
            reason = model.tokenizer_status.removeprefix("none: ")
        else:
            documents = [tok.decode_pieces(row.tolist()) for row in ids]
            text = [tok.decode(row.tolist()) for row in ids]
    return Generation(ids, text, steps, stochasticity, seed, elapsed, time.perf_counter() - t1, reason,
                      str(dev), str(model.dtype).replace("torch.", ""), documents)
