"""Arguments that several ``flm-rt`` subcommands take, defined once: the model source, where and how it runs
(device, dtype, kernels), how it is read (heads, EMA, Hub options) and the seed. Each subcommand's parser is built
in the module that owns the command; they all take these from here, so the spellings, defaults and help agree."""
from __future__ import annotations

import argparse

MODEL_HELP = ("Hub name (e.g. david3684/FMLM-B-OWT, fmlm-owt), .ckpt file, hub or flm_rt directory "
              "(see `flm-rt models`)")


def add_model(p: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    p.add_argument("model", help=help)


def add_device(p: argparse.ArgumentParser, *, default=None, dtype_help: str = "float32 (default) | bfloat16 | "
               "float16 (mixed precision)") -> None:
    p.add_argument("--device", default=default,
                   help="cpu | cuda | cuda:N" + (" (default: cuda when available)" if default is None else
                                                 f" (default: {default})"))
    p.add_argument("--dtype", default=None, help=dtype_help)


def add_kernels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernels", choices=["auto", "torch", "ext"], default=None,
                   help="op backend (default: env FLM_RT_KERNELS, else auto: compiled kernels where built)")


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=int, default=default, help=f"random seed (default {default})")


def add_reading(p: argparse.ArgumentParser, *, hub: bool = True) -> None:
    """How a checkpoint is read: --n-heads, --no-ema and, for Hub names, --revision / --cache-dir / --offline."""
    p.add_argument("--n-heads", type=int, default=None, help="override the number of attention heads")
    p.add_argument("--no-ema", action="store_true", help="use the training weights instead of the EMA weights")
    if hub:
        add_hub(p)


def add_hub(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, help="Hub names: branch, tag or commit (default: the pinned commit "
                                                    "of a published model, else main)")
    p.add_argument("--cache-dir", default=None, help="Hub names: cache folder (default: HF_HUB_CACHE / HF_HOME)")
    p.add_argument("--offline", action="store_true", help="Hub names: use the cache only (as HF_HUB_OFFLINE=1)")


def hub_kwargs(args) -> dict:
    return {"revision": getattr(args, "revision", None), "cache_dir": getattr(args, "cache_dir", None),
            "local_files_only": getattr(args, "offline", False)}


def load_model(args, **overrides):
    """``flm_rt.load`` with the arguments added above (``overrides`` replace any of them)."""
    from .api import load

    kw = dict(device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
              n_heads=getattr(args, "n_heads", None), use_ema=not getattr(args, "no_ema", False), **hub_kwargs(args))
    kw.update(overrides)
    return load(args.model, **kw)
