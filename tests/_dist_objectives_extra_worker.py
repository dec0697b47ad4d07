"""One rank of the 2-process `gloo` check of encoders.objectives_extra (run by tests/test_objectives_extra.py).

Every rank builds the same global batch from a seed, keeps its slice as leaf tensors, runs each case's local
(gathered) loss and backward, and writes the loss and the gradients of its local tensors to
OUT/rank{R}.safetensors; the test compares them with the paper's formula on the whole batch.
Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python tests/_dist_objectives_extra_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

LOCAL_B, D = 5, 8
CHUNK = 3  # < LOCAL_B and not a divisor: the chunked kernels run, with a ragged last chunk
SEED = 7  # torch's default generator is seeded with it before each case (MoCHi's draws)

# name -> (objective, config)
CASES: dict[str, tuple[str, dict]] = {
    "convirt": ("convirt", {"chunk": CHUNK, "weight_i2t": 0.6, "temperature": 0.2}),
    "convirt_learnable": ("convirt", {"chunk": CHUNK, "weight_i2t": 0.3, "temperature": None}),
    "mochi": ("mochi", {"chunk": CHUNK, "n_hard": 3, "n_mix": 4, "n_query_mix": 2}),
    "cacr": ("cacr", {"chunk": CHUNK, "t_pos": 0.5, "t_neg": 2.0}),
    "cacr_weights_grad": ("cacr", {"chunk": CHUNK, "t_pos": 0.5, "t_neg": 2.0, "weights_grad": True}),
    "mv_infonce": ("mv_infonce", {"chunk": CHUNK}),
}
# the MV-InfoNCE kernel with three views (img, txt, v3): written as case "mv3"
MV3_CHUNK = 2


def global_batch(world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole batch (world * LOCAL_B pairs) in float64, identical on every rank and in the test."""
    g = torch.Generator().manual_seed(seed)
    b = world * LOCAL_B

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    return {
        "img": unit(b, D),
        "txt": unit(b, D),
        "v3": unit(b, D),
        "scale": torch.tensor(4.0, dtype=torch.float64),
    }


def main(out: Path) -> None:
    from encoders.objectives import get_objective

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch(world)
    sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    result: dict[str, torch.Tensor] = {}
    for case, (name, cfg) in CASES.items():
        obj = get_objective(name, **cfg)
        leaf = {k: batch[k][sl].clone().requires_grad_() for k in ("img", "txt")}
        scale = batch["scale"].clone().requires_grad_()
        torch.manual_seed(SEED)
        loss, _ = obj(leaf["img"], leaf["txt"], scale, None)
        loss.backward()
        result[f"{case}.loss"] = loss.detach().reshape(1)
        for k, t in leaf.items():
            result[f"{case}.grad.{k}"] = t.grad
        result[f"{case}.grad.scale"] = scale.grad.reshape(1)
    from encoders.objectives_extra import mv_infonce

    leaf = {k: batch[k][sl].clone().requires_grad_() for k in ("img", "txt", "v3")}
    scale = batch["scale"].clone().requires_grad_()
    loss, _ = mv_infonce([leaf["img"], leaf["txt"], leaf["v3"]], scale, MV3_CHUNK)
    loss.backward()
    result["mv3.loss"] = loss.detach().reshape(1)
    for k, t in leaf.items():
        result[f"mv3.grad.{k}"] = t.grad
    result["mv3.grad.scale"] = scale.grad.reshape(1)
    save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(Path(sys.argv[1]))
