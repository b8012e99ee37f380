"""torch.distributed plumbing for fine-tuning: one process, or N under torchrun (gloo on CPU, NCCL on CUDA).

This is the only place gemmakit imports torch.distributed. With a world size of 1 every helper is a no-op, so
the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GemmaError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str = "auto") -> World:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise GemmaError("device='cuda' was asked for but PyTorch sees no CUDA GPU")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return World(rank, size, local, dev)


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sum of a few numbers over all ranks (float64, so token counts stay exact)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank if it is true on any (used so all ranks stop at the same step on Ctrl-C)."""
    return all_sum(world, [float(flag)])[0] > 0 if world.distributed else flag


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def gather_objects(world: World, obj: object) -> list[object]:
    if not world.distributed:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def average_grads(world: World, params: list[nn.Parameter]) -> None:
    """Mean of each gradient over ranks, flattened into one all-reduce (the FSDP path's replicated adapters)."""
    if not world.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    i = 0
    for g in grads:
        g.copy_(flat[i : i + g.numel()].view_as(g))
        i += g.numel()


def wrap_ddp(world: World, module: nn.Module) -> nn.Module:
    """DistributedDataParallel over the trainable (LoRA) parameters; rank 0's weights are broadcast at start."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def shard_frozen(
    world: World, root: nn.Module, blocks: list[nn.Module], trainable: list[nn.Parameter]
) -> None:
    """FSDP2 (`fully_shard`) over every block and the root: each rank keeps 1/N of the frozen base weights and
    all-gathers a block's weights just for its forward. The adapters are left out (`ignored_params`): they stay
    whole on every rank, trained like DDP with `average_grads`, so checkpoints and the optimizer are unchanged."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(trainable)
    for block in blocks:
        fully_shard(block, ignored_params=ignored)
    fully_shard(root, ignored_params=ignored)
