"""One loader per model-parallel group: the group's loading rank reads and decodes, its peers receive.

Why: the tensor / context / pipeline peers of a data-parallel slot train on the same batches. If each of them
ran its own loader, every shard would be read, every image resized and every video decoded tp x cp x pp
times over (16x for TP2 x PP8). Here only the group's first rank builds a `StreamingLoader`; each batch it
yields is broadcast to the group together with the loader's state and counters after that batch, so every
peer holds an identical copy of the resumable state: checkpoints (a loader state per rank) and the global
bad-data counts read the same as when every rank loaded, and exact resume is unchanged (the loading rank
restores the state; peers only keep it to save it again).

The groups: `rank_groups(key)` splits the world into groups of ranks sharing a key (every rank creates all
of them, as torch.distributed requires); backends call it with the data-parallel rank for the
model-parallel group, and with the model-parallel coordinate for the data-parallel group.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from data.batch import PackedBatch
from train.device import comm_tensor, comm_zeros


def rank_groups(key: int) -> tuple[dist.ProcessGroup | None, list[int]]:
    """(this rank's group, its global ranks in order) among the groups of ranks with equal `key`; the group
    is None when the rank is alone. Collective over the default group (all ranks, same call order)."""
    world = dist.get_world_size()
    keys = [comm_zeros((), dtype=torch.int64) for _ in range(world)]
    dist.all_gather(keys, comm_tensor(key, dtype=torch.int64))
    by_key: dict[int, list[int]] = {}
    for rank, k in enumerate(int(k) for k in keys):
        by_key.setdefault(k, []).append(rank)
    mine: dist.ProcessGroup | None = None
    for k in sorted(by_key):
        ranks = by_key[k]
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if k == key:
            mine = group
    return mine, by_key[key]


def slot_groups(dp_rank: int) -> tuple[dist.ProcessGroup | None, list[int], dist.ProcessGroup | None]:
    """(model-parallel group, its global ranks, data-parallel group) of this rank, from its DP rank alone:
    the model-parallel group is the ranks of its DP slot; the data-parallel group the ranks at the same
    position in their slots. Collective over the default group."""
    mp_group, mp_ranks = rank_groups(dp_rank)
    dp_group, _ = rank_groups(mp_ranks.index(dist.get_rank()))
    return mp_group, mp_ranks, dp_group


class GroupLoader:
    """The loader interface the trainer uses (iteration, state_dict, load_state_dict, stats), shared by a
    model-parallel group. `loader` is the real loader on the loading rank (the group's first), None on peers.
    Iteration is collective: every rank of the group iterates in step."""

    def __init__(self, loader: Any | None, group: dist.ProcessGroup, group_ranks: list[int]) -> None:
        self.group, self.src = group, group_ranks[0]
        self.is_loading = dist.get_rank() == self.src
        if self.is_loading != (loader is not None):
            raise ValueError("exactly the group's first rank holds the loader")
        self.loader = loader
        # Peers start from the loading rank's state and counters (collective, at build time), so a
        # checkpoint or a bad-data count before the first batch reads the same on every rank.
        box = [(loader.state_dict(), loader.stats()) if loader is not None else None]
        dist.broadcast_object_list(box, src=self.src, group=group)
        self._state, self._stats = box[0]
        self._batches = 0

    @property
    def batches_yielded(self) -> int:
        return self.loader.batches_yielded if self.loader is not None else self._batches

    def __iter__(self) -> Iterator[PackedBatch]:
        source = iter(self.loader) if self.loader is not None else None
        while True:
            box: list[Any] = [None]
            if source is not None:
                batch = next(source, None)
                box = [None if batch is None else (batch, self.loader.state_dict(), self.loader.stats())]
            dist.broadcast_object_list(box, src=self.src, group=self.group)
            if box[0] is None:  # the loading rank's loader ran out: every peer stops with it
                return
            batch, self._state, self._stats = box[0]
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict() if self.loader is not None else self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The loading rank restores (and checks the mix); a peer keeps it until the next batch replaces it."""
        if self.loader is not None:
            self.loader.load_state_dict(state)
        self._state = state

    def stats(self) -> dict[str, dict[str, int]]:
        return self.loader.stats() if self.loader is not None else self._stats
