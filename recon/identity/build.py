"""The identity-network factory: ``build_identity_network(cfg, device)`` builds the configured
backend (:mod:`recon.identity.facenet`, ``vggface2``, ``arcface``, each an
:class:`recon.identity.network.IdentityNetwork`) from the local file ``cfg.weights``, or returns
None when ``cfg.backend == "none"``. A config that leaves ``weights`` to the model store is
resolved by the caller first (``infra.model_store.resolve_identity_weights``; the CLI and flows
do it), so this package never reads the store.

Apart from the interface, so the backends that derive it never import the module that imports
them.
"""
from __future__ import annotations

import logging

import torch

from recon.config import IdentityConfig
from recon.identity.network import IdentityNetwork
from recon.formats.weights_file import checked_weights_file

log = logging.getLogger(__name__)


def build_identity_network(cfg: IdentityConfig, device: torch.device | str = "cpu"
                           ) -> IdentityNetwork | None:
    """The configured, frozen identity network on ``device``; None if the backend is 'none'.

    Weights come from the local file ``cfg.weights`` (checked against ``weights_sha256``
    when given), never a download."""
    if cfg.backend == "none":
        return None
    if cfg.weights is None:
        raise ValueError(
            f"identity.weights is not set: give the {cfg.backend} weights file, or resolve "
            "the backend's model-store entry first (the wildface CLI and flows do; see "
            "docs/weights.md)")
    path = checked_weights_file(cfg.weights, cfg.weights_sha256, "identity.weights")
    options = {} if cfg.crop_fraction is None else {"crop_fraction": cfg.crop_fraction}
    net: IdentityNetwork
    if cfg.backend == "facenet":
        from recon.identity.facenet import FaceNetIdentity

        net = FaceNetIdentity.from_file(path, **options)
    elif cfg.backend == "vggface2":
        from recon.identity.vggface2 import VGGFace2Identity

        net = VGGFace2Identity.from_file(path, **options)
    else:
        from recon.identity.arcface import ArcFaceIdentity

        net = ArcFaceIdentity.from_file(path, **options)
    log.info("identity network: %s (%d-d) from %s", cfg.backend, net.embedding_dim, path)
    return net.freeze().to(device)
