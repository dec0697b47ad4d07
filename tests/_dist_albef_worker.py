"""One rank of the 2-process `gloo` check of DeGLA's global loss (run by tests/test_albef.py).

Every rank builds the same global batch from a seed (images, captions, K negatives per image with some
marked as fillers), keeps its slice as leaf tensors, runs `degla_global` (this rank's rows against every
rank's columns) and backward, and writes the loss and the gradients to OUT/rank{R}.safetensors; the test
compares them with the formula on the whole batch in one process.
Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python tests/_dist_albef_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

LOCAL_B, K, D = 3, 2, 8


def global_batch(world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole batch (world * LOCAL_B images) in float64, identical on every rank and in the test."""
    g = torch.Generator().manual_seed(seed)
    b = world * LOCAL_B

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    valid = torch.ones(b, K, dtype=torch.bool)
    valid[1, 1] = valid[b - 1, 1] = False  # a filler on each rank
    return {
        "img": unit(b, D),
        "txt": unit(b, D),
        "neg": unit(b, K, D),
        "valid": valid,
        "scale": torch.tensor([5.0], dtype=torch.float64),
    }


def main(out: Path) -> None:
    from encoders.degla import degla_global

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch(world)
    sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    leaf = {k: batch[k][sl].clone().requires_grad_() for k in ("img", "txt", "neg")}
    scale = batch["scale"].clone().requires_grad_()
    loss, _ = degla_global(leaf["img"], leaf["txt"], leaf["neg"], scale, batch["valid"][sl])
    loss.backward()
    result = {"loss": loss.detach().reshape(1), "grad.scale": scale.grad.reshape(1)}
    result.update({f"grad.{k}": t.grad for k, t in leaf.items()})
    save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(Path(sys.argv[1]))
