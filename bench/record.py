"""Provenance for every committed result (helper module, not a script): what ran, where, with
which versions, and with how many torch threads on a CPU."""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def device_name(device=None) -> str:
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device=None) -> dict:
    return {
        "command": " ".join(["python"] + sys.argv),
        "device": device_name(device),
        "torch": torch.__version__, "diffusers": _version("diffusers"), "triton": _version("triton"),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def save_json(out_dir: str, name: str, record: dict, device=None) -> str:
    """Write {**provenance, **record} to out_dir/name.json; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".json")
    with open(path, "w") as f:
        json.dump({**provenance(device), **record}, f, indent=1, default=str)
    return path


def markdown_table(rows: list[dict], header: list[str] | None = None) -> list[str]:
    """The lines of a markdown table of `rows` (dicts), columns `header` (default: the first row's keys)."""
    header = list(rows[0]) if header is None else header
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows])
