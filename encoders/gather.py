"""Cross-rank gathering for contrastive losses, with the gradient flowing back to the rank that owns a row.

A contrastive loss over a data-parallel batch needs every rank's features as negatives. A plain
`all_gather` cuts the graph, so the features of other ranks would be constants and the loss would train
on a smaller effective batch than it reports. `gather_with_grad` keeps the graph: its backward sums the
gradient that every rank computed for every gathered row (one `all_reduce`) and hands each rank the slice
of its own rows. The gradient a rank then holds for its local features is that of the *sum* of all ranks'
losses; DDP / DeepSpeed average parameter gradients over ranks, which turns it into the gradient of the
mean loss, i.e. exactly the single-process gradient on the concatenated batch.

`all_reduce` is used instead of `reduce_scatter` because `gloo` (CPU) has no reduce-scatter; the extra
traffic is the size of the gathered features, small next to the towers' activations.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "dist_info", "gather_no_grad", "gather_with_grad"]


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_equal_rows(x: torch.Tensor, world: int, what: str) -> None:
    """All ranks must hold the same number of rows: labels are offset by rank * rows, and all_gather needs
    equal shapes. Checked with one tiny collective so a ragged last batch fails with a message, not a hang."""
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    rows = [int(s.item()) for s in sizes]
    if len(set(rows)) != 1:
        raise ValueError(
            f"gather of {what}: ranks hold different batch sizes {rows}; contrastive objectives "
            "need equal per-rank batches (drop the last incomplete batch)"
        )


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    world = dist.get_world_size()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        ctx.rank = dist.get_rank()
        return _all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor, what: str = "features") -> torch.Tensor:
    """Concatenate `x` [B, ...] of every rank in rank order -> [world*B, ...], differentiable.

    Every rank must call it (and later backward through it) in the same order. Without an initialised
    process group, or with one rank, it returns `x` itself.
    """
    _, world = dist_info()
    if world == 1:
        return x
    _check_equal_rows(x, world, what)
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor, what: str = "tensor") -> torch.Tensor:
    """Like `gather_with_grad` for tensors that carry no gradient (masks, labels). Bool tensors travel as
    uint8 because not every backend reduces or gathers bool."""
    _, world = dist_info()
    if world == 1:
        return x
    _check_equal_rows(x, world, what)
    if x.dtype == torch.bool:
        return _all_gather_cat(x.to(torch.uint8)).bool()
    return _all_gather_cat(x.detach())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks; `x` itself with one rank."""
    _, world = dist_info()
    if world == 1:
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
