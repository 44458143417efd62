"""Checkpoint formats (SPEC section 5) -> a validated state dict + ModelConfig, and flm_rt's own format.

Formats, detected from the path:
* Lightning ``.ckpt`` (a torch zip pickle) read with :mod:`flm_rt.safe_pickle` (nothing in it is executed);
  EMA weights by default, ``._orig_mod.`` stripped, ``teacher*`` and non-backbone keys dropped.
* Hub directory: ``model.safetensors`` (keys without ``backbone.``) + ``config.json`` ``{"config": ..., "vocab_size"}``,
  the ``PyTorchModelHubMixin`` layout of the published repos. It is also the one format flm_rt writes
  (:func:`write_flm_rt`), with flm_rt's own metadata under the ``"flm_rt"`` key of ``config.json``.
* flm_rt directory: ``model.safetensors`` + ``flm_rt.json`` (format_version 1 of earlier flm_rt; still read).
The architecture is read off the weights; length and n_heads come from the config (n_heads cannot be inferred);
the tokenizer is the one the config names (``data.tokenizer_name_or_path``).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import outputs
from .errors import CheckpointError, ConfigError, NonFiniteWeightsError
from .limits import (DEFAULT_LIMITS, Limits, brief, check_model_memory, config_int, config_unit_float, gib,
                     open_regular, regular_file)
from .model import ModelConfig
from .safe_pickle import LazyTensor, TorchZip, inert_to_plain
from .tokenizer import tokenizer_kind

FORMAT_FILE = "flm_rt.json"
WEIGHTS_FILE = "model.safetensors"
HUB_CONFIG_FILE = "config.json"
FORMAT_VERSION = 2                     # 1: flm_rt.json directories; 2: hub layout + config.json["flm_rt"]
META_KEY = "flm_rt"
# ``algo.name`` values of the released configs and the reference code's variants; the architecture is read off the
# weights either way, and a name outside this list is only noted.
KNOWN_ALGORITHMS = frozenset({
    "flm", "fmlm", "dos", "dos_denoiser", "dos_shortcut", "dos_shortcut_distill", "dos_shortcut_distill_double",
    "dos_shortcut_finetune", "flm_distill", "flm_distill_double", "flm_semigroup_distill", "continuousflow"})
TRAINING_ONLY_PREFIXES = ("learnable_loss_weighting.",)
BUFFER_KEYS = ("rotary_emb.inv_freq",)


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    format: str                      # "lightning-ckpt" | "hub" | "flm_rt"
    path: str
    weights: str = "ema"             # "ema" | "state_dict"
    notes: list[str] = field(default_factory=list)
    source_config: dict = field(default_factory=dict)  # the authors' training config, as stored (plain data)


# ----------------------------------------------------------------------------------------------- detection
def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):  # lexists: a FIFO or dangling link in its place is refused by the reader, not skipped
        if os.path.lexists(os.path.join(path, FORMAT_FILE)):
            return "flm_rt"
        if os.path.lexists(os.path.join(path, HUB_CONFIG_FILE)) or os.path.lexists(os.path.join(path, WEIGHTS_FILE)):
            return "hub"
        raise CheckpointError(
            f"{path}: directory holds no model: expected '{WEIGHTS_FILE}' with '{HUB_CONFIG_FILE}' (hub layout) "
            f"or '{FORMAT_FILE}' (flm_rt format)")
    if path.endswith(".safetensors"):
        return "hub"
    return "lightning-ckpt"


# ----------------------------------------------------------------------------------------------- config
def tokenizer_for_vocab(vocab_size: int) -> Optional[str]:
    """The tokenizer a vocabulary size implies, for files whose config names none."""
    return tokenizer_kind(None, vocab_size)[0]


def _section(cfg: dict, name: str) -> dict:
    value = cfg.get(name)
    return value if isinstance(value, dict) else {}


def _short_text(value: Any) -> Optional[str]:
    return value[:200] if isinstance(value, str) else None


def _config_from_weights(sd: dict, cfg: dict, *, n_heads: Optional[int], source: str,
                         limits: Limits = DEFAULT_LIMITS) -> ModelConfig:
    """Architecture off the weights (tensors or anything with .shape); length / n_heads / sampling defaults off the
    (reference-style) config dict, validated by type and range, never coerced."""
    try:
        v, d = sd["vocab_embed.embedding"].shape
        c = sd["sigma_map.mlp.0.weight"].shape[0]
    except (KeyError, ValueError, IndexError):
        raise CheckpointError(
            f"{source}: weights lack 'vocab_embed.embedding' [V, D] or 'sigma_map.mlp.0.weight' [C, 256]; "
            "not an FLM/FMLM denoiser") from None
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d{1,9})\.", k))}
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        found = sorted(blocks)
        raise CheckpointError(f"{source}: transformer blocks missing or not numbered 0..N-1 (found "
                              f"{found[:12]}{' ...' if len(found) > 12 else ''})")
    if len(blocks) > limits.max_blocks:
        raise CheckpointError(f"{source}: {len(blocks)} transformer blocks (flm_rt's limit is {limits.max_blocks})")
    two_time = any(k.startswith("sigma_map_prime.") for k in sd)
    model_cfg = _section(cfg, "model")
    if n_heads is not None:
        heads = config_int(n_heads, "n_heads", source)
    elif model_cfg.get("n_heads") is not None:
        heads = config_int(model_cfg["n_heads"], "config model.n_heads", source)
    else:
        raise ConfigError(f"{source}: the number of attention heads is not recorded and cannot be read off the "
                          "weights; pass n_heads=... (12 for the published models)")
    if model_cfg.get("length") is None:
        raise ConfigError(f"{source}: the sequence length (config model.length) is not recorded")
    length = config_int(model_cfg["length"], "config model.length", source, 1, limits.max_length)
    for key, val in (("hidden_size", d), ("cond_dim", c), ("n_blocks", len(blocks))):
        if model_cfg.get(key) is not None and config_int(model_cfg[key], f"config model.{key}", source) != val:
            raise CheckpointError(f"{source}: config says model.{key}={model_cfg[key]} but the weights have {val}")
    gamma = _section(cfg, "sampling").get("gamma")
    stoch = 0.0 if gamma is None else config_unit_float(gamma, "config sampling.gamma", source)
    tok_name = _short_text(_section(cfg, "data").get("tokenizer_name_or_path"))
    tokenizer, tok_note = tokenizer_kind(tok_name, int(v))
    extra = {"algo": _short_text(_section(cfg, "algo").get("name")), "tokenizer_in_config": tok_name}
    if tok_note:
        extra["tokenizer_note"] = tok_note
    try:
        return ModelConfig(
            vocab_size=int(v), length=length, hidden_size=int(d), n_blocks=len(blocks), n_heads=heads,
            cond_dim=int(c), two_time=two_time, tokenizer=tokenizer,
            default_stochasticity=stoch if two_time else 0.0, extra=extra)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def _config_notes(config: ModelConfig) -> list[str]:
    notes = []
    algo = config.extra.get("algo")
    if algo is not None and algo not in KNOWN_ALGORITHMS:
        notes.append(f"the config names algorithm {algo!r}, not one of the released ones; the architecture was "
                     f"read off the weights ({'two-time FMLM' if config.two_time else 'one-time FLM'})")
    if config.extra.get("tokenizer_note"):
        notes.append(config.extra["tokenizer_note"])
    return notes


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a denoiser with this config and its shape (the contract a checkpoint must meet)."""
    from .model import Denoiser

    with torch.device("meta"):
        net = Denoiser(cfg)
    return {k: tuple(t.shape) for k, t in net.state_dict().items()}


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def validate_shapes(sd: dict, cfg: ModelConfig, source: str) -> dict:
    """Drop training-only keys; refuse missing/extra keys, wrong shapes and non-float dtypes. Works on tensor
    descriptions (.shape, .dtype) before any weight is read; the model's size must have been checked first."""
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd) - set(BUFFER_KEYS))
    extra = sorted(set(sd) - set(want))
    if missing:
        raise CheckpointError(f"{source}: missing weights: {', '.join(missing[:8])}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if extra:
        raise CheckpointError(f"{source}: unexpected weights (not part of an FLM/FMLM denoiser): "
                              f"{', '.join(k[:100] for k in extra[:8])}"
                              + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
    bad_shape = [f"{k} {tuple(v.shape)} (expected {want[k]})" for k, v in sd.items() if tuple(v.shape) != want[k]]
    if bad_shape:
        raise CheckpointError(f"{source}: weight shapes inconsistent with each other: {'; '.join(bad_shape[:6])}")
    not_float = [f"{k} ({str(v.dtype).replace('torch.', '')})" for k, v in sd.items() if v.dtype not in _WEIGHT_DTYPES]
    if not_float:
        raise CheckpointError(f"{source}: weights of an unsupported dtype (flm_rt reads float32, float16, bfloat16 "
                              f"and float64): {', '.join(not_float[:8])}")
    return sd


def check_finite(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    nonfinite = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise NonFiniteWeightsError(
            f"{source}: NaN or infinite values in {', '.join(nonfinite[:8])}; refusing to load (the model would "
            "produce garbage). Re-export the checkpoint from a healthy run.")
    return sd


def validate_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Drop training-only keys; refuse missing/extra keys, wrong shapes, non-float and non-finite tensors."""
    return check_finite(validate_shapes(sd, cfg, source), source)


# ----------------------------------------------------------------------------------------------- readers
@dataclass
class _Spec:
    """A weight described by a file header: enough to validate it before reading it."""
    shape: tuple
    dtype: Any  # a torch.dtype, or the file's name for a dtype flm_rt does not read


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _safetensors_specs(path: str) -> dict[str, _Spec]:
    """Names, shapes and dtypes from a safetensors header (the library checks offsets against the file)."""
    from safetensors import SafetensorError, safe_open

    regular_file(path, "weights file")
    try:
        with safe_open(path, framework="pt") as f:
            specs = {}
            for k in f.keys():
                sl = f.get_slice(k)
                name = sl.get_dtype()
                specs[k] = _Spec(tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(name, name))
            return specs
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({str(e)[:300]})") from None


def _read_safetensors(path: str, keys) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({str(e)[:300]})") from None


def _read_json(path: str, limits: Limits = DEFAULT_LIMITS) -> dict:
    with open_regular(path, "file") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_json_bytes:
            raise CheckpointError(f"{path}: {gib(size)}, above flm_rt's limit of {gib(limits.max_json_bytes)} "
                                  "for a JSON file")
        try:
            data = f.read(limits.max_json_bytes + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        d = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _load_safetensors_weights(weights: str, config_of, source: str, limits: Limits):
    """Header -> config (config_of(specs)) -> memory check -> shape check -> read -> finite check."""
    stored = _safetensors_specs(weights)
    specs = {k.removeprefix("backbone."): v for k, v in stored.items()}
    if len(specs) != len(stored):
        raise CheckpointError(f"{weights}: the same weight is stored with and without the 'backbone.' prefix")
    config = config_of(specs)
    check_model_memory(config, source, limits)
    specs = validate_shapes(specs, config, source)
    raw = _read_safetensors(weights, [k for k in stored if k.removeprefix("backbone.") in specs])
    return config, check_finite({k.removeprefix("backbone."): v for k, v in raw.items()}, source)


def _load_hub(path: str, n_heads: Optional[int], limits: Limits) -> LoadedCheckpoint:
    root = path if os.path.isdir(path) else os.path.dirname(path) or "."
    weights = os.path.join(root, WEIGHTS_FILE) if os.path.isdir(path) else path
    cfg_path = os.path.join(root, HUB_CONFIG_FILE)
    cfg = _read_json(cfg_path, limits) if os.path.lexists(cfg_path) else {}
    inner = cfg.get("config", cfg)
    inner = inner if isinstance(inner, dict) else {}
    vocab = cfg.get("vocab_size")
    meta = cfg.get(META_KEY) if isinstance(cfg.get(META_KEY), dict) else {}
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: written by a newer flm_rt (format {version}); upgrade flm_rt")

    def config_of(specs):
        config = _config_from_weights(specs, inner, n_heads=n_heads, source=path, limits=limits)
        if vocab is not None and (isinstance(vocab, bool) or vocab != config.vocab_size):
            raise CheckpointError(f"{cfg_path}: vocab_size {brief(vocab)} disagrees with the weights "
                                  f"({config.vocab_size})")
        return config
    config, sd = _load_safetensors_weights(weights, config_of, path, limits)
    weights_kind = meta.get("weights") if meta.get("weights") in ("ema", "state_dict", "random") else "ema"
    return LoadedCheckpoint(config, sd, "hub", path, weights=weights_kind, notes=_config_notes(config),
                            source_config=inner)


def _load_flm_rt(path: str, n_heads: Optional[int], limits: Limits) -> LoadedCheckpoint:
    meta_path = os.path.join(path, FORMAT_FILE)
    meta = _read_json(meta_path, limits)
    if meta.get("format") != "flm_rt" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_path}: not an flm_rt model description")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{meta_path}: format_version must be a positive integer, got {brief(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer flm_rt (format {version}); upgrade flm_rt")
    weights_kind = meta.get("weights", "ema")
    if not isinstance(weights_kind, str) or len(weights_kind) > 32:
        raise CheckpointError(f"{meta_path}: weights must be a short string, got {brief(weights_kind)}")
    try:
        cfg = dict(meta["config"])
        if n_heads is not None:
            cfg["n_heads"] = config_int(n_heads, "n_heads", path)
        config = ModelConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{meta_path}: invalid config ({e})") from None

    def config_of(specs):  # the stored config; its size is checked before a meta model is built from it
        return config
    config, sd = _load_safetensors_weights(os.path.join(path, WEIGHTS_FILE), config_of, path, limits)
    return LoadedCheckpoint(config, sd, "flm_rt", path, weights=weights_kind, source_config=reference_config(config))


def _load_lightning(path: str, n_heads: Optional[int], use_ema: bool, limits: Limits) -> LoadedCheckpoint:
    with TorchZip(path, limits) as z:
        obj = z.obj
        if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
            raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
        notes = []
        backbone: dict[str, LazyTensor] = {}
        for k, v in obj["state_dict"].items():
            if not isinstance(k, str):
                raise CheckpointError(f"{path}: a state_dict key is {brief(k)}, not a string")
            k = k.replace("._orig_mod.", ".")
            if k.startswith("_orig_mod."):
                k = k[len("_orig_mod."):]
            if k.startswith("teacher") or not k.startswith("backbone."):
                continue
            if not isinstance(v, LazyTensor):
                raise CheckpointError(f"{path}: state_dict entry {k[:100]} is not a tensor")
            backbone[k[len("backbone."):]] = v
        hp = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), dict) else {}
        cfg = inert_to_plain(hp.get("config"), path, limits) if hp.get("config") is not None else {}
        cfg = cfg if isinstance(cfg, dict) else {}
        weights = "state_dict"
        if use_ema:
            ema = obj.get("ema")
            shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
            if shadow is None:
                notes.append("no EMA weights in the checkpoint: using its training weights")
            else:
                if not isinstance(shadow, (list, tuple)):
                    raise CheckpointError(f"{path}: ema.shadow_params is {brief(shadow)}, not a list of tensors")
                names = [k for k in backbone if k not in BUFFER_KEYS]
                if len(shadow) != len(names):
                    raise CheckpointError(
                        f"{path}: EMA holds {len(shadow)} tensors but the backbone has {len(names)} parameters; "
                        "the checkpoint is inconsistent (load with use_ema=False to use the training weights)")
                for name, t in zip(names, shadow):
                    if not isinstance(t, LazyTensor) or tuple(t.shape) != tuple(backbone[name].shape):
                        raise CheckpointError(
                            f"{path}: EMA entry for {name} is "
                            f"{tuple(t.shape) if isinstance(t, LazyTensor) else brief(t)}, expected a tensor of "
                            f"shape {tuple(backbone[name].shape)}")
                    backbone[name] = t
                weights = "ema"
        config = _config_from_weights(backbone, cfg, n_heads=n_heads, source=path, limits=limits)
        notes.extend(_config_notes(config))
        check_model_memory(config, path, limits)
        backbone = validate_shapes(backbone, config, path)
        state_dict = check_finite({k: z.tensor(v) for k, v in backbone.items()}, path)
        inert = z.inert_globals
    ignored = sorted(g for g in inert if not g.startswith(("omegaconf.", "typing.", "transformers.")))
    if ignored:
        msg = (f"{path}: the checkpoint pickles objects of classes flm_rt does not know ("
               f"{', '.join(ignored[:10])}{f' and {len(ignored) - 10} more' if len(ignored) > 10 else ''}); "
               "they were read as inert data, nothing was executed")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    return LoadedCheckpoint(config, state_dict, "lightning-ckpt", path, weights=weights, notes=notes,
                            source_config=cfg)


def read_checkpoint(path: str, *, n_heads: Optional[int] = None, use_ema: bool = True,
                    limits: Optional[Limits] = None) -> LoadedCheckpoint:
    path = os.fspath(path)
    limits = limits or DEFAULT_LIMITS
    fmt = detect_format(path)
    if fmt == "flm_rt":
        return _load_flm_rt(path, n_heads, limits)
    if fmt == "hub":
        return _load_hub(path, n_heads, limits)
    return _load_lightning(path, n_heads, use_ema, limits)


# ----------------------------------------------------------------------------------------------- writer
def reference_config(config: ModelConfig, base: Optional[dict] = None) -> dict:
    """The authors' config shape (``model``, ``algo``, ``data``, ``sampling`` sections) for ``config``: ``base``
    (the source's own training config) kept as it is, with the values flm_rt knows written over it."""
    out = json.loads(json.dumps(base or {}, default=str))
    sections = {k: (out[k] if isinstance(out.get(k), dict) else {}) for k in ("model", "algo", "data", "sampling")}
    out.update(sections)
    sections["model"].update(hidden_size=config.hidden_size, cond_dim=config.cond_dim, length=config.length,
                             n_blocks=config.n_blocks, n_heads=config.n_heads)
    sections["algo"].setdefault("name", "fmlm" if config.two_time else "flm")
    sections["algo"].setdefault("backbone", "dit")
    sections["algo"]["double_temb"] = config.two_time
    if config.tokenizer is not None:
        sections["data"]["tokenizer_name_or_path"] = config.tokenizer
    if config.two_time:
        sections["sampling"]["gamma"] = config.default_stochasticity
    return out


def written_by_flm_rt(path: str) -> bool:
    """A folder flm_rt wrote: the hub layout with flm_rt's key in config.json, or an older flm_rt.json folder."""
    if os.path.islink(path):
        return False
    if os.path.isfile(os.path.join(path, FORMAT_FILE)):
        return True
    try:
        with open(os.path.join(path, HUB_CONFIG_FILE), encoding="utf-8") as f:
            head = f.read(1 << 20)
        return isinstance(json.loads(head).get(META_KEY), dict)
    except (OSError, ValueError, AttributeError):
        return False


def write_flm_rt(dst: str, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                 dtype: Optional[torch.dtype] = None, source: Optional[str] = None, weights: str = "ema",
                 source_config: Optional[dict] = None, overwrite: bool = False) -> str:
    """Write the hub layout (``model.safetensors`` + ``config.json``) that the authors' ``from_pretrained`` reads,
    flm_rt's metadata under ``config.json["flm_rt"]``. Atomic: a temporary sibling directory is filled, given the
    umask's permissions (0644 files, 0755 directory with the usual umask) and renamed into place; the rules of
    :mod:`flm_rt.outputs` apply (an existing output is replaced only with ``overwrite`` and only if flm_rt wrote it)."""
    from safetensors.torch import save_file

    from ._version import __version__

    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{dst}: parent directory {parent} does not exist")
    outputs.check_destination(dst, overwrite=overwrite, error=CheckpointError, hint="pass overwrite=True (--overwrite)",
                              replaceable=written_by_flm_rt)
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"convert dtype must be float32, bfloat16 or float16, got {dtype}")
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if dtype is not None and k not in BUFFER_KEYS:
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    hub_config = {
        "config": reference_config(config, source_config), "vocab_size": config.vocab_size,
        META_KEY: {"format_version": FORMAT_VERSION, "flm_rt_version": __version__, "config": config.to_dict(),
                   "weights": weights, "source": source, "dtype": str(dtype or torch.float32).replace("torch.", "")},
    }
    try:
        tmp = outputs.make_temp_dir(parent, ".flm_rt-convert-")
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write in {parent} ({e.strerror or e})") from None
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, HUB_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hub_config, f, indent=1, default=str)
        outputs.apply_umask(tmp)
        outputs.move_into_place(tmp, dst, overwrite=overwrite)
    except BaseException as e:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, read-only, or another writer got there first
            exists = " (another process wrote it first)" if os.path.lexists(dst) else ""
            raise CheckpointError(f"{dst}: cannot write{exists}: {e.strerror or e}") from None
        raise
    return dst


def param_count(config: ModelConfig) -> int:
    return sum(math.prod(s) for k, s in expected_shapes(config).items() if k not in BUFFER_KEYS)
