"""Synthetic people with ground truth, rendered from the face model (``wildface synth``)."""
from recon.synth.generate import SynthGenerator, generate
from recon.synth.samples import iter_samples, load_params

__all__ = ["SynthGenerator", "generate", "iter_samples", "load_params"]
