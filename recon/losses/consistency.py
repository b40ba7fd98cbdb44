"""Shape and detail consistency (DECA): swap a code among images of the same identity.

The batch holds N identities x K images with labels ``identity (B,)``. Each image gets a partner:
another image of the same person, chosen at random. The coarse stage re-renders every image
with its partner's shape code, the detail stage with its partner's detail code, and applies the
same image losses: a code that truly describes the person explains every photo of them.
"""
from __future__ import annotations

import torch


def identity_partners(
    identity: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """identity: (B,) long labels -> (partner (B,) long, has_partner (B,) bool).

    ``partner[i]`` is a different image with the same label (one random cycle through each
    identity's images, so nobody keeps its own code); images alone in their identity are their
    own partner and get ``has_partner = False``. Deterministic given ``generator`` (CPU).
    Results are on ``identity``'s device.
    """
    if identity.dim() != 1:
        raise ValueError(f"identity must be (B,), got {tuple(identity.shape)}")
    labels = identity.detach().cpu()
    partner = torch.arange(labels.numel())
    for value in torch.unique(labels):  # sorted: the draw order is deterministic
        members = torch.nonzero(labels == value).flatten()
        if members.numel() < 2:
            continue
        order = members[torch.randperm(members.numel(), generator=generator)]
        partner[order] = order.roll(-1)
    has_partner = partner != torch.arange(labels.numel())
    return partner.to(identity.device), has_partner.to(identity.device)
