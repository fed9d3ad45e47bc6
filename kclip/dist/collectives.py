"""The few collectives kclip needs beyond torch.distributed's: a differentiable all_gather, gathers of row counts
that differ across ranks, and reductions and broadcasts that cost nothing on one process and take CPU tensors under
NCCL."""
from __future__ import annotations

import torch
import torch.distributed as dist

from kclip.dist.group import device, rank, world_size


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward routes each rank's slice of the summed gradient back to it.

    Every rank's loss depends on every rank's rows, so the gradient of row block r is the sum over ranks of
    d(loss_rank)/d(block r): an all-reduce of the incoming gradient followed by taking our own block. Combined with
    DeepSpeed's gradient averaging this gives exactly the gradient of the global mean loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks (equal shapes required), differentiably. Identity on one process."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def _padded_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """`x` on the communication device, zero-padded to the largest row count over ranks, and every rank's count."""
    x = x.to(device())
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    return padded, counts


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs across ranks (no gradient), in rank order. Works for CPU
    tensors under NCCL too (they travel through the communication device and come back)."""
    if world_size() == 1:
        return x
    home = x.device
    padded, counts = _padded_rows(x)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).to(home)


def gather_rows(x: torch.Tensor, dst: int = 0) -> tuple[torch.Tensor, int]:
    """Like `all_gather_rows`, but only rank `dst` receives the rows (others get an empty tensor): memory for one
    copy instead of one per rank. Also returns the total row count, known on every rank."""
    if world_size() == 1:
        return x, x.shape[0]
    home = x.device
    padded, counts = _padded_rows(x)
    parts = [torch.empty_like(padded) for _ in counts] if rank() == dst else None
    dist.gather(padded, parts, dst=dst)
    if rank() != dst:
        return x[:0], sum(counts)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).to(home), sum(counts)


def all_reduce_max(value: int) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _on_comm_device(collective, t: torch.Tensor) -> torch.Tensor:
    """Run an in-place collective on `t`; NCCL only takes CUDA tensors, so CPU tensors (embedding buffers,
    centroids, flags) take a round trip through the communication device."""
    if t.device == device():
        collective(t)
    else:
        moved = t.to(device())
        collective(moved)
        t.copy_(moved)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it."""
    if world_size() > 1:
        _on_comm_device(dist.all_reduce, t)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        _on_comm_device(lambda x: dist.broadcast(x, src=src), t)
    return t


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
