"""Reading and writing state dicts as files: safetensors, or torch files loaded with
``weights_only=True`` (no pickled code runs). Writes are atomic (temp + rename)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def save_state_dict(state: dict[str, torch.Tensor], out: str | Path) -> Path:
    """Write a state dict atomically: ``.pt``/``.pth`` via torch.save, else safetensors."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if out.suffix in (".pt", ".pth"):
        torch.save(state, tmp)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only``: no pickle code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix in (".pt", ".pth", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return state
    from safetensors.torch import load_file

    return load_file(str(path))
