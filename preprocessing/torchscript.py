"""Optional preprocessing networks (FAN landmarks, face parsing) as TorchScript archives
from a local path: their authors publish them in that format, and ``torch.jit.load`` only
rebuilds TorchScript code and tensors (it does not unpickle arbitrary Python classes)."""
from __future__ import annotations

import warnings
from typing import Literal

import torch

from recon.formats.weights_file import checked_weights_file


def network_device(requested: Literal["cpu", "cuda"]) -> torch.device:
    """The GPU when it is asked for and this process sees one (a Ray actor sees one only
    with ``ray.gpus_per_worker`` > 0), else the CPU."""
    if requested == "cuda" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def load_torchscript(path: str, field: str, device: torch.device) -> torch.jit.ScriptModule:
    """The TorchScript module in the local file ``path``, in eval mode on ``device``.
    ``field`` names the setting in errors (e.g. ``preprocess.landmarker_weights``)."""
    checked = checked_weights_file(path, None, field)
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript in favour of torch.export, but the published
            # FAN / face-parsing weights are TorchScript archives and still load.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated",
                                    category=FutureWarning)
            module = torch.jit.load(str(checked), map_location=device)
    except RuntimeError as err:
        raise ValueError(f"{field}: {checked} is not a TorchScript archive "
                         f"(torch.jit.load: {str(err).splitlines()[0]})") from err
    return module.eval()
