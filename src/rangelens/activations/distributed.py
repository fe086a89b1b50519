"""Data-parallel capture on `torch.distributed`, launched with ``torchrun``.

Why torch.distributed: it ships with torch (no new dependency), ``torchrun`` is the standard launcher on
multi-GPU nodes and clusters (SLURM, Kubernetes), and the gloo backend runs the same code on CPUs. Each
rank captures a strided shard of the texts and accumulates the mergeable
:class:`~rangelens.ranges.stats.ConceptStats`; the partial statistics and pooled features are gathered and
merged in rank order, which equals a single-process run up to floating-point rounding.

    torchrun --nproc_per_node 8 -m rangelens.cli analyze --device cuda ...
"""

from __future__ import annotations

import os
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist


class Mergeable(Protocol):
    """Streaming statistics that serialise and merge (e.g. ``ConceptStats``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def empty(self: M) -> M: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def merge(self: M, other: M) -> M: ...


M = TypeVar("M", bound=Mergeable)


def world() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun with >1 workers."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """True on the process that writes outputs (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def local_device(device: str) -> str:
    """Map a bare ``cuda`` to this worker's GPU (``LOCAL_RANK``) under torchrun."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def shard(n: int) -> np.ndarray:
    """This rank's strided share of ``n`` items (all of them in a single process)."""
    rank, size = world()
    return np.arange(n)[rank::size]


def gather(
    stats: M, features: np.ndarray | None, n_tokens: int
) -> tuple[M, np.ndarray | None, int]:
    """Merge every rank's statistics, feature rows (disjoint shards, zeros elsewhere) and token count."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats, features, n_tokens
    parts: list[tuple[dict[str, np.ndarray], np.ndarray | None, int] | None]
    parts = [None] * dist.get_world_size()
    mine = shard(len(features)) if features is not None else None
    rows = features[mine] if features is not None and mine is not None else None
    dist.all_gather_object(parts, (stats.state_dict(), rows, n_tokens))
    merged = stats.empty()
    total = 0
    for rank, part in enumerate(parts):
        assert part is not None
        state, part_rows, count = part
        other = stats.empty()
        other.load_state_dict(state)
        merged = merged.merge(other)
        total += count
        if features is not None and part_rows is not None:
            features[np.arange(len(features))[rank :: dist.get_world_size()]] = part_rows
    return merged, features, total
