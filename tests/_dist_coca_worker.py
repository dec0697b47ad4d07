"""One rank of the 2-process `gloo` check of encoders.coca (run by tests/test_coca.py).

Every rank loads the same saved CocaModel (with SyCoCa's TG-MIM) and the same global batch, keeps its slice
(captions of different lengths on each rank), runs the model's loss and backward, and writes the loss and
every parameter's gradient to OUT/rank{R}.safetensors; the test compares their mean over ranks (what
data-parallel training averages) with one process on the whole batch.
Usage: RANK=r WORLD_SIZE=w MASTER_ADDR=.. MASTER_PORT=.. python tests/_dist_coca_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


def main(out: Path) -> None:
    from encoders.coca import CocaModel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = CocaModel.from_pretrained(out / "model")
    batch = load_file(str(out / "batch.safetensors"))
    local = batch["pixel_values"].shape[0] // world
    sl = slice(rank * local, (rank + 1) * local)
    result = model(**{k: v[sl] for k, v in batch.items()})
    result.loss.backward()
    tensors = {"loss": result.loss.detach().reshape(1)}
    tensors.update({f"grad.{n}": p.grad.contiguous() for n, p in model.named_parameters()})
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
