"""Partners for shape / detail consistency: same identity, never oneself, deterministic."""
from __future__ import annotations

import torch

from recon.losses.consistency import identity_partners


def test_partners_share_identity_and_differ():
    identity = torch.tensor([3, 3, 3, 3, 7, 7, 1, 1, 1])
    partner, has = identity_partners(identity, torch.Generator().manual_seed(0))
    assert has.all()
    assert torch.equal(identity[partner], identity)
    assert (partner != torch.arange(9)).all()
    assert sorted(partner.tolist()) == list(range(9))  # a permutation: every code is reused once


def test_singletons_keep_their_own_code():
    identity = torch.tensor([0, 0, 5, 2, 2])
    partner, has = identity_partners(identity, torch.Generator().manual_seed(1))
    assert partner[2] == 2 and not has[2]
    assert has[[0, 1, 3, 4]].all()


def test_partners_deterministic_given_seed_and_varied_across_seeds():
    identity = torch.arange(4).repeat_interleave(4)
    a, _ = identity_partners(identity, torch.Generator().manual_seed(5))
    b, _ = identity_partners(identity, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    draws = {tuple(identity_partners(identity, torch.Generator().manual_seed(s))[0].tolist())
             for s in range(10)}
    assert len(draws) > 1
