"""One rank of the 2-process `gloo` check of encoders.objectives (run by tests/test_objectives.py).

Every rank builds the same global batch from a seed, keeps its slice as leaf tensors, runs every
objective's local (gathered) loss and backward, and writes the loss and the gradients of its local
tensors to OUT/rank{R}.safetensors; the test compares them with the single-process formula on the whole
batch. Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python tests/_dist_objectives_worker.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

LOCAL_B, D, N_IMG_TOK, N_TXT_TOK = 5, 8, 3, 4
CHUNK = 3  # < LOCAL_B and not a divisor: the chunked kernels run, with a ragged last chunk

# name -> (objective, config, extras it gets); "negclip_hard_img" is negclip with hard images too
CASES: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "clip": ("clip", {"chunk": CHUNK}, ()),
    "siglip": ("siglip", {"chunk": CHUNK}, ()),
    "dcl": ("dcl", {"chunk": CHUNK}, ()),
    "dcl_paper": ("dcl", {"chunk": CHUNK, "form": "paper"}, ()),
    "filip": ("filip", {"chunk": 2}, ("img_tokens", "txt_tokens", "txt_mask")),
    "negclip": ("negclip", {"chunk": CHUNK}, ("hard_txt",)),
    "negclip_hard_img": ("negclip", {"chunk": CHUNK}, ("hard_txt", "hard_img", "hard_img_txt")),
    "negclip_4b": (
        "negclip",
        {"chunk": CHUNK},
        ("hard_txt", "hard_img", "hard_img_txt", "hard_img_hard_txt"),
    ),
    "unif_align": ("unif_align", {"chunk": CHUNK, "w_align": 0.7, "w_unif": 1.3}, ()),
    "unif_align_mean": (
        "unif_align",
        {"chunk": CHUNK, "w_align": 0.7, "w_unif": 1.3, "unif_mix": "mean"},
        (),
    ),
}


def global_batch(world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole batch (world * LOCAL_B pairs) in float64, identical on every rank and in the test."""
    g = torch.Generator().manual_seed(seed)
    b = world * LOCAL_B

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    mask = torch.rand(b, N_TXT_TOK, generator=g) > 0.4
    mask[:, 0] = True
    return {
        "img": unit(b, D),
        "txt": unit(b, D),
        "img_tokens": unit(b, N_IMG_TOK, D),
        "txt_tokens": unit(b, N_TXT_TOK, D),
        "txt_mask": mask,
        "hard_txt": unit(b, D),
        "hard_img": unit(b, D),
        "hard_img_txt": unit(b, D),
        "hard_img_hard_txt": unit(b, D),
        "scale": torch.tensor(4.0, dtype=torch.float64),
        "bias": torch.tensor(-2.0, dtype=torch.float64),
    }


def main(out: Path) -> None:
    from encoders.objectives import get_objective

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch(world)
    sl = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    result: dict[str, torch.Tensor] = {}
    for case, (name, cfg, extras) in CASES.items():
        obj = get_objective(name, **cfg)
        leaf = {k: batch[k][sl].clone().requires_grad_() for k in ("img", "txt", *extras) if k != "txt_mask"}
        scale = batch["scale"].clone().requires_grad_()
        bias = batch["bias"].clone().requires_grad_() if obj.uses_bias else None
        extra = {k: leaf[k] for k in extras if k != "txt_mask"}
        if "txt_mask" in extras:
            extra["txt_mask"] = batch["txt_mask"][sl]
        loss, _ = obj(leaf["img"], leaf["txt"], scale, bias, **extra)
        loss.backward()
        result[f"{case}.loss"] = loss.detach().reshape(1)
        for k, t in leaf.items():
            if t.grad is not None:  # FILIP does not use the global embeddings
                result[f"{case}.grad.{k}"] = t.grad
        result[f"{case}.grad.scale"] = scale.grad.reshape(1)
        if bias is not None:
            result[f"{case}.grad.bias"] = bias.grad.reshape(1)
    # a ragged batch (rank 0 holds one row fewer) must fail on every rank with a message, not hang
    ragged = batch["img"][: LOCAL_B - 1 if rank == 0 else LOCAL_B]
    try:
        get_objective("clip")(ragged, ragged, batch["scale"], None)
        msg = ""
    except ValueError as e:
        msg = str(e)
    save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"ragged_error": msg}))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(Path(sys.argv[1]))
