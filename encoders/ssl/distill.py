"""The modules of self-distillation: `DINOHead`, the `EMATeacher` (fp32 buffers run through the
student's own modules) and `SelfDistillation` (heads + teacher + centres; the one place the schedules
are applied), shared by model kinds `ssl` and `tips`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.ssl.config import DistillConfig
from encoders.ssl.losses import (
    cosine_ramp,
    dino_loss,
    ema_update,
    ibot_loss_selected,
    teacher_probs,
    teacher_temperature,
    updated_center,
)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine against unit-norm prototypes (weight norm with g = 1).

    Normalising the prototype rows is DINO's `norm_last_layer=True`: it keeps any one prototype from
    winning by growing its norm, which is one of the collapse modes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError("DINOHead needs at least one layer")
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp: list[nn.Module] = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


class EMATeacher(nn.Module):
    """An EMA copy of some student modules, stored as fp32 buffers, run through the students' own code.

    `sources` maps a short name to a student module; the teacher copies every parameter and floating
    buffer of each. `run(name, *args)` calls that student module with the teacher's tensors in place of
    its own (`torch.func.functional_call`), without gradients.
    """

    def __init__(self, sources: dict[str, nn.Module]):
        super().__init__()
        self._sources = dict(sources)  # a plain dict: not registered, so the students are not duplicated
        self._keys: dict[str, list[tuple[str, str]]] = {}
        for src, module in self._sources.items():
            keys = []
            for name, tensor in self._student_tensors(module):
                buf = f"{src}__{name.replace('.', '__')}"
                self.register_buffer(buf, tensor.detach().clone().float())
                keys.append((name, buf))
            self._keys[src] = keys

    @staticmethod
    def _student_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        out = [(n, p) for n, p in module.named_parameters()]
        out += [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
        return out

    def _check_not_partitioned(self, module: nn.Module) -> None:
        if any(hasattr(p, "ds_status") for p in module.parameters()):
            raise RuntimeError(
                "an EMA teacher needs whole parameters; ZeRO-3 partitions them. "
                "Use ZeRO-0/1/2 (train/ds/zero2.json) for ssl/tips stages."
            )

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        for src, module in self._sources.items():
            self._check_not_partitioned(module)
            student = dict(self._student_tensors(module))
            names = [n for n, _ in self._keys[src]]
            ema_update([getattr(self, b) for _, b in self._keys[src]], [student[n] for n in names], momentum)

    @torch.no_grad()
    def run(self, src: str, *args: Any, **kwargs: Any) -> Any:
        module = self._sources[src]
        self._check_not_partitioned(module)
        tensors = {n: getattr(self, b) for n, b in self._keys[src]}
        return torch.func.functional_call(module, tensors, args, kwargs, strict=True)

    def state_for(self, src: str) -> dict[str, torch.Tensor]:
        """The teacher's copy of one student module, under the student's own parameter names."""
        return {n: getattr(self, b) for n, b in self._keys[src]}


def backbone_tokens(
    model: nn.Module, pixel_values: torch.Tensor, mask: torch.Tensor | None, n_prefix: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS [B, D], patch tokens [B, N, D]) of a Dinov2-family HF model, after its final LayerNorm."""
    out = model(pixel_values=pixel_values.to(dtype), bool_masked_pos=mask)
    hidden = out.last_hidden_state
    return hidden[:, 0], hidden[:, n_prefix:]


class SelfDistillation(nn.Module):
    """DINO (CLS level, across views) + iBOT (masked patches) on a Dinov2-family backbone.

    The caller owns the backbone (it is the tower being trained); this module owns the heads, the EMA
    teacher of backbone + heads, the running centres and the micro-batch counter that drives the
    schedules. `grad_accum` and `total_steps` come from the stage, so the schedules count optimiser steps.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden: int,
        n_prefix: int,
        cfg: DistillConfig,
        grad_accum: int = 1,
        total_steps: int = 1,
    ):
        super().__init__()
        self.cfg = cfg
        self._backbone = [backbone]  # not registered here: the owner registers it (as its tower)
        self.n_prefix = n_prefix
        self.grad_accum = max(1, int(grad_accum))
        self.total_steps = max(1, int(total_steps))
        self.cls_head = DINOHead(hidden, cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.head_layers)
        self.patch_head = DINOHead(
            hidden, cfg.patch_out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.head_layers
        )
        self.teacher = EMATeacher(
            {"backbone": backbone, "cls_head": self.cls_head, "patch_head": self.patch_head}
        )
        self.register_buffer("cls_center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, 1, cfg.patch_out_dim))
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    def configure_schedule(self, grad_accum: int, total_steps: int) -> None:
        """A new stage: its own step count, schedules from their start. (A resume then restores the
        counter from the checkpoint, since the engine loads it after the task has built the stage.)"""
        self.grad_accum = max(1, int(grad_accum))
        self.total_steps = max(1, int(total_steps))
        self.micro_batches.zero_()

    @property
    def step(self) -> int:
        return int(self.micro_batches) // self.grad_accum

    def _dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float], list[torch.Tensor]]:
        """global_views [B, 2, 3, H, W], local_views [B, L, 3, h, w] or None, masks bool [B, 2, N] or None.

        Returns (loss, parts, student CLS tokens of the global views); TIPS reuses the CLS tokens.
        """
        step = self.step  # optimiser steps taken so far, read before this micro-batch is counted
        if self.training:
            if int(self.micro_batches) > 0 and int(self.micro_batches) % self.grad_accum == 0:
                self.teacher.update(
                    cosine_ramp(self.cfg.ema_momentum, self.cfg.ema_momentum_end, step - 1, self.total_steps)
                )
            self.micro_batches += 1
        cfg, dtype = self.cfg, self._dtype()
        b, n_global = global_views.shape[:2]
        if n_global != 2:
            raise ValueError(f"self-distillation expects 2 global views per image, got {n_global}")
        flat = global_views.flatten(0, 1)  # [B*2, 3, H, W], view-major within each image
        flat_mask = masks.flatten(0, 1) if masks is not None else None
        temp = teacher_temperature(cfg, step)

        # The patch heads only run on masked positions (the only ones iBOT scores): ~15% of the tokens.
        has_mask = flat_mask is not None and cfg.ibot_weight > 0 and bool(flat_mask.any())
        s_cls, s_patch = backbone_tokens(self.backbone, flat, flat_mask, self.n_prefix, dtype)
        with torch.no_grad():
            t_hidden = self.teacher.run("backbone", pixel_values=flat.float()).last_hidden_state
            t_cls_logits = self.teacher.run("cls_head", t_hidden[:, 0])
            if has_mask:
                t_patch_logits = self.teacher.run("patch_head", t_hidden[:, self.n_prefix :][flat_mask])
        del t_hidden
        s_cls_logits = self.cls_head(s_cls)
        student_views = list(s_cls_logits.view(b, 2, -1).unbind(1))
        if local_views is not None and local_views.shape[1] > 0:
            lv = local_views.flatten(0, 1)
            l_cls, _ = backbone_tokens(self.backbone, lv, None, self.n_prefix, dtype)
            student_views += list(self.cls_head(l_cls).view(b, local_views.shape[1], -1).unbind(1))
        t_probs = teacher_probs(t_cls_logits, self.cls_center, temp).view(b, 2, -1).unbind(1)
        l_dino = dino_loss(student_views, t_probs, cfg.student_temp)
        parts: dict[str, torch.Tensor | float] = {"dino": l_dino.detach()}
        loss = cfg.dino_weight * l_dino
        if has_mask:
            owner = flat_mask.nonzero()[:, 0]  # the view each masked token belongs to (row-major order)
            s_patch_logits = self.patch_head(s_patch[flat_mask])
            t_patch_probs = teacher_probs(t_patch_logits, self.patch_center.view(1, -1), temp)
            l_ibot = ibot_loss_selected(
                s_patch_logits, t_patch_probs, owner, flat_mask.shape[0], cfg.student_temp
            )
            parts["ibot"] = l_ibot.detach()
            loss = loss + cfg.ibot_weight * l_ibot
        if self.training:
            with torch.no_grad():
                self.cls_center.copy_(updated_center(self.cls_center, t_cls_logits, cfg.center_momentum))
                if has_mask:  # centred on the masked patches' teacher outputs, as DINOv2 does
                    self.patch_center.copy_(
                        updated_center(
                            self.patch_center.view(1, -1), t_patch_logits, cfg.center_momentum
                        ).view_as(self.patch_center)
                    )
        parts["teacher_temp"] = temp
        return loss, parts, list(s_cls.view(b, 2, -1).unbind(1))
