"""Contrastive objectives for image-text training: a registry, one entry per objective.

Interface (the contrastive training task codes against it):

    objective = get_objective("siglip", chunk=1024)
    loss, stats = objective(img, txt, scale, bias, **extra)

- img, txt: [B, D] L2-normalised global embeddings of matched pairs (row i of img matches row i of txt).
- scale: the already-exponentiated logit scale (1/T), a 1-element tensor, usually learnable.
- bias: a 1-element tensor for objectives with `uses_bias` (SigLIP), else None.
- extra: per-objective tensors named in `needs` (required) and `optional`; e.g. FILIP's token features.
- loss: 0-dim float32 tensor (float64 for float64 inputs); stats: name -> detached 0-dim tensor, for
  logging: the logit scale (1/temperature) and SigLIP's bias, the in-batch retrieval accuracies
  (`acc_i2t`, `acc_t2i`: the share of rows whose arg-max is their positive) and parts of the loss. They
  stay on the device (no host sync per statistic); the training engine brings a step's statistics to
  the host once, with its loss, and writes them to metrics.jsonl under `stats`.

Distributed (torch.distributed initialised, world > 1): every objective gathers the other ranks' features
*with gradient* (`encoders.gather`) and evaluates the "local loss": this rank's rows against the global
columns, positives at column rank*B + i. Each rank's loss is the mean over its own rows, so the mean over
ranks equals the single-process loss on the concatenated batch, and the gradients (after the usual DDP
averaging of parameter gradients) equal the single-process gradients. Stats are for the local rows.

`init_logit_params(name)` gives the initial log-scale and bias per objective, so a model class does not
hard-code CLIP's 1/0.07 or SigLIP's (10, -10).

Formulas: ../shared/reference/methods.md "Contrastive objective family"; choices where it is silent are
documented on each class.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from encoders.chunked import acc_dtype, pair_lse, siglip_sum
from encoders.gather import all_reduce_sum, dist_info, gather_no_grad, gather_with_grad
from encoders.registry import Registry

__all__ = [
    "OBJECTIVES",
    "Stats",
    "ClipObjective",
    "ContrastiveObjective",
    "DclObjective",
    "FilipObjective",
    "LogitInit",
    "NegClipObjective",
    "SiglipObjective",
    "UnifAlignObjective",
    "get_objective",
    "init_logit_params",
    "register_objective",
]

OBJECTIVES: Registry[type[ContrastiveObjective]] = Registry("contrastive objective")

#: What an objective reports besides its loss: statistic name -> detached 0-dim tensor.
Stats = dict[str, torch.Tensor]


def register_objective(name: str) -> Callable[[type[ContrastiveObjective]], type[ContrastiveObjective]]:
    """Class decorator: add an objective to `OBJECTIVES` under `name` (one new objective = one entry)."""

    def deco(cls: type[ContrastiveObjective]) -> type[ContrastiveObjective]:
        OBJECTIVES.register(name, cls, stacklevel=2)
        cls.name = name
        return cls

    return deco


def get_objective(name: str, **cfg: Any) -> ContrastiveObjective:
    """Build a registered objective from its config values (a YAML mapping's keys = the class's fields)."""
    cls = OBJECTIVES[name]
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"objective {name!r}: unknown config keys {unknown}; allowed: {sorted(allowed)}")
    return cls(**cfg)


@dataclass(frozen=True)
class LogitInit:
    """Initial logit parameters of an objective. The model keeps `log_scale` (and `bias`) as parameters and
    passes `scale_from_log(log_scale)` to the objective.

    `max_scale` (CLIP: 100, so the logits cannot blow up) and `min_scale` (CLIP: 1, a temperature of at
    most 1) are applied as open_clip applies them: the *parameter* is clamped to [ln(min_scale),
    ln(max_scale)] = [0, ln 100] after every optimiser step (`clamp_log_scale_`, called by the
    model's `after_step`, which the training engine calls), so the forward pass sees exp(log_scale) with
    its ordinary gradient, and a step that would push past the cap leaves the parameter at the cap, from
    where a later gradient can still lower it. `scale_from_log` also clamps in log space, as a guard for a
    parameter that was not clamped (a caller's own loop, a DeepSpeed ZeRO fp32 master copy that the
    in-place clamp of the module's parameter does not reach); it is a no-op inside the range (the
    clamp's gradient passes at the boundaries too), so after a clamped step it changes neither value nor
    gradient. Before this, the cap was only a forward clamp of the scale at 100, whose gradient is 0
    above the cap: a scale that crossed it stayed stuck there; and there was no lower bound."""

    log_scale: float
    bias: float | None
    max_scale: float | None
    min_scale: float | None = None

    def _log_bounds(self) -> tuple[float | None, float | None]:
        lo = None if self.min_scale is None else math.log(self.min_scale)
        hi = None if self.max_scale is None else math.log(self.max_scale)
        return lo, hi

    def scale_from_log(self, log_scale: torch.Tensor) -> torch.Tensor:
        lo, hi = self._log_bounds()
        if lo is not None or hi is not None:
            log_scale = log_scale.clamp(min=lo, max=hi)
        return log_scale.exp()

    def clamp_log_scale_(self, log_scale: torch.Tensor) -> None:
        """Clamp the log-scale parameter in place to [ln(min_scale), ln(max_scale)] (open_clip's
        `logit_scale.clamp_(0, math.log(100))` after each optimiser step)."""
        lo, hi = self._log_bounds()
        if lo is not None or hi is not None:
            with torch.no_grad():
                log_scale.clamp_(min=lo, max=hi)


CLIP_LOGITS = LogitInit(log_scale=math.log(1 / 0.07), bias=None, max_scale=100.0, min_scale=1.0)
SIGLIP_LOGITS = LogitInit(log_scale=math.log(10.0), bias=-10.0, max_scale=None)


def init_logit_params(objective: str) -> LogitInit:
    """Initial (log_scale, bias, max_scale) for a registered objective name."""
    return OBJECTIVES[objective].logit_init


# Every extra any objective accepts; a name outside this set is a typo and is refused, while a known extra
# that this objective does not use is ignored (the data may carry hard negatives for all objectives).
KNOWN_EXTRAS = (
    "img_tokens",
    "txt_tokens",
    "txt_mask",
    "hard_txt",
    "hard_img",
    "hard_img_txt",
    "hard_img_hard_txt",
    "codebook",  # FDT's shared codebook [K, D] (encoders.objectives_text), a model parameter
    "sub_txt",  # DreamLIP's sub-caption embeddings [B * K, D] (encoders.objectives_text)
    "syn_txt",  # ALIP's synthetic-caption embeddings [B, D] and its running means (objectives_text)
    "alip_means",
    "alip_started",
)


@dataclass
class ContrastiveObjective:
    """Base: input checks, the distributed context, and the shared InfoNCE plumbing."""

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    uses_bias: ClassVar[bool] = False
    logit_init: ClassVar[LogitInit] = CLIP_LOGITS

    def __post_init__(self) -> None:
        chunk = getattr(self, "chunk", 1)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(
                f"objective {self.name!r}: chunk must be a positive integer (rows per block), got {chunk!r}"
            )

    def __call__(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor | float,
        bias: torch.Tensor | None = None,
        **extra: torch.Tensor,
    ) -> tuple[torch.Tensor, Stats]:
        scale = self._check(img, txt, scale, bias, extra)
        return self.compute(img, txt, scale, bias, **extra)

    def compute(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        **extra: torch.Tensor,
    ) -> tuple[torch.Tensor, Stats]:
        raise NotImplementedError

    # ---- input checks: a wrong shape or a missing extra is a ValueError naming the objective and tensor
    def _err(self, msg: str) -> ValueError:
        return ValueError(f"objective {self.name!r}: {msg}")

    def _check(self, img: Any, txt: Any, scale: Any, bias: Any, extra: dict[str, Any]) -> torch.Tensor:
        for what, t in (("img", img), ("txt", txt)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise self._err(
                    f"{what} must be a float tensor [B, D], got "
                    f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                )
        if img.shape != txt.shape:
            raise self._err(
                f"img {tuple(img.shape)} and txt {tuple(txt.shape)} must have the same shape [B, D]"
            )
        if img.shape[0] == 0:
            raise self._err("empty batch")
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scale), device=img.device)
        if scale.numel() != 1:
            raise self._err(f"scale must hold one number, got shape {tuple(scale.shape)}")
        if self.uses_bias:
            if bias is None or not isinstance(bias, torch.Tensor) or bias.numel() != 1:
                raise self._err("needs a 1-element bias tensor (init_logit_params gives its initial value)")
        elif bias is not None:
            raise self._err("takes no bias (init_logit_params gives bias=None for it); pass bias=None")
        unknown = sorted(set(extra) - set(KNOWN_EXTRAS))
        if unknown:
            raise self._err(f"unknown extra inputs {unknown}; known: {list(KNOWN_EXTRAS)}")
        missing = [k for k in self.needs if extra.get(k) is None]
        if missing:
            raise self._err(f"missing extra inputs {missing} (needs {list(self.needs)})")
        self._check_extra(img, extra)
        return scale

    def _check_extra(self, img: torch.Tensor, extra: dict[str, Any]) -> None:
        """Per-objective shape checks of the extras (override)."""

    def _check_rows(self, img: torch.Tensor, extra: dict[str, Any], key: str) -> None:
        t = extra.get(key)
        if not isinstance(t, torch.Tensor) or t.shape != img.shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise self._err(f"{key} must be a tensor of img's shape {tuple(img.shape)}, got {got}")

    # ---- shared pieces
    def _infonce(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        *,
        chunk: int,
        exclude_positive: bool,
        same_modal: bool = False,
    ) -> tuple[torch.Tensor, Stats]:
        """Symmetric InfoNCE (CLIP) or its decoupled form (DCL: positive left out of the denominator).

        Single process: one pass over the [B, B] logits gives both directions (row and column
        log-sum-exps). Distributed: local image rows x global text columns, and local text rows x
        global image columns. With `same_modal` the denominator also holds the anchor's own modality,
        every other sample but itself (DCL's paper form: x_i against x_k, k != i, beside y_k).
        """
        rank, world = dist_info()
        b = img.shape[0]
        off = rank * b
        pos = _positive_logits(img, txt, scale)
        if world == 1:
            r = pair_lse(
                img, txt, scale, chunk=chunk, exclude_offset=0 if exclude_positive else None, cols=True
            )
            lse_i2t, lse_t2i, arg_i2t, arg_t2i = r.row, r.col, r.row_arg, r.col_arg
            img_all, txt_all = img, txt
        else:
            txt_all, img_all = gather_with_grad(txt, "txt"), gather_with_grad(img, "img")
            excl = off if exclude_positive else None
            r1 = pair_lse(img, txt_all, scale, chunk=chunk, exclude_offset=excl)
            r2 = pair_lse(txt, img_all, scale, chunk=chunk, exclude_offset=excl)
            lse_i2t, lse_t2i, arg_i2t, arg_t2i = r1.row, r2.row, r1.row_arg, r2.row_arg
        if same_modal:
            lse_ii = pair_lse(img, img_all, scale, chunk=chunk, exclude_offset=off).row
            lse_tt = pair_lse(txt, txt_all, scale, chunk=chunk, exclude_offset=off).row
            lse_i2t, lse_t2i = torch.logaddexp(lse_i2t, lse_ii), torch.logaddexp(lse_t2i, lse_tt)
        labels = torch.arange(off, off + b, device=img.device)
        l_i2t = (lse_i2t - pos).mean()
        l_t2i = (lse_t2i - pos).mean()
        loss = (l_i2t + l_t2i) / 2
        stats = {
            "loss_i2t": l_i2t.detach(),
            "loss_t2i": l_t2i.detach(),
            "scale": _stat(scale),
            "acc_i2t": _accuracy(arg_i2t, labels),
            "acc_t2i": _accuracy(arg_t2i, labels),
        }
        return loss, stats


def _stat(t: torch.Tensor) -> torch.Tensor:
    """A logged statistic: detached, 0-dim, left where it is (no host sync); a copy, as the logit scale or
    bias may be a parameter that the optimiser step changes in place before the statistic is read."""
    return t.detach().reshape(()).clone()


def _accuracy(arg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """In-batch retrieval accuracy: the share of rows whose best column is their positive."""
    return (arg.detach() == labels).float().mean()


def _positive_logits(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s * img_i . txt_i in the accumulation dtype (a bf16 dot product would blur the positive's logit)."""
    acc = acc_dtype(img)
    return (img.to(acc) * txt.to(acc)).sum(-1) * scale.to(acc).reshape(())


@register_objective("clip")
@dataclass
class ClipObjective(ContrastiveObjective):
    """CLIP symmetric InfoNCE: (CE(s*img@txt.T, diag) + CE(s*txt@img.T, diag)) / 2.

    chunk: rows of logits processed at once. With more than `chunk` rows the log-softmax is computed as
    a chunked log-sum-exp (rows directly, columns by an online log-sum-exp) and the backward recomputes
    each block, so memory is O(B * chunk) instead of O(B^2); at or below it the plain full matrix is used.
    """

    chunk: int = 1024
    logit_init: ClassVar[LogitInit] = CLIP_LOGITS

    def compute(self, img, txt, scale, bias, **extra):
        return self._infonce(img, txt, scale, chunk=self.chunk, exclude_positive=False)


#: DCL's two forms (DclObjective.form).
DCL_FORMS = ("cross_modal", "paper")


@register_objective("dcl")
@dataclass
class DclObjective(ContrastiveObjective):
    """Decoupled contrastive learning (Yeh et al. 2022): InfoNCE with the positive removed from the
    denominator, averaged over both directions (image anchors and text anchors) as CLIP is.

    form "cross_modal" (default): -s*x_i.y_i + log sum_{j != i} exp(s*x_i.y_j), the negatives the other
      modality only, as in CLIP. The default because it changes CLIP's denominator and nothing else, so
      the comparison with `clip` isolates the decoupling; it is the form this project always had.
    form "paper": the paper's loss with the two views being the image and its caption:
      -s*x_i.y_i + log(sum_{k != i} exp(s*x_i.y_k) + sum_{k != i} exp(s*x_i.x_k)), i.e. the anchor's own
      modality is a negative too (every view of every other sample, as SimCLR's 2N - 2 negatives).
    Neither form applies DCLW's von Mises-Fisher weighting of the positive. Needs at least two pairs in
    the (global) batch, else the denominator is empty."""

    chunk: int = 1024
    form: str = "cross_modal"
    logit_init: ClassVar[LogitInit] = CLIP_LOGITS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form not in DCL_FORMS:
            raise ValueError(f"objective {self.name!r}: form must be one of {DCL_FORMS}, got {self.form!r}")

    def _check_extra(self, img, extra):
        if img.shape[0] * dist_info()[1] < 2:
            raise self._err("needs at least 2 pairs in the batch (the denominator excludes the positive)")

    def compute(self, img, txt, scale, bias, **extra):
        return self._infonce(
            img, txt, scale, chunk=self.chunk, exclude_positive=True, same_modal=self.form == "paper"
        )


@register_objective("siglip")
@dataclass
class SiglipObjective(ContrastiveObjective):
    """SigLIP: -(1/B) sum_i sum_j log sigmoid(z_ij * (s * x_i.y_j + b)), z = +1 on the diagonal, -1 off it.

    Normalisation: the sum over the B^2 pairs is divided by B (the SigLIP paper's pseudo-code, `sum / n`),
    which is how methods.md's "mean" is read; dividing by B^2 would shrink the gradient B times at b = -10.

    Distributed: gather-with-gradient of the text features, then local image rows x global text columns
    (the local loss divides the rank's rows' sum by its B), chunked like the single-process form. The
    ring/neighbour exchange of the paper saves the gathered copy of the text features ([world*B, D]),
    which is small next to the towers; gathering keeps one code path for all objectives.
    """

    chunk: int = 1024
    uses_bias: ClassVar[bool] = True
    logit_init: ClassVar[LogitInit] = SIGLIP_LOGITS

    def compute(self, img, txt, scale, bias, **extra):
        rank, _ = dist_info()
        b = img.shape[0]
        txt_all = gather_with_grad(txt, "txt")
        total, arg = siglip_sum(img, txt_all, scale, bias, chunk=self.chunk, pos_offset=rank * b)
        loss = total / b
        labels = torch.arange(rank * b, rank * b + b, device=img.device)
        return loss, {"scale": _stat(scale), "bias": _stat(bias), "acc_i2t": _accuracy(arg, labels)}


def late_interaction(
    q: torch.Tensor, q_mask: torch.Tensor | None, k: torch.Tensor, k_mask: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    """FILIP similarity [R, C]: for query r and key c, the mean over r's valid tokens of the max over c's
    valid tokens of the token dot product. q [R, N, D], k [C, L, D], masks True = real token.

    Chunked over query rows so the [chunk, C, N, L] token-similarity block is the largest temporary; the
    max's backward keeps only indices, not the block."""
    acc = acc_dtype(q)
    q, k = q.to(acc), k.to(acc)
    out = []
    for r0 in range(0, q.shape[0], chunk):
        qc = q[r0 : r0 + chunk]
        sim = torch.einsum("rnd,cld->rcnl", qc, k)
        if k_mask is not None:
            sim = sim.masked_fill(~k_mask[None, :, None, :], float("-inf"))
        best = sim.max(-1).values  # [r, C, N]
        if q_mask is None:
            out.append(best.mean(-1))
        else:
            m = q_mask[r0 : r0 + chunk, None, :].to(best.dtype)
            out.append((best * m).sum(-1) / m.sum(-1))
    return torch.cat(out)


@register_objective("filip")
@dataclass
class FilipObjective(ContrastiveObjective):
    """FILIP token-wise late interaction (Yao et al. 2021).

    image->text similarity: mean over image tokens of the max over (unpadded) text tokens;
    text->image similarity: mean over unpadded text tokens of the max over image tokens;
    loss = (CE(s * S_i2t, diag) + CE(s * S_t2i, diag)) / 2. The global img/txt embeddings are checked but
    not used. Extras (L2-normalised tokens): img_tokens [B, N, D], txt_tokens [B, L, D], txt_mask [B, L]
    bool, True = real token; every caption needs one real token. chunk: query rows per block.
    """

    chunk: int = 64
    needs: ClassVar[tuple[str, ...]] = ("img_tokens", "txt_tokens", "txt_mask")

    def _check_extra(self, img, extra):
        it, tt, tm = extra["img_tokens"], extra["txt_tokens"], extra["txt_mask"]
        b, d = img.shape
        if not isinstance(it, torch.Tensor) or it.dim() != 3 or it.shape[0] != b or it.shape[2] != d:
            raise self._err(f"img_tokens must be [B={b}, N, D={d}], got {tuple(getattr(it, 'shape', ()))}")
        if not isinstance(tt, torch.Tensor) or tt.dim() != 3 or tt.shape[0] != b or tt.shape[2] != d:
            raise self._err(f"txt_tokens must be [B={b}, L, D={d}], got {tuple(getattr(tt, 'shape', ()))}")
        if not isinstance(tm, torch.Tensor) or tm.dtype != torch.bool or tm.shape != tt.shape[:2]:
            raise self._err(
                f"txt_mask must be a bool tensor [B, L]={tuple(tt.shape[:2])}, got "
                f"{getattr(tm, 'dtype', type(tm).__name__)} {tuple(getattr(tm, 'shape', ()))}"
            )
        empty = (~tm.any(1)).nonzero().flatten().tolist()
        if empty:
            raise self._err(f"txt_mask has no real token in rows {empty[:10]} (every caption needs one)")

    def pair_scores(
        self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: torch.Tensor, chunk: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image->text [I, T], text->image [T, I]) late-interaction scores of normalised tokens: what
        FILIP trains, so what its evaluation ranks by (the global embeddings are not trained).
        A small `chunk` bounds the [chunk, T, N, L] block at evaluation sizes."""
        return (
            late_interaction(img_tokens, None, txt_tokens, txt_mask, chunk),
            late_interaction(txt_tokens, txt_mask, img_tokens, None, chunk),
        )

    def compute(self, img, txt, scale, bias, **extra):
        it, tt, tm = extra["img_tokens"], extra["txt_tokens"], extra["txt_mask"]
        rank, _ = dist_info()
        b = img.shape[0]
        off = rank * b
        tt_all, it_all = gather_with_grad(tt, "txt_tokens"), gather_with_grad(it, "img_tokens")
        tm_all = gather_no_grad(tm, "txt_mask")
        s = scale.to(acc_dtype(img)).reshape(())
        logits_i2t = s * late_interaction(it, None, tt_all, tm_all, self.chunk)  # [B, world*B]
        logits_t2i = s * late_interaction(tt, tm, it_all, None, self.chunk)  # [B, world*B]
        labels = torch.arange(off, off + b, device=img.device)
        ce = torch.nn.functional.cross_entropy
        l_i2t, l_t2i = ce(logits_i2t, labels), ce(logits_t2i, labels)
        loss = (l_i2t + l_t2i) / 2
        return loss, {
            "loss_i2t": l_i2t.detach(),
            "loss_t2i": l_t2i.detach(),
            "scale": _stat(scale),
            "acc_i2t": _accuracy(logits_i2t.argmax(1), labels),
            "acc_t2i": _accuracy(logits_t2i.argmax(1), labels),
        }


@register_objective("negclip")
@dataclass
class NegClipObjective(ContrastiveObjective):
    """NegCLIP (Yuksekgonul et al. 2023): CLIP over an enlarged logit matrix.

    - hard_txt [B, D] (required): one hard-negative caption per image (word-order / attribute swap). They
      are extra *columns* of the image->text logits only: a hard caption matches no image, so it is never
      a text->image query.
    - hard_img [B, D] with hard_img_txt [B, D] (optional, both or neither): a hard image (a nearest
      neighbour) and its own true caption are extra pairs: extra rows and columns of the matrix, with the
      positive on the diagonal, as NegCLIP adds the neighbour to the batch.
    - hard_img_hard_txt [B, D] (optional, only with hard_img): the hard image's own hard caption, one
      more image->text column. With it the batch is NegCLIP's (its training code): 2B images and 4B
      texts, [txt; hard_img_txt; hard_txt; hard_img_hard_txt]; without it, 3B texts.

    Image->text: rows [img; hard_img] x columns [txt; hard_img_txt; hard_txt; hard_img_hard_txt];
    text->image: rows [txt; hard_img_txt] x columns [img; hard_img]; each direction averaged over its
    rows, then halved. Which of these the model passes is `hard_images` (the contrastive family reads it
    to ask the data for hard images): True (default) feeds a hard image, its caption and its hard
    caption per sample, NegCLIP's batch, at twice the image-tower work per step; False feeds hard
    captions only (the form this project had before, 1x image work).
    """

    chunk: int = 1024
    hard_images: bool = True
    needs: ClassVar[tuple[str, ...]] = ("hard_txt",)
    optional: ClassVar[tuple[str, ...]] = ("hard_img", "hard_img_txt", "hard_img_hard_txt")

    def _check_extra(self, img, extra):
        self._check_rows(img, extra, "hard_txt")
        has = [extra.get(k) is not None for k in ("hard_img", "hard_img_txt")]
        if any(has) and not all(has):
            raise self._err("hard_img and hard_img_txt come together (a hard image with its own caption)")
        if all(has):
            self._check_rows(img, extra, "hard_img")
            self._check_rows(img, extra, "hard_img_txt")
        if extra.get("hard_img_hard_txt") is not None:
            if not all(has):
                raise self._err("hard_img_hard_txt is the hard image's hard caption: it needs hard_img")
            self._check_rows(img, extra, "hard_img_hard_txt")

    def compute(self, img, txt, scale, bias, **extra):
        hard = extra["hard_txt"]
        if extra.get("hard_img") is not None:
            img = torch.cat([img, extra["hard_img"]])
            txt = torch.cat([txt, extra["hard_img_txt"]])
            if extra.get("hard_img_hard_txt") is not None:
                hard = torch.cat([hard, extra["hard_img_hard_txt"]])
        rank, world = dist_info()
        b = img.shape[0]
        off = rank * b
        txt_all, img_all = gather_with_grad(txt, "txt"), gather_with_grad(img, "img")
        hard_all = gather_with_grad(hard, "hard_txt")
        pos = _positive_logits(img, txt, scale)
        r1 = pair_lse(img, torch.cat([txt_all, hard_all]), scale, chunk=self.chunk)
        r2 = pair_lse(txt, img_all, scale, chunk=self.chunk)
        labels = torch.arange(off, off + b, device=img.device)
        l_i2t = (r1.row - pos).mean()
        l_t2i = (r2.row - pos).mean()
        loss = (l_i2t + l_t2i) / 2
        return loss, {
            "loss_i2t": l_i2t.detach(),
            "loss_t2i": l_t2i.detach(),
            "scale": _stat(scale),
            "acc_i2t": _accuracy(r1.row_arg, labels),
            "acc_t2i": _accuracy(r2.row_arg, labels),
        }


def _log_mean_exp_pairs(
    u: torch.Tensor, v_all: torch.Tensor, offset: int, t: float
) -> tuple[torch.Tensor, int]:
    """Local part of the uniformity sum: sum over local rows i and global columns j != i + offset of
    exp(-t * ||u_i - v_j||^2), and the global number of such ordered pairs."""
    acc = acc_dtype(u)
    u, v_all = u.to(acc), v_all.to(acc)
    sq = ((u * u).sum(-1, keepdim=True) + (v_all * v_all).sum(-1)[None, :] - 2 * u @ v_all.T).clamp_min(0)
    k = torch.exp(-t * sq)
    rows = torch.arange(u.shape[0], device=u.device)
    self_pair = torch.zeros_like(k, dtype=torch.bool)
    self_pair[rows, rows + offset] = True
    k = k.masked_fill(self_pair, 0.0)
    n = v_all.shape[0]
    return k.sum(), n * (n - 1)


#: How unif_align combines its uniformity terms (UnifAlignObjective.unif_mix).
UNIF_MIXES = ("fahim", "mean")


@register_objective("unif_align")
@dataclass
class UnifAlignObjective(ContrastiveObjective):
    """CLIP + w_align * L_align + w_unif * L_unif (Wang & Isola 2020 terms, applied across modalities as in
    Fahim et al. 2024, "It's not a modality gap").

    L_align = mean_i ||x_i - y_i||^2 (alpha = 2).
    L_unif  = (U(img, img) + U(txt, txt)) / 2 + U(img, txt)   (`unif_mix: fahim`, the default: Fahim et
              al.'s L_CLIP + L_align + L_unif + L_xunif, the in-modal terms averaged, the cross-modal term
              added whole); `unif_mix: mean` is this project's earlier form, the plain mean of the three
              terms (so the cross-modal term weighs 1/3 instead of 1). Without `cross_uniformity` both are
              (U(img, img) + U(txt, txt)) / 2. Here U(a, b) = log mean_{i != j} exp(-unif_t*||a_i - b_j||^2)
              (unif_t = 2 as in Wang & Isola; i != j leaves out the self pair in-modal and the positive
              pair cross-modal, which alignment pulls together on purpose).
    Defaults w_align = w_unif = 1.0 are Fahim et al.'s unweighted sum; config values.

    Distributed: U is a log of a global mean, not a mean of per-rank terms. Each rank sums its rows x
    global columns, the sums are all-reduced (no gradient), and the rank's loss carries the surrogate
    log(S/P) + world * (S_rank - S_rank.detach()) / S: its value is the global U and the summed gradient
    over ranks is world * dU, matching what the gathered InfoNCE terms produce.
    """

    chunk: int = 1024
    w_align: float = 1.0
    w_unif: float = 1.0
    unif_t: float = 2.0
    cross_uniformity: bool = True
    unif_mix: str = "fahim"  # "fahim": (U_img + U_txt)/2 + U_cross; "mean": mean of the three terms

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unif_mix not in UNIF_MIXES:
            raise ValueError(
                f"objective {self.name!r}: unif_mix must be one of {UNIF_MIXES}, got {self.unif_mix!r}"
            )

    def _check_extra(self, img, extra):
        if img.shape[0] * dist_info()[1] < 2:
            raise self._err("needs at least 2 pairs in the batch (uniformity averages over distinct pairs)")

    def _uniformity(self, a: torch.Tensor, b_all: torch.Tensor, offset: int, world: int) -> torch.Tensor:
        s_local, pairs = _log_mean_exp_pairs(a, b_all, offset, self.unif_t)
        s_total = all_reduce_sum(s_local)
        value = torch.log(s_total / pairs)
        if world == 1:
            return torch.log(s_local / pairs)
        return value + world * (s_local - s_local.detach()) / s_total

    def compute(self, img, txt, scale, bias, **extra):
        clip_loss, stats = self._infonce(img, txt, scale, chunk=self.chunk, exclude_positive=False)
        rank, world = dist_info()
        off = rank * img.shape[0]
        img_all, txt_all = gather_with_grad(img, "img"), gather_with_grad(txt, "txt")
        align = (img.to(acc_dtype(img)) - txt.to(acc_dtype(img))).pow(2).sum(-1).mean()
        u_img, u_txt = self._uniformity(img, img_all, off, world), self._uniformity(txt, txt_all, off, world)
        in_modal = (u_img + u_txt) / 2
        unif = in_modal
        if self.cross_uniformity:
            cross = self._uniformity(img, txt_all, off, world)
            unif = in_modal + cross if self.unif_mix == "fahim" else (2 * in_modal + cross) / 3
            stats.update(unif_cross=cross.detach())
        loss = clip_loss + self.w_align * align + self.w_unif * unif
        stats.update(loss_clip=clip_loss.detach(), align=align.detach(), unif=unif.detach())
        return loss, stats
