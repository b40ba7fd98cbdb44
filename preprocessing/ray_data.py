"""The one way a job runs per-item work on a Ray Data actor pool (the preprocessing's images,
``wildface reconstruct --ray``'s inputs): each actor builds its models once, then maps batches.
Ray is imported here only when called, on a Ray the caller has started or attached to
(:func:`infra.ray_connect.start_or_attach`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa


def map_actor_pool(items: Sequence[dict] | pa.Table, cls: type, args: tuple, *, workers: int,
                   cpus: float, gpus: float, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``cls(*args)(batch)`` for batches of ``items`` as the actors finish them.

    items: dicts of one row each, or a table's rows (handed over column-wise); cls: a
    callable class mapping a numpy batch (column -> (n,) array, n <= batch_size) to its
    result columns; workers: the pool's size, at most
    one actor per block (an actor with no block would only load models); cpus, gpus: each
    actor's share (0 GPUs: none asked for).
    """
    import ray
    from ray.data import ActorPoolStrategy

    blocks = max(1, len(items) // batch_size)
    if isinstance(items, pa.Table):
        # Cut into blocks here: a repartition is a Ray task of one CPU, which never runs on
        # nodes whose CPUs the actors already hold (one CPU, an actor of 0.75).
        rows = max(1, -(-items.num_rows // blocks))
        ds = ray.data.from_arrow([items.slice(i, rows) for i in range(0, items.num_rows, rows)]
                                 or [items])
    else:
        ds = ray.data.from_items(list(items), override_num_blocks=blocks)
    ds = ds.map_batches(cls, fn_constructor_args=args, batch_size=batch_size,
                        batch_format="numpy", compute=ActorPoolStrategy(size=min(workers, blocks)),
                        num_cpus=cpus, num_gpus=gpus or None)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
