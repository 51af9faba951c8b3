"""Several harvest processes filling one cache (`torchrun --nproc_per_node N -m sae harvest ...`).

Every rank reads the same deterministic token stream and, in each round of N chunks, runs the forward
passes of one of them (rank r: the round's r-th chunk) and writes its files. Rank 0 alone holds the
writer lock and commits, in chunk order and only over a prefix of chunks whose files every rank has
finished, so the cache is the one a single process writes, byte for byte, and a run killed at any
instant resumes from its committed count. The ranks exchange only small Python objects (which chunks
are written, their statistics, int8's dimension scale), over gloo, whatever device the models run on.
Tokenizing is repeated on every rank: the ranks' forward passes, not their tokenizers, are the cost.
"""

import os
from typing import Any

import torch.distributed as dist


class Ranks:
    """This process's rank and the world of harvest processes (1 without torchrun)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.group = None
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, on every rank (in rank order)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def from_rank0(self, obj: Any) -> Any:
        """Rank 0's obj on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
