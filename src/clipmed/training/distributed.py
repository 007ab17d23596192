"""Data-parallel training under torchrun (gloo on CPU, nccl on GPU) without the DDP wrapper.

Every rank builds the same global batch, encodes its contiguous shard, and all-gathers the embeddings with
gradients so the loss sees the global batch (CLIP's negatives). Every rank then holds the same loss; the
gather's backward sums the W identical gradient contributions, so averaging parameter gradients over ranks
gives exactly the single-process full-batch gradient.

With the local loss (`--local-loss`, caption objective) each rank computes only its own rows' terms; the
gather's backward then sums different contributions, whose average over ranks is again the full-batch
gradient, and the logit matrices shrink from [N x N] to [N/W x N].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard_sizes(self, n: int) -> list[int]:
        """Contiguous split of n rows over ranks, the first n % size ranks one row larger (torch.tensor_split)."""
        return [n // self.size + (rank < n % self.size) for rank in range(self.size)]

    def shard_rows(self, n: int) -> slice:
        """This rank's rows of n."""
        sizes = self.shard_sizes(n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def shard(self, items: Sequence[T]) -> list[T]:
        return list(items[self.shard_rows(len(items))])

    def gather(self, local: torch.Tensor, n_total: int) -> torch.Tensor:
        """The global [n_total, D] tensor from every rank's shard, differentiable with respect to the local one."""
        if not self.distributed:
            return local
        from torch.distributed.nn.functional import all_gather

        sizes = self.shard_sizes(n_total)
        padded = torch.zeros(max(sizes), *local.shape[1:], dtype=local.dtype, device=local.device)
        padded = torch.cat([local, padded[len(local):]]) if len(local) < max(sizes) else local
        parts = all_gather(padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of a detached tensor over ranks."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.size

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """All-reduce the gradients in one flat buffer (one collective per step) and divide by the world size."""
        if not self.distributed:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world(device: str) -> World:
    """The world torchrun describes in the environment (WORLD_SIZE, RANK; LOCAL_RANK picks each process's GPU
    on its node); one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # one GPU per process on each node ("cuda" = this one)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())
