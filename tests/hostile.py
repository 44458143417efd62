"""Helpers for the hostile-input tests: build .ckpt files by hand, and load untrusted files in a worker process
with a time and memory limit per case (a crash, hang or memory bomb fails the case, not the test run)."""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import select
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ writing .ckpt files
class Storage:
    """Pickles as a torch storage reference ('storage', FloatStorage, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int, kind=torch.FloatStorage):
        self.key, self.numel, self.kind = key, numel, kind


class FakeTensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...): geometry of our choosing."""

    def __init__(self, storage: Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, torch.Size(self.size), self.stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


def dumps(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_ckpt(path, pkl: bytes, storages: dict[str, bytes], *, compress: bool = False) -> Path:
    """A torch-style zip: archive/data.pkl + archive/data/<key> (stored, or deflated when compress)."""
    path = Path(path)
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=mode) as z:
        z.writestr("archive/data.pkl", pkl)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
    return path


def lightning_obj(sd: dict[str, torch.Tensor], *, cfg=None, ema: bool = True, key_prefix: str = "backbone."):
    """(object to pickle, storages): a Lightning-style checkpoint of ``sd`` with every tensor in its own storage."""
    storages: dict[str, bytes] = {}

    def fake(t: torch.Tensor) -> FakeTensor:
        key = str(len(storages))
        t = t.detach().float().contiguous()
        storages[key] = t.numpy().tobytes()
        stride = t.stride() if t.dim() else ()
        return FakeTensor(Storage(key, t.numel()), 0, tuple(t.shape), stride)

    state = collections.OrderedDict((key_prefix + k, fake(v)) for k, v in sd.items())
    obj = {"state_dict": state, "hyper_parameters": {"config": cfg if cfg is not None else
                                                     {"model": {"n_heads": 2, "length": 8}}}}
    if ema:
        obj["ema"] = {"decay": 0.999, "num_updates": 1,
                      "shadow_params": [fake(v) for k, v in sd.items() if k != "rotary_emb.inv_freq"]}
    return obj, storages


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    import flm_rt

    cfg = flm_rt.ModelConfig(vocab_size=64, length=8, hidden_size=16, n_blocks=1, n_heads=2, cond_dim=8,
                             two_time=True)
    return dict(flm_rt.random_model(cfg, seed=seed, device="cpu").denoiser.state_dict())


# ------------------------------------------------------------------------------------------ the worker
_CHILD = r"""
import json, os, resource, sys, traceback, warnings
warnings.simplefilter("ignore")
import flm_rt
from flm_rt.errors import FlmError

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

budget = int(sys.argv[1])
hard = status("VmData") + 4 * budget
resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    case = json.loads(line)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) so that it measures this case only
    except OSError:
        pass
    base = status("VmRSS")
    out = {"id": case["id"]}
    try:
        if case.get("op") == "convert":
            flm_rt.convert(case["path"], case["dst"], **case.get("kw", {}))
        else:
            flm_rt.load(case["path"], device="cpu", **case.get("kw", {}))
        out["outcome"] = "loaded"
    except FlmError as e:
        out.update(outcome="flm", type=type(e).__name__, msg=str(e)[:400])
    except BaseException as e:
        out.update(outcome="raw", type=type(e).__name__, msg=str(e)[:400], tb=traceback.format_exc()[-3000:])
    out["peak_bytes"] = max(0, status("VmHWM") - base)
    print(json.dumps(out), flush=True)
"""


@dataclass
class Result:
    id: str
    outcome: str            # loaded | flm | raw | crash | hang
    type: str = ""
    msg: str = ""
    peak_bytes: int = 0
    tb: str = ""

    def ok(self, budget: int) -> bool:
        return self.outcome in ("loaded", "flm") and self.peak_bytes <= budget


class Worker:
    """One long-lived loader process (importing torch once); restarted after a crash or a hang."""

    def __init__(self, budget_bytes: int = 512 << 20, env: Optional[dict] = None, root: Path = REPO):
        self.budget, self.root = budget_bytes, Path(root)  # root: the checkout whose flm_rt is imported
        self.env = {**os.environ, "PYTHONPATH": str(self.root), **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self._n = 0

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(self.budget)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, text=True,
                                     bufsize=1, cwd=str(self.root))
        line = self._readline(180.0)
        if line is None or "ready" not in line:
            self.close()
            raise RuntimeError("the loader worker did not start")

    def _readline(self, timeout: float) -> Optional[str]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                return line or None  # '' at EOF: the process died

    def run(self, path, *, timeout: float = 20.0, **case) -> Result:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self._n += 1
        cid = str(self._n)
        try:
            self.proc.stdin.write(json.dumps({"id": cid, "path": str(path), **case}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(timeout)
        if line is None:
            rc = self.proc.poll()
            self.close()
            if rc is None:
                return Result(cid, "hang", msg=f"no answer within {timeout} s")
            return Result(cid, "crash", msg=f"worker exited with {rc}")
        d = json.loads(line)
        return Result(cid, d["outcome"], d.get("type", ""), d.get("msg", ""), d.get("peak_bytes", 0), d.get("tb", ""))

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None


def to_legacy_layout(path) -> Path:
    """Turn a folder written by flm_rt (the hub layout, metadata under config.json["flm_rt"]) into the older
    flm_rt.json layout (format_version 1) that flm_rt still reads, so that its JSON can be attacked too."""
    import json

    path = Path(path)
    meta = json.loads((path / "config.json").read_text())["flm_rt"]
    legacy = {"format": "flm_rt", "format_version": 1, "flm_rt_version": meta.get("flm_rt_version"),
              "config": meta["config"], "weights": meta.get("weights", "ema"), "source": meta.get("source"),
              "dtype": meta.get("dtype", "float32")}
    (path / "flm_rt.json").write_text(json.dumps(legacy))
    (path / "config.json").unlink()
    return path
