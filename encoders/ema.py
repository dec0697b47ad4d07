"""An exponential-moving-average copy of some of a model's parameters, and calls of the model's own code with
that copy in place of its weights: the momentum model of ALBEF and the EMA teacher of DeGLA.

Why not a second module tree (`copy.deepcopy(model)`): the copy would be a set of parameters that the
optimiser, DeepSpeed and `set_trainable` all see and must be told to skip. Here the copy is fp32 *buffers*
of one small module (`EmaCopy`), so it is saved and resumed with the model's state dict (both checkpoint
formats carry buffers), never trained, and never cast; the model's methods are run on it through
`torch.func.functional_call`, which swaps the tensors in for one call. The update rule is `encoders.ssl`'s
`ema_update` (the DINO teacher's): θ_ema ← m·θ_ema + (1 − m)·θ.

An `EmaCopy` is a child of the model it copies (so it moves with `.to()` and is saved with it), but it keeps
that model out of its own module tree (a plain attribute), so the model's state dict holds each EMA tensor
once and the EMA does not copy itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from encoders.ssl.losses import ema_update

__all__ = ["EmaCopy", "check_momentum"]


def check_momentum(value: Any, where: str) -> None:
    """An EMA momentum must be a number in [0, 1): 1 would freeze the copy forever (use a frozen model), a
    value outside the interval is not an average. Raises ValueError naming `where`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 <= value < 1.0:
        raise ValueError(f"{where} must be a number in [0, 1), got {value!r}")


class _Bound(nn.Module):
    """A throw-away module whose forward is one method of `model`, so functional_call can run that method
    with replaced tensors (the names it replaces are `model.<name>`)."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class EmaCopy(nn.Module):
    """fp32 EMA of the parameters (and floating buffers) of `model`'s children named in `prefixes`."""

    def __init__(self, model: nn.Module, prefixes: Sequence[str]):
        super().__init__()
        self.__dict__["_model"] = model  # not registered: the model owns this module, not the reverse
        self.prefixes = tuple(prefixes)
        missing = [p for p in self.prefixes if not hasattr(model, p)]
        if missing:
            raise ValueError(f"EmaCopy: the model has no module(s) {missing}")
        self._names: list[tuple[str, str]] = []  # (the tensor's name in the model, this module's buffer)
        for name, tensor in self._student():
            buf = name.replace(".", "__")
            self.register_buffer(buf, tensor.detach().clone().float())
            self._names.append((name, buf))

    def _student(self) -> list[tuple[str, torch.Tensor]]:
        out: list[tuple[str, torch.Tensor]] = []
        for p in self.prefixes:
            child = getattr(self._model, p)
            out += [(f"{p}.{n}", t) for n, t in child.named_parameters()]
            out += [(f"{p}.{n}", t) for n, t in child.named_buffers() if t.is_floating_point()]
        return out

    def _check_whole(self) -> None:
        if any(hasattr(t, "ds_status") for _, t in self._student()):
            raise RuntimeError(
                "an EMA copy needs whole parameters; DeepSpeed ZeRO-3 partitions them. Use ZeRO-0/1/2 "
                "(train/ds/zero2.json) for albef / degla stages."
            )

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """θ_ema ← m·θ_ema + (1 − m)·θ for every copied tensor (after an optimiser step)."""
        self._check_whole()
        student = dict(self._student())
        ema_update([getattr(self, b) for _, b in self._names], [student[n] for n, _ in self._names], momentum)

    @torch.no_grad()
    def reset(self) -> None:
        """The copy ← the model's current weights (a fresh momentum model / teacher)."""
        student = dict(self._student())
        for n, b in self._names:
            getattr(self, b).copy_(student[n].detach().float())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The EMA tensors under the model's own names (cast to each student tensor's dtype)."""
        student = dict(self._student())
        return {n: getattr(self, b).to(student[n].dtype) for n, b in self._names}

    @torch.no_grad()
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, a method of the model, run without gradient on the EMA weights."""
        self._check_whole()
        bound = _Bound(self._model, fn)
        swapped = {f"model.{n}": t for n, t in self.tensors().items()}
        return torch.func.functional_call(bound, swapped, args, kwargs, strict=False)
