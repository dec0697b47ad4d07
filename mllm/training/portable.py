"""Resume on another world size or backend: a checkpoint read as whole tensors, one parameter at a time.

A checkpoint is written in its run's own layout (fast, and exact for a same-layout resume): plain torch
keeps whole tensors; DeepSpeed ZeRO-2/3 keeps each rank's flat partition of the fp32 weights and Adam
moments, which only the same number of ranks can read back. When a run resumes under another layout
(another process count, ZeRO stage or backend: a requeued job that got fewer GPUs, a debug session under
plain torch), this module carries the state over:

- source: a torch checkpoint is read directly; a DeepSpeed one is first consolidated by DeepSpeed's own
  converter (`deepspeed.checkpoint.ds_to_universal`, the "universal checkpoint": a folder per parameter
  with its whole fp32 weight, exp_avg and exp_avg_sq), on rank 0 into a scratch folder beside the
  checkpoints, which goes once the state is loaded;
- target: plain torch gets `load_state_dict`; DeepSpeed gets each whole tensor through its tensor-fragment
  API (`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`), which slices out the part a rank
  owns under any ZeRO stage. The Adam state is created first (a fresh engine has none until its first
  step), and the model's own (bf16 or fp32) weights are set from the same fp32 values.
Adam's step count is the schedule's (`last_epoch`: both advance on exactly the updates applied), so it
needs no DeepSpeed file. Buffers (EMA teachers, running statistics) come from the checkpoint's module
state. One parameter is in memory at a time: a rank never holds the whole model's optimizer state.

Not exact: the reductions run in another order (another world size sums gradients differently), so a
resumed loss matches the uninterrupted run's to float tolerance, not bit for bit (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mllm.training import distributed as D
from mllm.training.checkpoint import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
#: In a torch checkpoint: the parameter names in the optimizer's state-dict order (its integer keys).
PARAM_NAMES_FILE = "optimizer_params.json"


class PortableError(CheckpointError):
    """A checkpoint cannot be carried to this run's layout."""


class WholeState:
    """A checkpoint's trainable weights, Adam moments, buffers, step and schedule, read on demand."""

    step: int
    scheduler: dict[str, Any]
    buffers: dict[str, torch.Tensor]

    def names(self) -> set[str]:
        raise NotImplementedError

    def param(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def moment(self, name: str, key: str) -> torch.Tensor | None:
        raise NotImplementedError


class TorchState(WholeState):
    """A plain-torch checkpoint: trainable.safetensors, optimizer.pt, scheduler.json."""

    def __init__(self, path: Path, fallback_names: list[str]):
        tensors = load_file(str(path / "trainable.safetensors"))
        opt = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        names_file = path / PARAM_NAMES_FILE
        order = json.loads(names_file.read_text()) if names_file.is_file() else fallback_names
        index = [i for g in opt["param_groups"] for i in g["params"]]
        if len(index) != len(order):
            raise PortableError(
                f"{path}: the optimizer state has {len(index)} parameters, this run's optimizer "
                f"{len(order)} (the stage trains other modules than the checkpointed run did)"
            )
        by_name = {order[k]: opt["state"].get(i, {}) for k, i in enumerate(index)}
        self.scheduler = json.loads((path / "scheduler.json").read_text())
        self.step = int(self.scheduler["last_epoch"])
        self._params = {n: tensors[n] for n in order if n in tensors}
        self.buffers = {n: t for n, t in tensors.items() if n not in by_name}
        self._moments = by_name

    def names(self) -> set[str]:
        return set(self._params)

    def param(self, name: str) -> torch.Tensor:
        return self._params[name].float()

    def moment(self, name: str, key: str) -> torch.Tensor | None:
        value = self._moments.get(name, {}).get(key)
        return value.float() if value is not None else None


class UniversalState(WholeState):
    """A DeepSpeed checkpoint consolidated by ds_to_universal: `zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`."""

    def __init__(self, universal: Path, ds_state: Path, scheduler: dict[str, Any]):
        self.root = universal / "zero"
        self.scheduler = scheduler
        self.step = int(scheduler["last_epoch"])
        module = _module_state(ds_state)
        self.buffers = {n: t for n, t in module["module"].items() if n in set(module.get("buffer_names", []))}

    def names(self) -> set[str]:
        return (
            {p.name for p in self.root.iterdir() if (p / "fp32.pt").is_file()}
            if self.root.is_dir()
            else set()
        )

    def _load(self, name: str, key: str) -> torch.Tensor | None:
        path = self.root / name / f"{key}.pt"
        if not path.is_file():
            return None
        value = torch.load(path, weights_only=True, map_location="cpu")
        return (value["param"] if isinstance(value, dict) else value).float()

    def param(self, name: str) -> torch.Tensor:
        value = self._load(name, "fp32")
        if value is None:
            raise PortableError(f"{self.root / name}: no fp32 weight")
        return value

    def moment(self, name: str, key: str) -> torch.Tensor | None:
        return self._load(name, key)


def _module_state(ds_state: Path) -> dict[str, Any]:
    """DeepSpeed's module-state file of rank 0 (buffers are whole on every rank under any ZeRO stage)."""
    files = sorted(ds_state.glob("*model_states.pt"))
    if not files:
        raise PortableError(f"{ds_state}: no DeepSpeed model-state file")
    return torch.load(files[0], weights_only=True, map_location="cpu")


def _scheduler_state(path: Path) -> dict[str, Any]:
    if (path / "scheduler.json").is_file():
        return json.loads((path / "scheduler.json").read_text())
    state = _module_state(path / "ds" / "state").get("lr_scheduler")  # checkpoints from before scheduler.json
    if not state:
        raise PortableError(f"{path}: no schedule state (scheduler.json)")
    return state


@contextlib.contextmanager
def whole_state(path: Path, scratch: Path, fallback_names: list[str]) -> Iterator[WholeState]:
    """The checkpoint at `path` as whole tensors on every rank (a collective: all ranks enter it). A
    DeepSpeed checkpoint is consolidated by rank 0 into `scratch`, removed on the way out."""
    if (path / "trainable.safetensors").is_file():
        yield TorchState(path, fallback_names)
        return
    ds_state = path / "ds" / "state"
    if not ds_state.is_dir():
        raise PortableError(f"{path}: neither a torch nor a DeepSpeed checkpoint")
    error = None
    if D.is_main():
        try:
            _consolidate(ds_state, scratch)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"{type(e).__name__}: {e}"
    errors = [e for e in D.gather_objects(error) if e]
    if errors:
        raise PortableError(f"{path}: consolidating the DeepSpeed checkpoint failed: {errors[0]}")
    try:
        yield UniversalState(scratch, ds_state, _scheduler_state(path))
    finally:
        D.barrier()
        if D.is_main():
            shutil.rmtree(scratch, ignore_errors=True)


def _consolidate(ds_state: Path, out: Path) -> None:
    """DeepSpeed's own converter, one worker (no process pool inside a training process), quiet."""
    from deepspeed.checkpoint import ds_to_universal  # optional (the deepspeed extra), slow to import

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ds_state),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our checkpoints carry no Megatron-style universal info: not needed
    )
    chatter = io.StringIO()  # its progress lines and bars; shown only when it fails
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:
        raise PortableError(f"{e} (converter output: {chatter.getvalue()[-1500:]})") from e


def _shape(p: nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape  # ZeRO-3 keeps a placeholder in p itself


def _checked(state: WholeState, trainable: dict[str, nn.Parameter], where: Path) -> None:
    missing = sorted(set(trainable) - state.names())
    if missing:
        raise PortableError(
            f"{where}: the checkpoint lacks trainable weights {missing[:5]} (it was written by a stage that "
            "trains other modules)"
        )


def _load_buffers(model: nn.Module, state: WholeState) -> None:
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.buffers.items():
            if name in own:
                own[name].copy_(value.to(own[name].dtype))


def load_into_torch(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: WholeState, where: Path
) -> None:
    """Weights, buffers, Adam moments and schedule into a plain-torch (or ZeRO-0 fp32) model and optimizer."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _checked(state, trainable, where)
    by_id = {id(p): n for n, p in trainable.items()}
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state.param(name).reshape(p.shape).to(p.dtype))
    _load_buffers(model, state)
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    indices = [i for g in sd["param_groups"] for i in g["params"]]
    new_state = {}
    for i, p in zip(indices, params):
        name = by_id.get(id(p))
        if name is None:
            continue
        moments = {k: state.moment(name, k) for k in MOMENTS}
        new_state[i] = {
            "step": torch.tensor(float(state.step)),
            **{k: (v.reshape(p.shape) if v is not None else torch.zeros_like(p)) for k, v in moments.items()},
        }
    optimizer.load_state_dict({"state": new_state, "param_groups": sd["param_groups"]})
    _load_schedule(optimizer, scheduler, state)


def _load_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, state: WholeState) -> None:
    scheduler.load_state_dict(state.scheduler)
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def load_into_deepspeed(
    engine: Any, model: nn.Module, scheduler: Any, state: WholeState, where: Path
) -> None:
    """The same into a DeepSpeed engine under any ZeRO stage and process count (a collective)."""
    from deepspeed import zero  # optional, as above
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _checked(state, trainable, where)
    partitioned = any(
        hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None for p in trainable.values()
    )
    if not partitioned:  # ZeRO-0 in fp32: DeepSpeed steps the client optimizer on the model's own tensors
        load_into_torch(model, engine.optimizer, scheduler, state, where)
        return
    wrapper = engine.optimizer
    if getattr(wrapper, "swap_optimizer", False):
        raise PortableError(
            f"{where}: resuming on another layout with NVMe-offloaded optimizer state is not supported"
        )
    base = wrapper.optimizer  # the torch optimizer over the flat fp32 partitions
    # A fresh engine has no Adam state until its first step: create it. ZeRO-3 hands its sub-groups to
    # the optimizer one at a time (its param_groups are empty between steps), so they are listed apart.
    flats = getattr(wrapper, "fp32_partitioned_groups_flat", None) or [
        t for g in base.param_groups for t in g["params"]
    ]
    for flat in flats:
        st = base.state[flat]
        st["step"] = torch.tensor(float(state.step))
        for k in MOMENTS:
            st.setdefault(k, torch.zeros_like(flat))
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link fragments to state
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    with torch.no_grad():
        for name, p in trainable.items():
            shape = _shape(p)
            weight = state.param(name).reshape(shape)
            if hasattr(p, "ds_id"):
                with zero.GatheredParameters([p], modifier_rank=0):
                    if D.is_main():
                        p.data.copy_(weight.to(p.dtype))
            else:
                p.data.copy_(weight.to(p.dtype))
            safe_set_full_fp32_param(p, weight.to(D.device()))
            for k in MOMENTS:
                m = state.moment(name, k)
                value = m.reshape(shape) if m is not None else torch.zeros(shape)
                safe_set_full_optimizer_state(p, value.to(D.device()), k)
    _load_buffers(model, state)
    _load_schedule(base, scheduler, state)
    engine.global_steps = state.step
