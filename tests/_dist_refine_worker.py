"""One rank of the 2-process `gloo` check of encoders.refine (run by tests/test_refine.py).

Every rank builds the same global batch (student and teacher embeddings, RaFA references) from a seed, keeps
its slice as leaf tensors, runs the local (gathered) CLIP-Refine loss and backward, and writes the loss and
the gradients of its local tensors to OUT/rank{R}.safetensors; the test compares them with the paper's
formula on the whole batch.
Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python tests/_dist_refine_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

LOCAL_B, D = 3, 6
# name -> RefineConfig fields
CASES: dict[str, dict] = {
    "hycd": {"alpha": 0.4, "temperature": 1.5, "weight_hycd": 1.0, "weight_rafa": 0.0},
    "refine": {"alpha": 0.7, "temperature": 1.0, "weight_hycd": 0.5, "weight_rafa": 2.0},
}


def global_batch(world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole batch (world * LOCAL_B pairs) in float64, identical on every rank and in the test."""
    g = torch.Generator().manual_seed(seed)
    b = world * LOCAL_B

    def unit() -> torch.Tensor:
        return F.normalize(torch.randn(b, D, generator=g, dtype=torch.float64), dim=-1)

    return {
        "img": unit(),
        "txt": unit(),
        "t_img": unit(),
        "t_txt": unit(),
        "ref": torch.randn(b, D, generator=g, dtype=torch.float64),
        "scale": torch.tensor([5.0], dtype=torch.float64),
        "t_scale": torch.tensor([7.0], dtype=torch.float64),
    }


def main(out: Path) -> None:
    from encoders.refine import RefineConfig, refine_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch(world)
    sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    result: dict[str, torch.Tensor] = {}
    for case, cfg in CASES.items():
        leaf = {k: batch[k][sl].clone().requires_grad_() for k in ("img", "txt")}
        scale = batch["scale"].clone().requires_grad_()
        loss, _ = refine_loss(
            leaf["img"],
            leaf["txt"],
            batch["t_img"][sl],
            batch["t_txt"][sl],
            scale,
            batch["t_scale"],
            RefineConfig(**cfg),
            batch["ref"][sl],
        )
        loss.backward()
        result[f"{case}.loss"] = loss.detach().reshape(1)
        for k, t in leaf.items():
            result[f"{case}.grad.{k}"] = t.grad
        result[f"{case}.grad.scale"] = scale.grad.reshape(1)
    save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(Path(sys.argv[1]))
