"""The public API: load a checkpoint (or a Hub name) into a Model, generate text, convert to the hub layout."""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from . import cuda_graphs, loading
from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import CheckpointError, ConfigError, GenerationError, TokenizerError
from .limits import Limits, check_request_memory, generation_bytes
from .model import Denoiser, ModelConfig
from .noise import draws_for, sample_seed  # noqa: F401  (sample_seed: part of the public API)
from .samplers import SPACES, draws_needed, make_plan, run_plan
from .spec import rotary_inv_freq


class Model:
    """A loaded FLM/FMLM denoiser with its config, tokenizer and where it came from."""

    def __init__(self, config: ModelConfig, denoiser: Denoiser, *, device: torch.device, dtype: torch.dtype,
                 source: Optional[str] = None, format: str = "memory", weights: str = "ema",
                 notes: Optional[list] = None, source_config: Optional[dict] = None, path: Optional[str] = None):
        self.config = config
        self.denoiser = denoiser
        self.device = device
        self.dtype = dtype
        self.source = source
        self.format = format
        self.weights = weights
        self.notes = list(notes or [])
        self.source_config = dict(source_config or {})  # the authors' training config, kept for save()
        self.path = path                                 # the local file or directory the weights came from
        self._tokenizer = None
        self._tokenizer_error: Optional[str] = None

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: dict, *, device=None, dtype=None, **kw) -> "Model":
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        with torch.device("meta"):
            net = Denoiser(config)
        net.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False, assign=True)
        if "rotary_emb.inv_freq" not in state_dict:  # a buffer: recompute when a file does not carry it
            net.rotary_emb.inv_freq = rotary_inv_freq(config.head_dim)
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
                note = self.config.extra.get("tokenizer_note")
                self._tokenizer_error = f"{e}; {note}" if note else str(e)
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

    def warmup(self, num_samples: int = 1, steps: int = 1, *, seq_len: Optional[int] = None,
               noise_space: str = "vocab", kernels: Optional[str] = None) -> float:
        """Run one throw-away generation of this shape so that the first real call finds everything prepared
        (prepacked weights, kernels, allocator pools, the tokenizer); returns its time in seconds (the cold call)."""
        t0 = time.perf_counter()
        generate(self, num_samples=num_samples, steps=steps, seq_len=seq_len, seed=0, decode=False,
                 noise_space=noise_space, kernels=kernels)
        _ = self.tokenizer
        return time.perf_counter() - t0

    def save(self, dst: str, *, dtype=None, overwrite: bool = False) -> str:
        """Write this model in the hub layout (``model.safetensors`` + ``config.json``, flm_rt metadata included).
        An existing ``dst`` is refused unless ``overwrite`` (and then only a folder flm_rt wrote is replaced)."""
        sd = {k: v for k, v in self.denoiser.state_dict().items()}
        return loading.write_flm_rt(dst, self.config, sd, dtype=None if dtype is None else resolve_dtype(dtype),
                                    source=self.source, weights=self.weights, source_config=self.source_config,
                                    overwrite=overwrite)

    def info(self) -> dict:
        return {
            "source": self.source, "format": self.format, "weights": self.weights,
            "kind": "FMLM (two-time flow map)" if self.config.two_time else "FLM (one-time flow)",
            "config": self.config.to_dict(), "parameters": loading.param_count(self.config),
            "device": str(self.device), "dtype": dtype_name(self.dtype),
            "tokenizer": self.tokenizer_status, "notes": self.notes,
        }

    def __repr__(self) -> str:
        c = self.config
        return (f"flm_rt.Model({'FMLM' if c.two_time else 'FLM'}, V={c.vocab_size}, L={c.length}, D={c.hidden_size}, "
                f"N={c.n_blocks}, H={c.n_heads}, device={self.device}, dtype={dtype_name(self.dtype)})")


def resolve_source(path: Union[str, os.PathLike], *, revision: Optional[str] = None,
                   cache_dir: Optional[str] = None, local_files_only: bool = False, token=None) -> tuple[str, str]:
    """(local file or directory, label) for a path or a Hub name. A string is a local path if it exists, else a
    Hub repo id or alias (see :mod:`flm_rt.hub`); the error says which it was taken for."""
    name = os.fspath(path)
    if os.path.exists(name):
        if revision is not None:
            raise ConfigError(f"revision={revision!r} applies to Hub names, but {name!r} is a local path")
        return name, name
    from . import hub

    if isinstance(name, str) and hub.is_hub_name(name):
        files = hub.resolve(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                            token=token)
        return files.weights_path, files.label
    raise CheckpointError(f"{name}: no such file or directory (and not a Hugging Face Hub repo id "
                                  "'owner/name' or a published model's alias; see `flm-rt models`)")


def load(path: Union[str, os.PathLike], *, device=None, dtype=None, n_heads: Optional[int] = None,
         use_ema: bool = True, revision: Optional[str] = None, cache_dir: Optional[str] = None,
         local_files_only: bool = False, token=None, limits: Optional[Limits] = None) -> Model:
    """Load a Hub name (``"david3684/FMLM-B-OWT"``, an alias such as ``"fmlm-owt"``), a Lightning ``.ckpt``, a hub
    directory (``model.safetensors`` + ``config.json``) or an flm_rt directory.

    Hub names are fetched (only ``config.json`` and ``model.safetensors``) into the Hugging Face cache through
    ``huggingface_hub``; ``revision`` defaults to the pinned commit for the published models, ``local_files_only``
    (or ``HF_HUB_OFFLINE=1``) never touches the network. Checkpoints are untrusted: pickles are read without
    executing anything (see :mod:`flm_rt.safe_pickle`). EMA weights are used by default, as the reference samples
    with them. ``n_heads`` overrides the config. ``limits``: what the file may cost (:class:`flm_rt.limits.Limits`;
    default: sizes for the published models, model memory from env FLM_RT_MAX_MODEL_BYTES, else 32 GiB).
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    local, label = resolve_source(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  token=token)
    return _load_local(local, label, dev, dt, n_heads=n_heads, use_ema=use_ema, limits=limits)


def _load_local(local: str, label: str, device: torch.device, dtype: torch.dtype, *, n_heads: Optional[int] = None,
                use_ema: bool = True, limits: Optional[Limits] = None) -> Model:
    ck = loading.read_checkpoint(local, n_heads=n_heads, use_ema=use_ema, limits=limits)
    return Model.from_state_dict(ck.config, ck.state_dict, device=device, dtype=dtype, source=label,
                                 format=ck.format, weights=ck.weights, notes=ck.notes,
                                 source_config=ck.source_config, path=local)


def convert(src, dst, *, dtype=None, n_heads: Optional[int] = None, use_ema: bool = True,
            revision: Optional[str] = None, cache_dir: Optional[str] = None, local_files_only: bool = False,
            token=None, limits: Optional[Limits] = None, overwrite: bool = False) -> str:
    """Convert any supported checkpoint (or Hub name) to the hub layout (``model.safetensors`` + ``config.json``
    with the source's training config and flm_rt's metadata; EMA weights only, no optimizer state). Atomic.
    An existing ``dst`` is refused unless ``overwrite`` (and then only a folder flm_rt wrote is replaced)."""
    local, label = resolve_source(src, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  token=token)
    ck = loading.read_checkpoint(local, n_heads=n_heads, use_ema=use_ema, limits=limits)
    return loading.write_flm_rt(os.fspath(dst), ck.config, ck.state_dict,
                                dtype=None if dtype is None else resolve_dtype(dtype), source=label,
                                weights=ck.weights, source_config=ck.source_config, overwrite=overwrite)


# ------------------------------------------------------------------------------------------- warm model cache
_CACHE_LOCK = threading.Lock()
_MODEL_CACHE: "OrderedDict[tuple, Model]" = OrderedDict()
MODEL_CACHE_SIZE = int(os.environ.get("FLM_RT_MODEL_CACHE", "2"))


def _file_stamp(local: str) -> tuple:
    """What identifies a file's contents cheaply: its real path and modification time (every file of a directory)."""
    real = os.path.realpath(local)
    if os.path.isdir(real):
        return real, tuple(sorted((n, os.stat(os.path.join(real, n)).st_mtime_ns) for n in os.listdir(real)
                                  if os.path.isfile(os.path.join(real, n))))
    return real, os.stat(real).st_mtime_ns


def cached_load(path: Union[str, os.PathLike], *, device=None, dtype=None, **kw) -> Model:
    """:func:`load` through a small LRU cache keyed by (resolved file, its modification time, device, dtype, the
    other load options), so repeated ``generate(path_or_name)`` calls reuse the loaded, prepared model.
    ``FLM_RT_MODEL_CACHE`` sets its size (default 2; 0 turns it off)."""
    hub_kw = {k: kw.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kw}
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    local, label = resolve_source(path, **hub_kw)
    key = (_file_stamp(local), str(dev), str(dt), tuple(sorted(kw.items())), label)
    with _CACHE_LOCK:
        model = _MODEL_CACHE.get(key)
        if model is not None:
            _MODEL_CACHE.move_to_end(key)
            return model
    model = _load_local(local, label, dev, dt, **kw)
    if MODEL_CACHE_SIZE > 0:
        with _CACHE_LOCK:
            _MODEL_CACHE[key] = model
            while len(_MODEL_CACHE) > MODEL_CACHE_SIZE:
                _MODEL_CACHE.popitem(last=False)
    return model


def clear_model_cache() -> None:
    with _CACHE_LOCK:
        _MODEL_CACHE.clear()


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


def generate(model: Union[Model, str, os.PathLike], *, num_samples: int = 1, steps: int = 1,
             stochasticity: Optional[float] = None, seq_len: Optional[int] = None, seed: Optional[int] = None,
             generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
             noise: Optional[torch.Tensor] = None, decode: bool = True, kernels: Optional[str] = None,
             noise_space: str = "vocab", callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
             progress: bool = False, device=None, dtype=None, cuda_graph=None) -> Generation:
    """Generate ``num_samples`` sequences in ``steps`` network calls.

    ``noise`` [S, B, L, V]: explicit standard-normal draws consumed in SPEC order (z_0, eps_0, eps_1, ...); it
    fixes B and L. ``seed``: reproducible; sample k's draws depend only on (seed, k). ``generator``: draws the
    whole batch from that generator; a list of generators, one per sample (on the model's device), draws sample k
    from ``generator[k]`` exactly as ``seed`` does, so ``torch.Generator().manual_seed(sample_seed(s, k))`` gives
    sample k of ``seed=s`` in any row of any batch (the server merges requests this way). See :mod:`flm_rt.noise`.
    Default stochasticity: the checkpoint's (0.0 if it says nothing).
    ``kernels``: "auto" | "torch" | "ext" (default: env FLM_RT_KERNELS, else auto).
    ``noise_space``: "vocab" (default) runs the SPEC's V-space process; "embedding" runs the same process
    through the embedding (draws of N(0, E^T E) in R^D, no [B, L, V] noise, no embedding matmul of the noise):
    the same output distribution, faster, but other draws than "vocab" for a given seed. With explicit
    ``noise`` both spaces give the same ids (up to float rounding).
    ``callback(step, t, ids)``: called after every step with the step index, the time reached ((step+1)/steps)
    and the current argmax ids [B, L] (int64, CPU): of the state z in V-space (noise turning into text; the
    output at the last step), of the model's prediction with ``noise_space="embedding"``. Nothing is computed for
    it when it is None. ``progress=True`` shows a tqdm bar over the steps.
    A path or Hub name in place of ``model`` is loaded on ``device`` / ``dtype`` once and kept warm (a small LRU
    cache keyed by the resolved file, its modification time, device and dtype; see :func:`cached_load`).
    ``cuda_graph``: "auto" (default, env FLM_RT_CUDA_GRAPHS): on CUDA, a seeded call of batch <= 16 replays a
    captured graph of the whole generation (captured on the first call of that shape; the same ids as eager);
    True: always (a GenerationError says why it cannot); False: never. See :mod:`flm_rt.cuda_graphs`.
    """
    model = _model_for(model, device, dtype)
    if callback is not None and not callable(callback):
        raise GenerationError(f"callback must be callable(step, t, ids), got {type(callback).__name__}")
    if noise_space not in SPACES:
        raise GenerationError(f"noise_space must be 'vocab' or 'embedding', got {noise_space!r}")
    cfg, dev = model.config, model.device
    if stochasticity is None:
        stochasticity = cfg.default_stochasticity
    plan = make_plan(two_time=cfg.two_time, steps=steps, stochasticity=stochasticity, vocab_size=cfg.vocab_size)
    stochasticity = float(stochasticity)  # checked by the planner
    draws = draws_for(model, draws_needed(plan), noise=noise, seed=seed, generator=generator,
                      num_samples=num_samples, seq_len=seq_len, space=noise_space,
                      plan_name=f"{steps} step(s) at stochasticity {stochasticity}")
    b, length = draws.batch, draws.length
    check_request_memory(generation_bytes(b, length, cfg.vocab_size, cfg.hidden_size,
                                          embedded=noise_space == "embedding"), dev,
                         f"generating {b} x {length} tokens (V={cfg.vocab_size})")

    if cuda_graphs.wanted(cuda_graph, device=dev, batch=b, seeded=draws.seeded,
                          callback=callback is not None or progress):
        graphed = cuda_graphs.graph_for(model, cuda_graphs.GraphKey(b, length, steps, stochasticity, noise_space,
                                                                    kernels))  # captured on the first call
        run = lambda on_step: graphed.replay(draws.seed)  # noqa: E731
    else:
        draw = draws.eager(dev)
        run = lambda on_step: run_plan(model.denoiser, plan, draw, kernels=kernels, space=noise_space,  # noqa: E731
                                       on_step=on_step, callback=callback)
    ids, elapsed = _timed(run, dev, progress=progress, desc=f"sampling {b} x {length}", steps=steps)
    gen = Generation(ids, None, steps, stochasticity, draws.seed, elapsed, device=str(dev),
                     dtype=dtype_name(model.dtype))
    if decode:
        _decode(model, gen)
    return gen


def _model_for(model, device, dtype) -> Model:
    if not isinstance(model, Model):
        return cached_load(model, device=device, dtype=dtype)
    if device is not None or dtype is not None:
        raise GenerationError("device= and dtype= apply when model is a path or Hub name; load a Model with "
                              "flm_rt.load(..., device=, dtype=) instead")
    return model


def _timed(run: Callable, dev: torch.device, *, progress: bool, desc: str, steps: int) -> tuple[torch.Tensor, float]:
    """(ids [B, L] int64 on the CPU, seconds) of ``run(on_step)`` under inference mode, the device synchronised;
    with ``progress`` a tqdm bar advances on every step."""
    bar = on_step = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
        on_step = lambda i: bar.update(1)  # noqa: E731
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            ids = run(on_step)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    return ids.to("cpu", torch.int64), elapsed


def _decode(model: Model, gen: Generation) -> None:
    """Fill ``gen.text`` and ``gen.documents`` (or the reason there is no text) with the model's tokenizer."""
    t1 = time.perf_counter()
    tok = model.tokenizer
    if tok is None:
        gen.text_unavailable_reason = model.tokenizer_status.removeprefix("none: ")
    else:
        gen.documents = [tok.decode_pieces(row.tolist()) for row in gen.token_ids]
        gen.text = [tok.decode(row.tolist()) for row in gen.token_ids]
    gen.decode_s = time.perf_counter() - t1
