"""Face-recognition networks for DECA's identity loss, loaded from local files only.

``build_identity_network(cfg, device)`` (in :mod:`recon.identity.build`) returns a frozen
module mapping (B, 3, H, W) RGB images in [0, 1] to (B, D) L2-normalised embeddings.
"""
