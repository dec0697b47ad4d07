"""One rank of the 2-process `gloo` check of encoders.objectives_text (run by tests/test_caption_methods.py).

Every rank builds the same global batch from a seed (features, token features, masks and one codebook),
keeps its slice of the per-sample tensors as leaves (the codebook and the scale are replicated, as model
parameters are), runs each case's local (gathered) loss and backward, and writes the loss and the gradients
to OUT/rank{R}.safetensors; the test compares them with the paper's formula on the whole batch.
Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python tests/_dist_caption_methods_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file

LOCAL_B, D, N, L, K = 5, 8, 4, 6, 7
N_SUB = 3  # DreamLIP's sub-captions per image
CHUNK = 3  # < LOCAL_B and not a divisor: the chunked kernels run, with a ragged last chunk

# name -> (objective, config)
CASES: dict[str, tuple[str, dict]] = {
    "clippp": ("clippp", {"chunk": CHUNK, "label_smoothing": 0.2}),
    "fdt_sparsemax": ("fdt", {"chunk": CHUNK, "codebook_size": K, "normalizer": "sparsemax"}),
    "fdt_softmax": ("fdt", {"chunk": CHUNK, "codebook_size": K, "normalizer": "softmax"}),
    "dreamlip": ("dreamlip", {"w_sub": 0.7, "w_group": 1.3}),
    "alip": ("alip", {"chunk": CHUNK, "gamma": 3.0, "momentum": 0.9}),  # running means started
    "alip_fresh": ("alip", {"chunk": CHUNK, "gamma": 3.0, "momentum": 0.9}),  # first step: batch means
}
PER_SAMPLE = ("img", "txt", "img_tokens", "txt_tokens", "sub_txt", "syn_txt")
ALIP_MEANS = (0.1, 0.05, -0.02)  # text-caption, image-text, image-caption


def global_batch(world: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole batch (world * LOCAL_B samples) in float64, identical on every rank and in the test."""
    g = torch.Generator().manual_seed(seed)
    b = world * LOCAL_B

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    lengths = torch.randint(1, L + 1, (b,), generator=g)
    return {
        "img": unit(b, D),
        "txt": unit(b, D),
        "img_tokens": unit(b, N, D),
        "txt_tokens": unit(b, L, D),
        "sub_txt": unit(b * N_SUB, D),
        "syn_txt": unit(b, D),  # sample-major: rows i * N_SUB + k are image i's
        "txt_mask": torch.arange(L)[None, :] < lengths[:, None],
        "codebook": torch.randn(K, D, generator=g, dtype=torch.float64),
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
        leaf = {k: batch[k][sl].clone().requires_grad_() for k in PER_SAMPLE if k != "sub_txt"}
        leaf["sub_txt"] = batch["sub_txt"][rank * LOCAL_B * N_SUB : (rank + 1) * LOCAL_B * N_SUB]
        leaf["sub_txt"] = leaf["sub_txt"].clone().requires_grad_()
        scale = batch["scale"].clone().requires_grad_()
        codebook = batch["codebook"].clone().requires_grad_()
        extra = {}
        if name == "fdt":
            extra = dict(
                img_tokens=leaf["img_tokens"],
                txt_tokens=leaf["txt_tokens"],
                txt_mask=batch["txt_mask"][sl],
                codebook=codebook,
            )
        elif name == "dreamlip":
            extra = dict(sub_txt=leaf["sub_txt"], img_tokens=leaf["img_tokens"])
        elif name == "alip":
            means = torch.tensor(ALIP_MEANS, dtype=torch.float64)
            started = torch.tensor([0.0 if case == "alip_fresh" else 1.0], dtype=torch.float64)
            extra = dict(syn_txt=leaf["syn_txt"], alip_means=means, alip_started=started)
        loss, _ = obj(leaf["img"], leaf["txt"], scale, None, **extra)
        loss.backward()
        result[f"{case}.loss"] = loss.detach().reshape(1)
        for k, t in leaf.items():
            result[f"{case}.grad.{k}"] = t.grad if t.grad is not None else torch.zeros_like(t)
        result[f"{case}.grad.scale"] = scale.grad.reshape(1)
        if name == "alip":
            result[f"{case}.means"] = extra["alip_means"].clone()
        result[f"{case}.grad.codebook"] = (
            codebook.grad if codebook.grad is not None else torch.zeros_like(codebook)
        )
    save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(Path(sys.argv[1]))
