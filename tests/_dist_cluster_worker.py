"""One rank of the 2-process `gloo` check of the cluster objectives (run by tests/test_cluster_objectives.py):
ProtoCLIP (gathered features, k-means on the global batch), Sinkhorn-Knopp codes (sums all-reduced) and
SwAV's loss (codes over the global batch, loss over the rank's rows).

Every rank builds the same global batch from a seed, keeps its slice as leaf tensors, runs each case and
backward, and writes the loss, the codes and the gradients of its local tensors to OUT/rank{R}.safetensors.
Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python tests/_dist_cluster_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

LOCAL_B, D, K = 5, 8, 4
CHUNK = 3  # < LOCAL_B and not a divisor: the chunked CLIP kernels run, with a ragged last chunk
PROTOCLIP = {"chunk": CHUNK, "n_prototypes": K, "proto_temperature": 0.1, "w_proto": 0.8}
SWAV = {"temperature": 0.1, "epsilon": 0.05, "iters": 3}


def global_batch(world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole batch (world * LOCAL_B samples) in float64, identical on every rank and in the test."""
    g = torch.Generator().manual_seed(seed)
    b = world * LOCAL_B

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    protos = unit(K, D)
    return {
        "img": unit(b, D),
        "txt": unit(b, D),
        "scale": torch.tensor(4.0, dtype=torch.float64),
        "view0": unit(b, D) @ protos.T,  # SwAV scores z.C of two views
        "view1": unit(b, D) @ protos.T,
    }


def main(out: Path) -> None:
    import encoders  # noqa: F401  (registers protoclip)
    from encoders.objectives import get_objective
    from encoders.objectives_cluster import sinkhorn_knopp
    from encoders.ssl.swav import swav_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch(world)
    sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    result: dict[str, torch.Tensor] = {}

    leaf = {k: batch[k][sl].clone().requires_grad_() for k in ("img", "txt")}
    scale = batch["scale"].clone().requires_grad_()
    loss, _ = get_objective("protoclip", **PROTOCLIP)(leaf["img"], leaf["txt"], scale, None)
    loss.backward()
    result["protoclip.loss"] = loss.detach().reshape(1)
    for k, t in leaf.items():
        result[f"protoclip.grad.{k}"] = t.grad
    result["protoclip.grad.scale"] = scale.grad.reshape(1)

    result["codes"] = sinkhorn_knopp(batch["view0"][sl], SWAV["epsilon"], SWAV["iters"])
    views = [batch[k][sl].clone().requires_grad_() for k in ("view0", "view1")]
    loss = swav_loss(views, 2, SWAV["temperature"], SWAV["epsilon"], SWAV["iters"])
    loss.backward()
    result["swav.loss"] = loss.detach().reshape(1)
    for i, v in enumerate(views):
        result[f"swav.grad.view{i}"] = v.grad
    save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(Path(sys.argv[1]))
