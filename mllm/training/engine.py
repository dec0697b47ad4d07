"""The one training loop: DeepSpeed (ZeRO 0/2/3, gloo on CPU, nccl on GPU) or plain torch.

It owns gradient accumulation, clipping, the schedule, logging, progress, checkpoints and resume, so
every stage (and every later method: PRIOR, contrastive, MoF) gets them by declaring data, not by
copying a loop. Resume restores weights, optimiser, scheduler, RNG and the data position, so a
resumed run produces the same loss sequence as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from encoders.common import read_meta, seed_everything, write_meta
from mllm.config import ConfigError, EngineConfig, StageConfig, resolve_zero_config
from mllm.data.batch import Batch, Skip, batch_ids, batch_skips, model_inputs
from mllm.data.order import BatchOrder, continue_position
from mllm.data.samplers import build_order
from mllm.logging_backends import open_loggers
from mllm.lora import restrict_to_adapters
from mllm.training import distributed as D
from mllm.training.checkpoint import CheckpointError, CheckpointManager, atomic_write_text
from mllm.training.faults import failing_write, injected, maybe_kill, maybe_signal, trace_samples
from mllm.training.manifest import MANIFEST, check_files, hash_files, list_files, read_manifest
from mllm.training.nonfinite import NonfiniteError, NonfiniteGuard
from mllm.training.optim import build_optimizer, cosine_with_warmup, param_groups, set_trainable
from mllm.training.portable import PARAM_NAMES_FILE, load_into_deepspeed, load_into_torch, whole_state
from mllm.training.preemption import Preempted, PreemptionWatch, ignore_in_worker

# A checkpoint folder's meta file: kind `checkpoint`, format_version, step, position, skipped samples.
CHECKPOINT_META = "trainer_state.json"
CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_VERSION = 1


class TrainingError(RuntimeError):
    pass


#: What `train_recipe(evaluator=)` takes: (the stage's model, the stage, the optimiser step) -> JSON-able
#: metrics. Built above this package (mllm.evaluation.periodic.make_evaluator), because training never
#: imports evaluation; the engine only decides when it runs and keeps it from disturbing training.
Evaluator = Callable[[nn.Module, StageConfig, int], dict[str, Any]]
#: The engine's view of it: the step in, the metrics out (run_stage binds the model and the stage).
StepEvaluator = Callable[[int], dict[str, Any]]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` in eval mode for the duration, then every submodule's own train/eval flag as it was
    (a blanket `.train()` would also wake parts a model keeps in eval mode on purpose)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@dataclass
class StageResult:
    steps: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    wall_s: float = 0.0
    resumed_from: int | None = None


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def _jsonable(x: Any) -> Any:
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x: Any) -> Any:
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_tupled(meta["python"]))


def load_ds_config(path: str | None, stage: StageConfig, precision: str) -> dict[str, Any]:
    """A ZeRO JSON with `"auto"` values filled from the stage (as HF's integration does)."""
    path = resolve_zero_config(path)  # packaged configs by name, wherever the run starts
    cfg: dict[str, Any] = json.loads(Path(path).read_text()) if path else {"zero_optimization": {"stage": 0}}
    fills = {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.grad_clip,
    }
    for k, v in fills.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    cfg.pop("train_batch_size", None)
    bf16 = cfg.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = precision == "bf16"
    cfg.setdefault("fp16", {"enabled": False})
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def _step_values(
    micro_losses: list[torch.Tensor], micro_stats: list[dict[str, torch.Tensor]]
) -> tuple[float, dict[str, float]]:
    """The step's loss (mean over micro-batches and ranks) and its statistics (each the mean over this
    rank's micro-batches that report it: the main rank's rows, as the objectives compute them), brought to
    the host together: one transfer per step however many statistics the model reports."""
    loss = D.all_reduce_mean(torch.stack(micro_losses).mean())  # float32, as each micro-batch's loss
    names = sorted({k for s in micro_stats for k in s})
    if not names:
        return float(loss), {}
    means = [torch.stack([s[k] for s in micro_stats if k in s]).mean() for k in names]
    values = torch.stack([loss, *means]).tolist()
    return values[0], dict(zip(names, values[1:]))


def _stat(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A reported statistic (a detached tensor, or a plain number such as a scheduled temperature) as a
    0-dim float32 copy on the loss's device."""
    return torch.as_tensor(value).detach().reshape(()).to(device=like.device, dtype=torch.float32, copy=True)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def _write_error(e: BaseException) -> bool:
    """Whether `e` is storage failing under a checkpoint write: an OSError (ENOSPC, EIO, EDQUOT, ...), or
    the same reported by torch's or safetensors' writers in their own exception types. A lost peer is not."""
    if isinstance(e, OSError):
        return True
    if D.comm_failure(e):
        return False
    text = str(e).lower()
    return type(e).__name__ == "SafetensorError" or (
        isinstance(e, RuntimeError) and any(w in text for w in ("write", "no space", "i/o error", "quota"))
    )


class Trainer:
    """Runs one stage on a model. Build it, call `train()`; the caller saves the final model."""

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        collate,
        stage: StageConfig,
        engine: EngineConfig,
        out_dir: str | Path,
        trainable: dict[str, float],
        evaluate: StepEvaluator | None = None,
        preempt: PreemptionWatch | None = None,
    ):
        self.model = model
        self.dataset = dataset
        self.collate = collate
        self.stage = stage
        self.cfg = engine
        self.out_dir = Path(out_dir)
        self.trainable = trainable
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", engine.keep_last)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.evals_path = self.out_dir / "evals.jsonl"
        self.evaluate = evaluate
        if stage.eval_every is not None and evaluate is None:
            raise ValueError(
                f"stage {stage.name!r} sets eval_every={stage.eval_every} but no evaluator was given "
                "(`mllm train` builds one; a library caller passes train_recipe(..., evaluator="
                "mllm.evaluation.periodic.make_evaluator(recipe)))"
            )
        self.train_s = 0.0  # training-loop seconds of this stage so far, periodic evaluation excluded
        self.use_ds = engine.backend == "deepspeed"
        if engine.backend not in ("deepspeed", "torch"):
            raise ValueError(f"engine.backend must be 'deepspeed' or 'torch', got {engine.backend!r}")
        self.skipped: list[Skip] = []
        self.guard = NonfiniteGuard(engine.nonfinite)
        self.preempt = preempt  # None: signals keep their default actions (a library caller's choice)
        self.failed_saves = 0  # checkpoint writes failed in a row (engine.checkpoint_retries)

    # ------------------------------------------------------------------ set-up
    def total_steps(self, order: BatchOrder) -> int:
        if self.stage.max_steps is not None:
            return int(self.stage.max_steps)
        return max(1, math.ceil(self.stage.epochs * order.per_epoch / self.stage.grad_accum))

    def _setup(self) -> None:
        D.init(self.cfg.backend, self.cfg.dist_timeout_s)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        seed_everything(self.cfg.seed)
        set_trainable(self.model, self.trainable)
        restrict_to_adapters(self.model)  # LoRA: under a peft-wrapped module only the adapters train
        groups = param_groups(self.model, self.trainable, self.stage.weight_decay)
        self.group_names = [g["name"] for g in groups]
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.param_order = [names[id(p)] for g in groups for p in g["params"]]  # the optimizer's indices
        self.order = build_order(
            self.stage.data.sampler,
            self.dataset,
            self.stage.batch_size,
            self.cfg.seed,
            D.rank(),
            D.world_size(),
        )
        self.steps = self.total_steps(self.order)
        if self.stage.eval_every is not None and self.stage.eval_every > self.steps:
            raise ConfigError(
                f"stage {self.stage.name!r}: eval_every={self.stage.eval_every} is larger than the "
                f"stage ({self.steps} optimiser steps)"
            )
        warmup = int(round(self.stage.warmup_ratio * self.steps))
        optimizer = build_optimizer(groups, tuple(self.stage.betas))
        schedule = cosine_with_warmup(warmup, self.steps, self.stage.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(optimizer.param_groups))
        self.device = D.device()
        if self.use_ds:
            import deepspeed  # optional at run time (backend: torch needs none), and slow to import

            ds_cfg = load_ds_config(
                self.stage.zero_config or self.cfg.zero_config, self.stage, self.cfg.precision
            )
            if (
                self.stage.eval_every is not None
                and int(ds_cfg.get("zero_optimization", {}).get("stage", 0)) == 3
            ):
                # Rank 0 alone would run generate on partitioned weights, whose forward hooks gather
                # from every rank: a hang. Gathering all weights on every rank for it defeats ZeRO-3.
                raise ConfigError(
                    f"stage {self.stage.name!r}: eval_every={self.stage.eval_every} is not supported "
                    "under ZeRO-3; use ZeRO-2 for this stage, or `mllm eval` on its final model"
                )
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.model,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=ds_cfg,
                dist_init_required=False,
            )
            self.zero_stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
        else:
            self.model.to(self.device)
            self.engine, self.optimizer, self.scheduler = self.model, optimizer, scheduler
            self.zero_stage = 0
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if (not self.use_ds and self.cfg.precision == "bf16")
            else contextlib.nullcontext()
        )

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters + persistent buffers: training changes buffers too (an EMA teacher, DINO's
        centres, BatchNorm statistics), and DeepSpeed's checkpoints carry them, so this path must as well."""
        state = {
            n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad
        }
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        for n, t in self.model.state_dict().items():
            if n not in params and isinstance(t, torch.Tensor):
                state[n] = t.detach().cpu().clone()  # a copy: buffers may share storage (safetensors refuses)
        return state

    def _layout(self) -> dict[str, Any]:
        """What a checkpoint's files depend on: a resume under another layout goes through portable.py."""
        return {
            "backend": self.cfg.backend,
            "zero_stage": self.zero_stage,
            "world_size": D.world_size(),
            "global_micro_batch": self.order.global_batch,
        }

    def _write_state(self, tmp: Path, step: int, position: int) -> None:
        """This rank's files of the checkpoint (all ranks call it: DeepSpeed's save is a collective)."""
        if self.use_ds:
            self.engine.save_checkpoint(
                str(tmp / "ds"), tag="state", save_latest=False, exclude_frozen_parameters=True
            )
        elif D.is_main():
            save_file(self._trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / PARAM_NAMES_FILE).write_text(json.dumps(self.param_order))
        maybe_kill("mid_checkpoint", step)
        maybe_signal("term_mid_checkpoint", step)
        tensors, meta = _rng_state()
        save_file(tensors, str(tmp / f"rng_rank{D.rank()}.safetensors"))
        failing_write(step, tmp / f"rng_rank{D.rank()}.json", json.dumps(meta).encode())
        if D.is_main():
            (tmp / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            state = {
                "step": step,
                "position": position,
                "total_steps": self.steps,
                "skipped": [s.__dict__ for s in self.skipped],
                "nonfinite_skips": self.guard.skipped,
                **self._layout(),
            }
            write_meta(tmp / CHECKPOINT_META, CHECKPOINT_KIND, CHECKPOINT_VERSION, state, indent=1)

    def _agree(self, step: int, what: str, fn: Callable[[], Any]) -> list[Any]:
        """Run this rank's part of a checkpoint write, then agree: if it failed on any rank, every rank
        raises the same CheckpointError (naming the file and the cause). Returns every rank's result."""
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - storage errors arrive as OSError, torch's RuntimeError, ...
            if not _write_error(e):
                raise
            error = f"{e} (rank {D.rank()})" if D.world_size() > 1 else str(e)
        outcomes = D.gather_objects((result, error))
        errors = [e for _, e in outcomes if e]
        if errors:
            last = self.ckpt.latest()
            raise CheckpointError(
                f"checkpoint {self.ckpt.name(step)} not written ({what} failed): {errors[0]}; "
                + (f"the last good checkpoint, {last}, is intact" if last else "no earlier checkpoint exists")
            )
        return [r for r, _ in outcomes]

    def save_checkpoint(self, step: int, position: int) -> Path:
        """Write, checksum and commit a checkpoint on all ranks. A storage failure on any rank removes the
        partial folder and raises CheckpointError on every rank; committed checkpoints are never touched."""
        tmp = self.ckpt.tmp_path(step)
        try:
            self._agree(step, "creating the folder", lambda: self.ckpt.begin(step) if D.is_main() else None)
            self._agree(step, "writing", lambda: self._write_state(tmp, step, position))
            files = list_files(tmp)  # every rank checksums its share of the files, in parallel
            shares = self._agree(
                step, "checksumming", lambda: hash_files(tmp, files[D.rank() :: D.world_size()])
            )
            manifest = {rel: entry for share in shares for rel, entry in share.items()}
            self._agree(step, "committing", lambda: self.ckpt.commit(step, manifest) if D.is_main() else None)
        except CheckpointError:
            if D.is_main():
                self.ckpt.abort(step)
            raise
        return self.ckpt.root / self.ckpt.name(step)

    def _checkpoint(self, step: int, position: int, retry_later: bool) -> bool:
        """A checkpoint the schedule asks for; a failed write is survived `checkpoint_retries` times in a
        row when a later save can retry it (`retry_later`). True when written."""
        try:
            self.save_checkpoint(step, position)
        except CheckpointError as e:
            self.failed_saves += 1
            if not retry_later or self.failed_saves > self.cfg.checkpoint_retries:
                raise
            self._log(
                f"warning: {e}; training on, retrying at the next checkpoint "
                f"({self.failed_saves} of engine.checkpoint_retries={self.cfg.checkpoint_retries} failures in a row)"
            )
            return False
        self.failed_saves = 0
        return True

    def _log(self, msg: str) -> None:
        if D.is_main():
            print(f"[{self.stage.name}] {msg}", file=sys.stderr, flush=True)

    def _verify(self, path: Path) -> list[str] | None:
        """What is wrong with checkpoint `path` by its manifest, each rank checking a share of the files;
        None when it has no manifest (written before checksums: not verifiable, used as it is)."""
        try:
            entries = read_manifest(path)
        except (ValueError, OSError) as e:
            return [f"{path / MANIFEST}: unreadable ({e})"]
        if entries is None:
            return None
        rels = sorted(entries)
        mine = {rel: entries[rel] for rel in rels[D.rank() :: D.world_size()]}
        return [p for share in D.gather_objects(check_files(path, mine)) for p in share]

    def _choose_checkpoint(self) -> Path | None:
        """The newest checkpoint that passes its manifest. A refused one is named with its bad file and
        left in place; the next older is tried. None: no checkpoint at all (a fresh stage)."""
        refused: list[str] = []
        for path in self.ckpt.candidates():
            problems = self._verify(path)
            if problems is None:
                self._log(
                    f"{path.name} has no {MANIFEST} (written before checksums): resuming without verifying"
                )
                return path
            if not problems:
                if refused:
                    self._log(f"resuming from {path.name}, the newest checkpoint that verifies")
                return path
            refused.append(
                f"{path.name}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
            )
            self._log(f"refusing checkpoint {path}: {'; '.join(problems[:3])}; trying an older one")
        if refused:
            raise CheckpointError(
                f"no checkpoint in {self.ckpt.root} passes its manifest ({'; '.join(refused)}); nothing was "
                "changed: move the folders away to start the stage over, or `mllm ckpt verify` for details"
            )
        return None

    def load_checkpoint(self, path: Path) -> tuple[int, int]:
        state = read_meta(path / CHECKPOINT_META, CHECKPOINT_KIND, CHECKPOINT_VERSION)
        saved = {k: state.get(k, v) for k, v in self._layout().items()}
        if "global_micro_batch" not in state:  # written before it was recorded: the batch size is this run's
            saved["global_micro_batch"] = self.stage.batch_size * int(state.get("world_size", 1))
        same = {k: v for k, v in saved.items() if k != "global_micro_batch"} == {
            k: v for k, v in self._layout().items() if k != "global_micro_batch"
        }
        position = continue_position(int(state["position"]), int(saved["global_micro_batch"]), self.order)
        if same:
            self._load_native(path)
        else:
            self._log(
                f"resuming {path.name} written by {saved['world_size']} process(es) under {saved['backend']}"
                f" (ZeRO-{saved['zero_stage']}) with {D.world_size()} under {self.cfg.backend} (ZeRO-"
                f"{self.zero_stage}): weights and optimiser state carried over as whole tensors; data "
                f"continues at sample {position * self.order.global_batch}"
            )
            scratch = self.ckpt.root / f".tmp-universal-{path.name}"
            with whole_state(path, scratch, self.param_order) as whole:
                if self.use_ds:
                    load_into_deepspeed(self.engine, self.model, self.scheduler, whole, path)
                else:
                    load_into_torch(self.model, self.optimizer, self.scheduler, whole, path)
        rng_file = path / f"rng_rank{D.rank()}.safetensors"
        if rng_file.is_file():
            _set_rng_state(
                load_file(str(rng_file)), json.loads((path / f"rng_rank{D.rank()}.json").read_text())
            )
        else:  # a rank the checkpointed run did not have: a seed of its own, deterministic
            seed_everything(self.cfg.seed + 7919 * D.rank() + int(state["step"]))
        self.skipped = [Skip(**s) for s in state.get("skipped", [])]
        self.guard.skipped = list(state.get("nonfinite_skips", []))
        return int(state["step"]), position

    def _load_native(self, path: Path) -> None:
        """A checkpoint of this very layout: the backend's own loader, exact."""
        if self.use_ds:
            loaded, _ = self.engine.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=False)
            if loaded is None:
                raise TrainingError(f"{path}: DeepSpeed could not load the checkpoint")
            return
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(self._trainable_state()) - set(weights)
        if missing:
            raise TrainingError(f"{path}: checkpoint lacks trainable weights {sorted(missing)[:5]}")
        self.model.load_state_dict(weights, strict=False)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))

    # ------------------------------------------------------------------ loop
    def _loader(self, start: int, stop: int) -> DataLoader:
        # Its own generator: creating the iterator draws a seed, which from the global RNG would shift
        # every later dropout mask of a resumed run (LoRA dropout) away from the uninterrupted one.
        workers = self.stage.data.num_workers
        signals = [int(s) for s in self.preempt.signals] if self.preempt is not None else []
        return DataLoader(
            self.dataset,
            batch_sampler=list(self.order.batches(start, stop)),
            collate_fn=self.collate,
            num_workers=workers,
            generator=torch.Generator().manual_seed(self.cfg.seed + start),
            worker_init_fn=functools.partial(ignore_in_worker, signals) if workers and signals else None,
        )

    def _micro_step(
        self, batch: Batch, step: int, first: bool
    ) -> tuple[torch.Tensor, bool, dict[str, torch.Tensor]]:
        """Forward, the non-finite check (before any gradient exists), backward.

        Returns (loss, finite, stats): `stats` is the model output's `stats` (name -> detached 0-dim tensor,
        e.g. a contrastive objective's logit scale, bias and in-batch accuracy), left on the device: the
        step brings them to the host with its loss, in one transfer (`_step_values`)."""
        batch = _move(batch, self.device)
        with self.autocast:
            out = self.engine(**model_inputs(batch))
        loss = out.loss
        # A snapshot now: a statistic may alias a parameter that the optimiser step changes in place.
        stats = {k: _stat(v, loss) for k, v in (getattr(out, "stats", None) or {}).items()}
        if first and injected("nan_loss", step):
            loss = loss * float("nan")
        finite = self.guard.all_finite(loss)
        if not finite and self.guard.stop:
            return loss.detach().float(), False, stats
        if self.use_ds:
            # A non-finite loss is still back-propagated here: DeepSpeed's overflow check then drops
            # the step (verified in train()); skipping backward would shift its accumulation boundary.
            self.engine.backward(loss)
            self.engine.step()
        elif finite:
            (loss / self.stage.grad_accum).backward()
        return loss.detach().float(), finite, stats

    def _optimizer_step(self, finite: bool = True) -> float | None:
        if self.use_ds:
            return None  # DeepSpeed stepped at the accumulation boundary inside engine.step()
        if not finite:  # the skip policy: no update and no schedule step, as DeepSpeed does on overflow
            self.optimizer.zero_grad(set_to_none=True)
            return None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = (
            torch.nn.utils.clip_grad_norm_(params, self.stage.grad_clip) if self.stage.grad_clip > 0 else None
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else None

    def _after_step(self) -> None:
        """The model's `after_step()`, if it has one, after an applied optimiser step: a model's own
        post-update rule (ContrastiveModel: open_clip's clamp of the logit-scale parameter). Under
        DeepSpeed it sees the module's parameters, not ZeRO's fp32 master copies."""
        hook = getattr(self.model, "after_step", None)
        if callable(hook):
            hook()

    def _lrs(self) -> dict[str, float]:
        return {n: g["lr"] for n, g in zip(self.group_names, self.optimizer.param_groups)}

    def train(self) -> StageResult:
        t0 = time.time()
        self._setup()
        if D.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt.clean_orphans()
        D.barrier()
        step, position, resumed = 0, 0, None
        latest = self._choose_checkpoint()
        if latest is not None:
            step, position = self.load_checkpoint(latest)
            resumed = step
        self._stop_if_preempted(step, position, saved=True)  # a signal during set-up: nothing new to save
        if D.is_main():
            kept = self._truncate_jsonl(self.metrics_path, step)
            self.train_s = sum(float(r.get("step_s") or 0.0) for r in kept)  # the clock evals.jsonl continues
            self._truncate_jsonl(self.evals_path, step)
        # TensorBoard / W&B beside metrics.jsonl (main rank only); named-but-missing packages fail here.
        self.loggers = open_loggers(
            self.cfg.loggers if D.is_main() else [], self.out_dir, self.stage.name, step
        )
        ga = self.stage.grad_accum
        losses: list[float] = []
        bar = None
        # A live bar on a terminal; in a log file, one line every `log_every` steps instead of a
        # carriage-return stream that turns into megabytes.
        tty = sys.stderr.isatty()
        if D.is_main() and self.cfg.progress and tty:
            bar = tqdm(total=self.steps, initial=step, desc=self.stage.name, dynamic_ncols=True, leave=False)
        if step < self.steps:
            self.engine.train() if self.use_ds else self.model.train()
            loader = iter(self._loader(position, position + (self.steps - step) * ga))
            t_last = time.time()
            while step < self.steps:
                micro_losses = []
                micro_stats: list[dict[str, torch.Tensor]] = []
                n_samples = 0
                step_start, finite = position, True
                ds_skipped = getattr(self.engine, "skipped_steps", 0)
                for k in range(ga):
                    batch = next(loader)
                    position += 1
                    self._record_skips(batch_skips(batch))
                    if not batch_ids(batch):
                        raise TrainingError(
                            f"every sample of micro-batch {position - 1} was bad: "
                            + "; ".join(s.reason for s in batch_skips(batch))
                        )
                    n_samples += len(batch_ids(batch))
                    trace_samples(step + 1, D.rank(), batch_ids(batch))
                    micro_loss, ok, stats = self._micro_step(batch, step + 1, k == 0)
                    if k == 0:
                        maybe_signal("term_mid_step", step + 1)
                        maybe_signal("usr1_mid_step", step + 1)
                    micro_losses.append(micro_loss)
                    micro_stats.append(stats)
                    finite = finite and ok
                    if not ok and self.guard.stop:
                        self._stop_nonfinite(step, step_start, position, micro_loss, batch_ids(batch))
                grad_norm = self._optimizer_step(finite)
                step += 1
                ds_dropped = self.use_ds and getattr(self.engine, "skipped_steps", 0) > ds_skipped
                if finite and not ds_dropped:
                    self._after_step()
                if not finite and self.use_ds and not ds_dropped:
                    raise NonfiniteError(
                        f"non-finite loss at step {step}, and DeepSpeed applied the update anyway (its overflow "
                        "check is off in this configuration: fp32 needs gradient_clipping > 0, bf16 "
                        "check_grad_overflow); use engine.nonfinite.policy=stop"
                    )
                if not finite or ds_dropped:
                    self.guard.record_skip(step, "non-finite loss" if not finite else "DeepSpeed overflow")
                loss, stats = _step_values(micro_losses, micro_stats)
                if finite and not ds_dropped:
                    if not math.isfinite(loss):
                        raise TrainingError(f"non-finite loss {loss} at step {step}")
                    losses.append(loss)
                now = time.time()
                step_s = round(now - t_last, 4)
                self.train_s += step_s  # the same rounded numbers a resume re-adds from metrics.jsonl
                if D.is_main():
                    rec = {
                        "step": step,
                        "loss": loss if finite and not ds_dropped else None,
                        "lr": self._lrs(),
                        "samples": n_samples * D.world_size(),
                        "step_s": step_s,
                    }
                    if grad_norm is not None:
                        rec["grad_norm"] = grad_norm
                    if stats and finite and not ds_dropped:
                        rec["stats"] = stats
                    if not finite or ds_dropped:
                        rec["skipped"] = "non-finite loss" if not finite else "DeepSpeed overflow"
                    line = json.dumps(rec) + "\n"
                    with open(self.metrics_path, "a") as f:
                        if injected("mid_metrics", step):  # a torn line, as a kill in mid-write leaves
                            f.write(line[: len(line) // 2])
                            f.flush()
                            maybe_kill("mid_metrics", step)
                        f.write(line)
                    self.loggers.log(rec, step)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.4f}")
                    elif self.cfg.progress and (step % self.cfg.log_every == 0 or step == self.steps):
                        print(
                            f"[{self.stage.name}] step {step}/{self.steps} loss {loss:.4f} ({now - t0:.0f}s)",
                            file=sys.stderr,
                            flush=True,
                        )
                t_last = now
                every_eval = self.stage.eval_every
                if every_eval and (step % every_eval == 0 or step == self.steps):
                    # Before the checkpoint: a crash mid-evaluation resumes from an earlier checkpoint and
                    # evaluates this step again (its line, if written, is past that checkpoint and dropped).
                    self._periodic_eval(step)
                    t_last = time.time()  # the next step's step_s leaves the evaluation out
                every = self.cfg.checkpoint_every
                saved = False
                if (every and step % every == 0) or step == self.steps:
                    saved = self._checkpoint(step, position, retry_later=step < self.steps)
                maybe_kill("after_step", step)
                self._stop_if_preempted(step, position, saved)
        if bar is not None:
            bar.close()
        self.loggers.close()
        return StageResult(
            step, losses[-1] if losses else None, losses, self.skipped, time.time() - t0, resumed
        )

    def _stop_if_preempted(self, step: int, position: int, saved: bool) -> None:
        """After an optimiser step (all ranks, in step): if any rank got a preemption signal, write a
        checkpoint of this step unless one was just written, and raise Preempted. A failed write raises
        CheckpointError instead (there is no later interval to retry at)."""
        if self.preempt is None or not self.preempt.agreed():
            return
        path = self.ckpt.root / self.ckpt.name(step) if step else None
        if not saved and step:
            path = self.save_checkpoint(step, position)
        if path is not None and not path.is_dir():
            path = None
        if hasattr(self, "loggers"):  # opened after the first check (a stop during set-up opens none)
            self.loggers.close()
        raise Preempted(self.preempt.signame, self.stage.name, step, path)

    def _record_skips(self, skips: list[Skip]) -> None:
        """Each bad sample is listed once, however many epochs meet it again."""
        seen = {s.sample for s in self.skipped}
        for s in skips:
            if s.sample not in seen:
                self.skipped.append(s)
                seen.add(s.sample)

    @staticmethod
    def _truncate_jsonl(path: Path, step: int) -> list[dict[str, Any]]:
        """On resume, drop lines (metrics.jsonl, evals.jsonl) past the checkpoint: they will be produced
        again. A torn last line (killed mid-write) is past the checkpoint by construction and goes too.
        Returns the records kept."""
        if not path.is_file():
            return []
        keep: list[str] = []
        recs: list[dict[str, Any]] = []
        for ln in path.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(ln)
                recs.append(rec)
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))
        return recs

    def _periodic_eval(self, step: int) -> None:
        """One `eval_every` evaluation on rank 0 (the others wait at a barrier), appended to evals.jsonl.

        The model is in eval mode only for the evaluation, with gradients off, and every RNG (python,
        numpy, torch CPU/CUDA) is put back afterwards, so a run with `eval_every` trains exactly as one
        without: same dropout masks, same losses. Under ZeRO-0/2 rank 0 holds whole weights; ZeRO-3 is
        refused in _setup. The other ranks' wait is bounded by engine.dist_timeout_s.
        """
        assert self.evaluate is not None
        if D.is_main():
            t0 = time.time()
            tensors, meta = _rng_state()
            try:
                with eval_mode(self.model), torch.no_grad():
                    result = self.evaluate(step)
            finally:
                _set_rng_state(tensors, meta)
            rec = {"step": step, "wall_s": round(self.train_s, 4), "eval_s": round(time.time() - t0, 4)}
            rec.update((k, v) for k, v in result.items() if k not in rec)
            line = json.dumps(rec) + "\n"
            with open(self.evals_path, "a") as f:  # one whole line per write, as metrics.jsonl
                f.write(line)
            if self.cfg.progress:
                acc = rec.get("accuracy")
                shown = (
                    f"{rec.get('benchmark', 'eval')} {acc:.1f}%" if isinstance(acc, (int, float)) else "done"
                )
                print(
                    f"[{self.stage.name}] step {step}/{self.steps} eval: {shown} ({rec['eval_s']:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
        D.barrier()

    def _stop_nonfinite(
        self, step: int, step_start: int, position: int, loss: torch.Tensor, ids: list[Any]
    ) -> None:
        """The stop policy: checkpoint the last good state (weights before this step, data position at
        its start, so a resume replays it), then raise naming the step, micro-batch and samples."""
        path = self.ckpt.root / self.ckpt.name(step)
        if step not in self.ckpt.steps():
            path = self.save_checkpoint(step, step_start)
        raise NonfiniteError(
            f"non-finite loss {float(loss)} at step {step + 1} (micro-batch {position - 1}, samples "
            f"{ids[:8]}); the last good state (after step {step}) is checkpointed in {path}. "
            "Set engine.nonfinite.policy=skip to drop such steps instead."
        )

    # ------------------------------------------------------------------ final weights
    @contextlib.contextmanager
    def full_weights(self):
        """Full (un-partitioned) parameters on every rank for the duration; a no-op below ZeRO-3."""
        if self.use_ds and self.zero_stage == 3:
            import deepspeed  # lazy, as in _setup

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def close(self) -> None:
        if self.use_ds:
            with contextlib.suppress(Exception):
                self.engine.destroy()
