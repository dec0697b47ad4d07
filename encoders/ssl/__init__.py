"""Self-supervised vision pretraining: DINO self-distillation + iBOT masked image modelling.

A tower trained on images alone (no text) sees what captions do not name, which is why Mixture of
Features pairs one beside a CLIP-style tower. The pieces here are shared by `encoders.tips` (TIPS adds the
same two losses to its dual-caption contrastive training), one module per responsibility:

- `config`: `AugmentConfig`, `DistillConfig`, `SSLConfig` (model kind `ssl`'s `model.encoder`);
- `augment`: augmentation in torch only (random resized crop, flip, colour jitter), the views DINO
  compares; `block_mask`, BEiT/iBOT-style blockwise patch masking (the mask goes into the HF backbone
  through its own `bool_masked_pos`, Dinov2's learned mask token, not a re-implementation);
- `losses`: the losses as pure functions (`dino_loss`, `ibot_loss`, `teacher_probs`, `updated_center`),
  tested against direct computations, and the schedules (teacher temperature, EMA momentum);
- `distill`: `DINOHead` (MLP -> L2-normalised bottleneck -> prototypes with unit-norm rows: the
  weight-normed last layer with its gain frozen at 1, DINO's `norm_last_layer`); `EMATeacher` (an
  exponential moving average of the student kept as fp32 *buffers* and run with
  `torch.func.functional_call` on the student's own modules, so there is no second copy of the module
  tree, DeepSpeed never casts or partitions it, and checkpoints carry it like any buffer);
  `SelfDistillation` (heads + teacher + centres, the one place the schedules are applied);
- `model`: `SSLModel` (model kind `ssl`), an HF `Dinov2Model` tower trained by `SelfDistillation`; it
  saves the tower as an ordinary HF folder (`image_tower/`) that `TowerConfig(type="dinov2", path=...)`
  loads; `saving`: that folder's layout.

The data (`mllm.data.views`) and the stage task and recipe builder (`mllm.families.ssl`) live
with data and training.

The EMA update runs lazily at the first micro-batch of each optimiser step (it folds in the student of
the previous step), because the engine owns the optimiser step and DeepSpeed may step inside
`engine.step()`; the order "forward, step, EMA, forward" is the same as DINO's loop, and a resumed run
repeats it exactly because the micro-batch counter is a buffer saved with the checkpoint.
"""

from encoders.ssl.augment import (
    Augmenter,
    augmenter_for,
    block_mask,
    color_jitter,
    image_to_tensor,
    random_resized_crop,
    sample_masks,
)
from encoders.ssl.config import AugmentConfig, DistillConfig, SSLConfig, config_from_dict
from encoders.ssl.distill import DINOHead, EMATeacher, SelfDistillation, backbone_tokens
from encoders.ssl.losses import (
    cosine_ramp,
    dino_loss,
    ema_update,
    ibot_loss,
    ibot_loss_selected,
    teacher_probs,
    teacher_temperature,
    updated_center,
)
from encoders.ssl.model import SSLModel, SSLOutput
from encoders.ssl.saving import is_saved, load_extra, read_meta, save_encoder, tower_meta

__all__ = [
    "AugmentConfig",
    "Augmenter",
    "DINOHead",
    "DistillConfig",
    "EMATeacher",
    "SSLConfig",
    "SSLModel",
    "SSLOutput",
    "SelfDistillation",
    "augmenter_for",
    "backbone_tokens",
    "block_mask",
    "color_jitter",
    "config_from_dict",
    "cosine_ramp",
    "dino_loss",
    "ema_update",
    "ibot_loss",
    "ibot_loss_selected",
    "image_to_tensor",
    "is_saved",
    "load_extra",
    "random_resized_crop",
    "read_meta",
    "sample_masks",
    "save_encoder",
    "teacher_probs",
    "teacher_temperature",
    "tower_meta",
    "updated_center",
]
