"""Training data: identity-grouped batches (N identities x K images) with DECA's crop-scale
augmentation, collated into the training steps' batch dict.

Pure PyTorch + numpy. Samples come as decoded dicts (``preprocessing.shards``' format):
``image`` (H, W, 3) uint8 (a 256x256 crop at 1.8 x the landmark box), ``landmarks`` (68, 2)
in the crop's [-1, 1] image convention (x right, y down, -1/+1 = outer image edges), ``mask``
(H, W) uint8 and ``meta``. Any framing works: crops are recomputed from the landmark box.
:meth:`SampleStore.from_samples` takes any iterable of sample dicts: the caller reads them
(``preprocessing.shards.iter_samples`` for tar shards, ``recon.synth.iter_samples`` for a
synthetic set), so this module never touches files (:mod:`recon.training.sample_cache` keeps
them on local disk instead of in memory).

Determinism: the batches of an epoch depend only on ``(seed, epoch)``, and the augmentation of
batch ``i`` only on ``(seed, i)``, never on the number of loader workers or ranks, so a resumed
run sees the same data as an uninterrupted one.

Batch dict (what :class:`recon.training.steps.CoarseStep` / ``DetailStep`` take):
``images (B, 3, S, S)`` float in [0, 1]; ``landmarks (B, 68, 2)`` image convention in [-1, 1];
``masks (B, 1, S, S)`` float {0, 1}; ``identity (B,)`` long (index into the sorted identity
names of the split), images of one identity consecutive (K of them).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recon.config import SourceSampling
from recon.landmarks import landmark_square

log = logging.getLogger("wildface.train")

# DECA's training crops: side = U[1.4, 1.8] x max(landmark bbox w, h); test: a fixed scale.
DECA_SCALE_RANGE = (1.4, 1.8)


# -- crops ---------------------------------------------------------------------------------
def crop_windows(
    landmarks: torch.Tensor,
    scale: torch.Tensor | float,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crop windows around the landmark boxes.

    landmarks: (B, 68, 2); scale: (B,) or a float, crop side / box size; shift: (B, 2) offset of
    the crop centre in units of the box size, or None. Returns centre (B, 2) and half side
    (B,), in the landmarks' units.
    """
    centre, size = landmark_square(landmarks)
    scale = torch.as_tensor(scale, dtype=landmarks.dtype).expand(landmarks.shape[0])
    if shift is not None:
        centre = centre + shift * size[:, None]
    return centre, scale * size / 2


def warp_crops(
    images: torch.Tensor,
    masks: torch.Tensor,
    landmarks: torch.Tensor,
    centre: torch.Tensor,
    half: torch.Tensor,
    out_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample the windows ``centre +- half`` (image convention, [-1, 1]) to ``out_size``.

    images: (B, 3, H, W); masks: (B, 1, H, W); landmarks: (B, 68, 2); centre (B, 2); half (B,).
    A point ``x`` of the source maps to ``(x - centre) / half`` in the crop, which is exactly
    how the pixel grid is sampled (``grid_sample``, ``align_corners=False``: -1/+1 are the
    outer pixel edges in both). Outside the source: zeros. Masks are re-binarised at 0.5.
    Returns images (B, 3, S, S), masks (B, 1, S, S), landmarks (B, 68, 2).
    """
    B = images.shape[0]
    dtype = images.dtype
    u = (torch.arange(out_size, dtype=dtype) * 2 + 1) / out_size - 1  # pixel centres
    gy, gx = torch.meshgrid(u, u, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]  # (1, S, S, 2): x right, y down
    grid = centre[:, None, None, :].to(dtype) + half[:, None, None, None].to(dtype) * grid
    out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=False)
    out_masks = F.grid_sample(masks.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)
    out_lmk = (landmarks - centre[:, None, :]) / half[:, None, None]
    return out_images.clamp(0, 1), (out_masks > 0.5).to(dtype), out_lmk.reshape(B, -1, 2)


@dataclass(frozen=True)
class CropAugment:
    """DECA's crop augmentation. Training: side = U[scale_min, scale_max] x landmark-box size,
    centre shifted by U[-shift, shift] x box size per axis; evaluation: ``eval_scale``, no shift.
    """

    out_size: int = 224
    scale_min: float = DECA_SCALE_RANGE[0]
    scale_max: float = DECA_SCALE_RANGE[1]
    shift: float = 0.05
    eval_scale: float = 1.6

    def __call__(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        landmarks: torch.Tensor,
        train: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W), masks (B, 1, H, W), landmarks (B, 68, 2) -> cropped to
        ``out_size`` (see :func:`warp_crops`)."""
        B = images.shape[0]
        if train:
            u = torch.rand(B, 3, generator=generator, dtype=torch.float64).to(landmarks.dtype)
            scale = self.scale_min + (self.scale_max - self.scale_min) * u[:, 0]
            shift = self.shift * (2 * u[:, 1:] - 1)
        else:
            scale, shift = torch.full((B,), self.eval_scale, dtype=landmarks.dtype), None
        centre, half = crop_windows(landmarks, scale, shift)
        return warp_crops(images, masks, landmarks, centre, half, self.out_size)


# -- identity-grouped batches -----------------------------------------------------------------
def identity_source(name: str) -> str:
    """The source of an identity: the prefix of a namespaced name (``vggface2/n000002`` ->
    ``vggface2``), '' for a bare name (a single folder, a synthetic set)."""
    head, sep, _ = name.partition("/")
    return head if sep else ""


def capped_keys(keys: Sequence[str], cap: int | None, seed: int) -> list[str]:
    """At most ``cap`` of ``keys``: the first in an order seeded by ``seed`` alone, so the
    images kept never depend on the step, the rank or the order the keys came in."""
    keys = sorted(keys)
    if cap is None or len(keys) <= cap:
        return keys
    order = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    return sorted(order[:cap])


class IdentityBatchSampler:
    """Batches of ``n_identities`` identities x ``k_images`` images (keys).

    With K > 1 only identities with at least K images are drawn (the shape-consistency loss
    swaps codes between *different* images of a person), so single-image identities (an AFLW
    face) enter only K = 1 stages. ``sources`` (:class:`recon.config.SourceSampling` by source
    name, ``default_source`` for the rest) caps each identity's images and, when not empty,
    weighs the sources.

    Without ``sources``, every epoch shuffles the eligible identities (seeded by
    ``(seed, epoch)``) and cuts them into groups of N (the last incomplete group dropped).
    With ``sources``, the N identities of global batch ``g`` are drawn from ``(seed, g)``
    alone: slot by slot a source with probability proportional to its weight (among the
    sources with identities left in the batch), then one of its identities not yet in the
    batch; an epoch is then just a count of batches. Either way each identity contributes K
    of its images drawn without replacement, and rank ``r`` of ``world_size`` takes batches
    ``r, r + world_size, ...``, so batches depend on the seed and the step only.
    """

    def __init__(
        self,
        identities: Mapping[str, Sequence[str]],
        n_identities: int,
        k_images: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        sources: Mapping[str, SourceSampling] | None = None,
        default_source: SourceSampling | None = None,
    ) -> None:
        if n_identities < 1 or k_images < 1:
            raise ValueError("n_identities and k_images must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.sources = dict(sources or {})
        default = default_source or SourceSampling()
        self.identities: dict[str, list[str]] = {}
        for name, keys in sorted(identities.items()):
            rule = self.sources.get(identity_source(name), default)
            kept = capped_keys(keys, rule.max_images_per_identity, seed)
            if len(kept) >= k_images and (rule.weight > 0 or not self.sources):
                self.identities[name] = kept
        self.names = list(self.identities)
        if len(self.names) < n_identities * world_size:
            raise ValueError(
                f"{len(self.names)} identities with at least {k_images} images (and a "
                f"weight above 0); a batch needs {n_identities} per rank x {world_size} ranks"
            )
        self.n, self.k, self.seed = n_identities, k_images, seed
        self.rank, self.world_size = rank, world_size
        by_source: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            by_source.setdefault(identity_source(name), []).append(i)
        self._by_source = {s: np.array(ix) for s, ix in sorted(by_source.items())}
        self._weights = np.array([self.sources.get(s, default).weight for s in self._by_source])
        missing = sorted(set(self.sources) - set(self._by_source))
        if self.sources and missing:
            log.warning("no identity with %d+ images from source(s) %s: their weight is "
                        "shared among the others", k_images, ", ".join(missing))

    @property
    def batches_per_epoch(self) -> int:
        """Batches of one epoch on this rank (with ``sources``: as many as would show each
        identity once)."""
        return (len(self.names) // self.n) // self.world_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _keys(self, rng: np.random.Generator, chosen: Iterable[int]) -> list[str]:
        keys: list[str] = []
        for i in chosen:
            pool = self.identities[self.names[i]]
            keys += [pool[j] for j in rng.choice(len(pool), self.k, replace=False)]
        return keys

    def weighted_batch(self, g: int) -> list[str]:
        """Global batch ``g`` (all ranks counted) of the source-weighted draw: N x K keys."""
        rng = np.random.default_rng([self.seed, 1, g])
        pools = list(self._by_source.values())
        taken: list[set[int]] = [set() for _ in pools]  # positions drawn from each pool
        chosen: list[int] = []
        for _ in range(self.n):
            w = np.where([len(t) < len(ix) for t, ix in zip(taken, pools)], self._weights, 0.0)
            s = rng.choice(len(w), p=w / w.sum())
            # One of the source's identities not yet in the batch: N is small, so redrawing a
            # repeat costs less than copying a pool of thousands at every batch.
            j = int(rng.integers(len(pools[s])))
            while j in taken[s]:
                j = int(rng.integers(len(pools[s])))
            taken[s].add(j)
            chosen.append(int(pools[s][j]))
        return self._keys(rng, chosen)

    def epoch(self, epoch: int) -> list[list[str]]:
        """This rank's batches of ``epoch``: lists of N x K keys, identity by identity."""
        usable = self.batches_per_epoch * self.world_size
        if self.sources:
            first = epoch * usable
            return [self.weighted_batch(first + g) for g in range(self.rank, usable,
                                                                  self.world_size)]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.names))
        batches = [self._keys(rng, order[b * self.n:(b + 1) * self.n])
                   for b in range(len(self.names) // self.n)]
        return batches[self.rank:usable:self.world_size]

    def iter_from(self, step: int = 0) -> Iterator[tuple[int, list[str]]]:
        """Endless ``(step, keys)`` from global step ``step`` on (epochs follow each other)."""
        per_epoch = self.batches_per_epoch
        epoch, index = divmod(step, per_epoch)
        while True:
            if self.sources:  # each batch stands alone: nothing of the epoch to build first
                for i in range(index, per_epoch):
                    g = (epoch * per_epoch + i) * self.world_size + self.rank
                    yield epoch * per_epoch + i, self.weighted_batch(g)
            else:
                batches = self.epoch(epoch)
                for i in range(index, per_epoch):
                    yield epoch * per_epoch + i, batches[i]
            epoch, index = epoch + 1, 0


# -- samples ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One decoded sample: image (H, W, 3) uint8, mask (H, W) uint8 (> 127 = skin) or None,
    landmarks (68, 2) float32 in the image convention."""

    key: str
    identity: str | None
    image: np.ndarray
    mask: np.ndarray | None
    landmarks: np.ndarray


def record_from_sample(sample: Mapping) -> Record:
    """A decoded sample dict (``preprocessing.shards`` format: ``key``, ``image``,
    ``landmarks``, ``mask``, ``meta``) -> :class:`Record`. The identity comes from
    ``meta["identity"]`` when present (else from the store's identity lists)."""
    key = str(sample["key"])
    image = np.array(sample["image"], dtype=np.uint8)  # own, writable copy
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {key}: image must be (H, W, 3), got {image.shape}")
    lmk = np.asarray(sample["landmarks"], dtype=np.float32)
    if lmk.shape != (68, 2):
        raise ValueError(f"sample {key}: landmarks must be (68, 2), got {lmk.shape}")
    mask = sample.get("mask")
    if mask is not None:
        mask = np.array(mask, dtype=np.uint8)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"sample {key}: mask {mask.shape} != image {image.shape[:2]}")
    identity = (sample.get("meta") or {}).get("identity")
    return Record(key=key, identity=None if identity is None else str(identity),
                  image=image, mask=mask, landmarks=lmk)


def decode_record(record: Record) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> image (3, H, W) float [0, 1], mask (1, H, W) float {0, 1} (all ones when the
    sample has none), landmarks (68, 2) float."""
    image = torch.from_numpy(record.image).permute(2, 0, 1).float() / 255.0
    if record.mask is None:
        mask = torch.ones(1, *image.shape[1:])
    else:
        mask = (torch.from_numpy(record.mask) > 127).float()[None]
    return image, mask, torch.from_numpy(record.landmarks.copy())


def group_by_identity(key_identity: Mapping[str, str | None]) -> dict[str, list[str]]:
    """``{key: identity}`` -> identity lists ``{identity: sorted keys}``. ValueError for a
    key without an identity."""
    grouped: dict[str, list[str]] = {}
    for key, identity in key_identity.items():
        if identity is None:
            raise ValueError(f"sample {key} has no identity and no identity lists given")
        grouped.setdefault(identity, []).append(key)
    return {name: sorted(keys) for name, keys in grouped.items()}


class SampleStore:
    """Decoded samples of one split, by key, with the split's identity lists.

    ``records`` is any mapping key -> :class:`Record`: a dict in memory
    (:meth:`from_samples`, ~260 kB per 256x256 sample, fine for tens of thousands of images)
    or a memory-mapped cache folder on disk (:func:`recon.training.sample_cache.cached_store`,
    for sets larger than memory). Keys of ``identities`` missing from the records are
    dropped, and identities left without images.
    """

    def __init__(self, records: Mapping[str, Record],
                 identities: Mapping[str, Sequence[str]]) -> None:
        self.records = records
        kept = {name: [k for k in keys if k in records]
                for name, keys in sorted(identities.items())}
        self.identities = {name: keys for name, keys in kept.items() if keys}
        self.identity_index = {name: i for i, name in enumerate(self.identities)}
        self.key_identity = {k: name for name, keys in self.identities.items() for k in keys}

    def __len__(self) -> int:
        return len(self.records)

    @classmethod
    def from_samples(cls, samples: Iterable[Mapping],
                     identities: Mapping[str, Sequence[str]] | None = None) -> "SampleStore":
        """In memory. Identity lists from ``identities`` when given (a split of the
        preprocessing's ``identities.json``), else from each sample's ``meta["identity"]``."""
        records = {r.key: r for r in map(record_from_sample, samples)}
        if identities is None:
            identities = group_by_identity({k: r.identity for k, r in records.items()})
        return cls(records, identities)

    def batch(self, keys: Sequence[str], augment: CropAugment, train: bool,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Decode, crop and collate ``keys`` into the steps' batch dict (see module doc)."""
        decoded = [decode_record(self.records[k]) for k in keys]
        sizes = {tuple(img.shape[1:]) for img, _, _ in decoded}
        if len(sizes) != 1:
            raise ValueError(f"samples of one batch differ in size: {sorted(sizes)}")
        images = torch.stack([d[0] for d in decoded])
        masks = torch.stack([d[1] for d in decoded])
        landmarks = torch.stack([d[2] for d in decoded])
        images, masks, landmarks = augment(images, masks, landmarks, train, generator)
        identity = torch.tensor([self.identity_index[self.key_identity[k]] for k in keys],
                                dtype=torch.long)
        return {"images": images, "landmarks": landmarks, "masks": masks, "identity": identity}


# -- loader -----------------------------------------------------------------------------------
def batch_generator(seed: int, step: int) -> torch.Generator:
    """The augmentation generator of global step ``step``: depends on nothing else."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


class IdentityBatchDataset(IterableDataset):
    """Endless training batches (already collated; use ``DataLoader(batch_size=None)``) from
    global step ``start_step`` on. Loader worker ``w`` of ``W`` builds steps ``w, w + W, ...``;
    the DataLoader takes them round-robin, so the order is that of one process.
    Each item is ``(step, batch dict)``."""

    def __init__(self, store: SampleStore, sampler: IdentityBatchSampler,
                 augment: CropAugment, start_step: int = 0, train: bool = True) -> None:
        super().__init__()
        self.store, self.sampler, self.augment = store, sampler, augment
        self.start_step, self.train = start_step, train

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i, (step, keys) in enumerate(self.sampler.iter_from(self.start_step)):
            if i % nw != wid:
                continue
            gen = batch_generator(self.sampler.seed, step)
            yield step, self.store.batch(keys, self.augment, self.train, gen)


def _worker_init(_: int) -> None:
    # Intra-op threads in every loader process oversubscribe the cores (7x slowdown seen).
    torch.set_num_threads(1)


def make_train_loader(store: SampleStore, sampler: IdentityBatchSampler, augment: CropAugment,
                      start_step: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader of ``(step, batch)`` from ``start_step`` on (endless)."""
    dataset = IdentityBatchDataset(store, sampler, augment, start_step, train=True)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      worker_init_fn=_worker_init if num_workers else None,
                      persistent_workers=False)


def iter_eval_batches(store: SampleStore, augment: CropAugment, batch_size: int = 16
                      ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
    """Every sample once, in key order, cropped at the fixed evaluation scale:
    ``(keys, batch dict)``."""
    keys = sorted(store.records)
    for i in range(0, len(keys), batch_size):
        chunk = keys[i:i + batch_size]
        yield chunk, store.batch(chunk, augment, train=False)


__all__ = [
    "CropAugment", "DECA_SCALE_RANGE", "IdentityBatchDataset", "IdentityBatchSampler",
    "Record", "SampleStore", "batch_generator", "capped_keys", "crop_windows", "decode_record",
    "group_by_identity", "identity_source", "iter_eval_batches",
    "make_train_loader",
    "record_from_sample", "warp_crops",
]
