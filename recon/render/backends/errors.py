"""The one error every face-id backend raises when it cannot run here; its own module so the
backends and the package that picks among them import it without importing each other."""
from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """The configured rasterizer backend is not installed or cannot run on this device."""
