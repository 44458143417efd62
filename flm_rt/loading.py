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
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import CheckpointError, ConfigError, NonFiniteWeightsError
from .model import ModelConfig
from .safe_pickle import inert_to_plain, read_torch_zip
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
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, FORMAT_FILE)):
            return "flm_rt"
        if os.path.isfile(os.path.join(path, HUB_CONFIG_FILE)) or os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
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


def _config_from_weights(sd: dict[str, torch.Tensor], cfg: dict, *, n_heads: Optional[int], source: str) -> ModelConfig:
    """Architecture off the weights; length / n_heads / sampling defaults off the (reference-style) config dict."""
    try:
        v, d = sd["vocab_embed.embedding"].shape
        c = sd["sigma_map.mlp.0.weight"].shape[0]
    except (KeyError, ValueError):
        raise CheckpointError(
            f"{source}: weights lack 'vocab_embed.embedding' [V, D] or 'sigma_map.mlp.0.weight' [C, 256]; "
            "not an FLM/FMLM denoiser") from None
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"{source}: transformer blocks missing or not numbered 0..N-1 (found {sorted(blocks)})")
    two_time = any(k.startswith("sigma_map_prime.") for k in sd)
    model_cfg = cfg.get("model", {}) if isinstance(cfg.get("model"), dict) else {}
    heads = n_heads if n_heads is not None else model_cfg.get("n_heads")
    if heads is None:
        raise ConfigError(f"{source}: the number of attention heads is not recorded and cannot be read off the "
                          "weights; pass n_heads=... (12 for the published models)")
    length = model_cfg.get("length")
    if length is None:
        raise ConfigError(f"{source}: the sequence length (config model.length) is not recorded")
    for key, val in (("hidden_size", d), ("cond_dim", c), ("n_blocks", len(blocks))):
        if key in model_cfg and model_cfg[key] != val:
            raise CheckpointError(f"{source}: config says model.{key}={model_cfg[key]} but the weights have {val}")
    sampling = cfg.get("sampling", {}) if isinstance(cfg.get("sampling"), dict) else {}
    stoch = sampling.get("gamma", 0.0)
    stoch = float(stoch) if isinstance(stoch, (int, float)) and 0.0 <= float(stoch) <= 1.0 else 0.0
    algo = cfg.get("algo", {}) if isinstance(cfg.get("algo"), dict) else {}
    tok_name = (cfg.get("data") or {}).get("tokenizer_name_or_path") if isinstance(cfg.get("data"), dict) else None
    tokenizer, tok_note = tokenizer_kind(tok_name, int(v))
    extra = {"algo": algo.get("name"), "tokenizer_in_config": tok_name}
    if tok_note:
        extra["tokenizer_note"] = tok_note
    try:
        return ModelConfig(
            vocab_size=int(v), length=int(length), hidden_size=int(d), n_blocks=len(blocks), n_heads=int(heads),
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


def validate_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Drop training-only keys; refuse missing/extra keys, wrong shapes, non-float and non-finite tensors."""
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(sd) - set(BUFFER_KEYS))
    extra = sorted(set(sd) - set(want))
    if missing:
        raise CheckpointError(f"{source}: missing weights: {', '.join(missing[:8])}"
                              + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if extra:
        raise CheckpointError(f"{source}: unexpected weights (not part of an FLM/FMLM denoiser): "
                              f"{', '.join(extra[:8])}" + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else ""))
    bad_shape = [f"{k} {tuple(v.shape)} (expected {want[k]})" for k, v in sd.items() if tuple(v.shape) != want[k]]
    if bad_shape:
        raise CheckpointError(f"{source}: weight shapes inconsistent with each other: {'; '.join(bad_shape[:6])}")
    not_float = [k for k, v in sd.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source}: non-floating-point weights: {', '.join(not_float[:8])}")
    nonfinite = [k for k, v in sd.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise NonFiniteWeightsError(
            f"{source}: NaN or infinite values in {', '.join(nonfinite[:8])}; refusing to load (the model would "
            "produce garbage). Re-export the checkpoint from a healthy run.")
    return sd


# ----------------------------------------------------------------------------------------------- readers
def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: weights file missing")
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(path), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _load_hub(path: str, n_heads: Optional[int]) -> LoadedCheckpoint:
    root = path if os.path.isdir(path) else os.path.dirname(path) or "."
    weights = os.path.join(root, WEIGHTS_FILE) if os.path.isdir(path) else path
    cfg_path = os.path.join(root, HUB_CONFIG_FILE)
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    inner = cfg.get("config", cfg)
    inner = inner if isinstance(inner, dict) else {}
    meta = cfg.get(META_KEY) if isinstance(cfg.get(META_KEY), dict) else {}
    if isinstance(meta.get("format_version"), int) and meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: written by a newer flm_rt (format {meta['format_version']}); "
                              "upgrade flm_rt")
    sd, _ = _read_safetensors(weights)
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    config = _config_from_weights(sd, inner, n_heads=n_heads, source=path)
    if "vocab_size" in cfg and cfg["vocab_size"] != config.vocab_size:
        raise CheckpointError(f"{cfg_path}: vocab_size {cfg['vocab_size']} disagrees with the weights "
                              f"({config.vocab_size})")
    weights_kind = meta.get("weights") if meta.get("weights") in ("ema", "state_dict", "random") else "ema"
    return LoadedCheckpoint(config, validate_state_dict(sd, config, path), "hub", path, weights=weights_kind,
                            notes=_config_notes(config), source_config=inner)


def _load_flm_rt(path: str, n_heads: Optional[int]) -> LoadedCheckpoint:
    meta = _read_json(os.path.join(path, FORMAT_FILE))
    if meta.get("format") != "flm_rt" or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}/{FORMAT_FILE}: not an flm_rt model description")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer flm_rt (format {meta['format_version']}); upgrade flm_rt")
    try:
        config = ModelConfig.from_dict(meta["config"])
        if n_heads is not None and n_heads != config.n_heads:
            config = ModelConfig.from_dict({**meta["config"], "n_heads": n_heads})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}/{FORMAT_FILE}: invalid config ({e})") from None
    sd, _ = _read_safetensors(os.path.join(path, WEIGHTS_FILE))
    return LoadedCheckpoint(config, validate_state_dict(sd, config, path), "flm_rt", path,
                            weights=meta.get("weights", "ema"), source_config=reference_config(config))


def _load_lightning(path: str, n_heads: Optional[int], use_ema: bool) -> LoadedCheckpoint:
    obj, inert = read_torch_zip(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
    notes = []
    backbone: dict[str, torch.Tensor] = {}
    for k, v in obj["state_dict"].items():
        k = str(k).replace("._orig_mod.", ".")
        if k.startswith("_orig_mod."):
            k = k[len("_orig_mod."):]
        if k.startswith("teacher") or not k.startswith("backbone."):
            continue
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {k} is not a tensor")
        backbone[k[len("backbone."):]] = v
    hp = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), dict) else {}
    cfg = inert_to_plain(hp.get("config")) if hp.get("config") is not None else {}
    cfg = cfg if isinstance(cfg, dict) else {}
    weights = "state_dict"
    if use_ema:
        ema = obj.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
        if shadow is None:
            notes.append("no EMA weights in the checkpoint: using its training weights")
        else:
            names = [k for k in backbone if k not in BUFFER_KEYS]
            if len(shadow) != len(names):
                raise CheckpointError(
                    f"{path}: EMA holds {len(shadow)} tensors but the backbone has {len(names)} parameters; "
                    "the checkpoint is inconsistent (load with use_ema=False to use the training weights)")
            for name, t in zip(names, shadow):
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(backbone[name].shape):
                    raise CheckpointError(f"{path}: EMA tensor for {name} has shape "
                                          f"{tuple(getattr(t, 'shape', ()))}, expected {tuple(backbone[name].shape)}")
                backbone[name] = t
            weights = "ema"
    config = _config_from_weights(backbone, cfg, n_heads=n_heads, source=path)
    notes.extend(_config_notes(config))
    ignored = sorted(g for g in inert if not g.startswith(("omegaconf.", "typing.", "transformers.")))
    if ignored:
        msg = (f"{path}: the checkpoint pickles objects of classes flm_rt does not know ({', '.join(ignored)}); "
               "they were read as inert data, nothing was executed")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    return LoadedCheckpoint(config, validate_state_dict(backbone, config, path), "lightning-ckpt", path,
                            weights=weights, notes=notes, source_config=cfg)


def read_checkpoint(path: str, *, n_heads: Optional[int] = None, use_ema: bool = True) -> LoadedCheckpoint:
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "flm_rt":
        return _load_flm_rt(path, n_heads)
    if fmt == "hub":
        return _load_hub(path, n_heads)
    return _load_lightning(path, n_heads, use_ema)


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_flm_rt(dst: str, config: ModelConfig, state_dict: dict[str, torch.Tensor], *,
                 dtype: Optional[torch.dtype] = None, source: Optional[str] = None, weights: str = "ema",
                 source_config: Optional[dict] = None) -> str:
    """Write the hub layout (``model.safetensors`` + ``config.json``) that the authors' ``from_pretrained`` reads,
    flm_rt's metadata under ``config.json["flm_rt"]``. Atomic: a temporary sibling directory is filled, given
    normal permissions (0644 files, 0755 directory, less what the umask removes) and renamed into place."""
    from safetensors.torch import save_file

    from . import __version__

    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{dst}: parent directory {parent} does not exist")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise CheckpointError(f"{dst}: already exists; choose a new path or remove it first")
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
    mask = _umask()
    tmp = tempfile.mkdtemp(prefix=".flm_rt-convert-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, HUB_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(hub_config, f, indent=1, default=str)
        for name in (WEIGHTS_FILE, HUB_CONFIG_FILE):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def param_count(config: ModelConfig) -> int:
    return sum(math.prod(s) for k, s in expected_shapes(config).items() if k not in BUFFER_KEYS)
