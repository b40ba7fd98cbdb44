"""The annotated-input format: files beside a photo that stand in for the detectors.

``<name>.pts``: its 68 iBUG landmarks (:mod:`recon.formats.landmarks_io`); ``<name>.mask.png``: an
8-bit skin mask of the photo's size (> 127 = skin). ``wildface synth`` writes them; the
preprocessing and reconstruct jobs read them (``preprocessing.annotations``).
"""
from __future__ import annotations

PTS_SUFFIX = ".pts"
MASK_SUFFIX = ".mask.png"

__all__ = ["MASK_SUFFIX", "PTS_SUFFIX"]
