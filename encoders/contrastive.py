"""ContrastiveModel: an image tower and a text tower mapped into one embedding space (CLIP-style).

The model is the *trainable pair*; the loss comes from `encoders.objectives` (CLIP InfoNCE, SigLIP,
FILIP, DCL, NegCLIP, ...), chosen by name in `model.encoder.objective`, so one model class serves every
objective and a new objective never touches this file. `forward(**batch)` returns an output with
`.loss`, so the project's one engine (DeepSpeed ZeRO, checkpoints, resume) trains it unchanged.

Saved folder (written to a temp folder, then renamed into place):

    DIR/contrastive.json    the folder's one meta file (encoders.common.write_meta): kind `contrastive` (or
                            `tips` / `cloc`, whose sections it also holds), format_version, the
                            image-tower config, the encoder settings
    DIR/image_tower/        an ordinary HF vision directory: `build_tower(TowerConfig(type, path=...))`
                            loads it, so a tower trained here is the tower of a MultimodalLM
    DIR/text_tower/         an ordinary HF text-model directory (CLIPTextModel)
    DIR/tokenizer/          the tokenizer that feeds the text tower
    DIR/heads.safetensors   projections and the learnable logit scale / bias

Building one from a recipe (tokenizer included) is `mllm.families.contrastive`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.coca_config import CocaConfig
from encoders.common import (
    ConfigError,
    atomic_dir,
    from_dict,
    load_tokenizer,
    meta_kind,
    read_meta,
    to_dict,
    write_meta,
)
from encoders.objectives import OBJECTIVES, get_objective, init_logit_params
from encoders.text_tower import TextTower, TextTowerConfig, build_text_tower
from encoders.towers import Tower, TowerConfig, build_tower

META_FILE = "contrastive.json"
FORMAT_VERSION = 1
# The kinds whose folder holds a complete contrastive pair (TIPS and CLOC add their parts beside it and
# their sections to contrastive.json), so `ContrastiveModel.from_pretrained` reads all three.
PAIR_KINDS = {"contrastive": FORMAT_VERSION, "tips": FORMAT_VERSION, "cloc": FORMAT_VERSION}
PAIR_KINDS.update(albef=FORMAT_VERSION, degla=FORMAT_VERSION)  # encoders.albef, encoders.degla
IMAGE_POOLS = ("pooler", "mean")


def extension_section(model_dir: Path, kind: str) -> dict[str, Any]:
    """The `kind` section (tips, cloc) of a pair folder's meta, checked, or of its legacy `<kind>.json`
    (folders saved before the section moved into contrastive.json)."""
    meta = read_meta(model_dir / META_FILE, kind, FORMAT_VERSION)
    if kind in meta:
        return meta[kind]
    legacy = model_dir / f"{kind}.json"
    if not legacy.is_file():  # a contrastive folder saved before kinds were written
        raise FileNotFoundError(
            f"{model_dir}: not a {kind.upper()} model folder (no {kind} section in {META_FILE}, no {legacy.name})"
        )
    return read_meta(legacy, kind, 1)[kind]


def is_extension_dir(path: str | Path, kind: str) -> bool:
    """Whether `path` is a saved pair extended by `kind` (tips, cloc), in the current or the legacy layout."""
    path = Path(path)
    if not (path / "image_tower").is_dir():
        return False
    return meta_kind(path / META_FILE) == kind or (path / f"{kind}.json").is_file()


def save_extension_weights(model: torch.nn.Module, keys: list[str], path: Path) -> None:
    """The state-dict entries `keys` of an extended pair (albef, degla: what the plain pair files do not
    hold) as one safetensors file."""
    state = model.state_dict()
    save_file({k: state[k].detach().contiguous().cpu() for k in keys}, str(path))


def load_extension_weights(model: torch.nn.Module, keys: list[str], path: Path) -> None:
    """Load `save_extension_weights`' file into `model`; its keys must be exactly `keys` (else a one-line
    error naming the file and the first differences)."""
    state = load_file(str(path))
    own = set(keys)
    if own != set(state):
        raise ValueError(
            f"{path}: missing {sorted(own - set(state))[:5]}, unexpected {sorted(set(state) - own)[:5]}"
        )
    model.load_state_dict(state, strict=False)


@dataclass
class EncoderConfig:
    """`model.encoder` of a contrastive recipe (validated here, so a typo names its key)."""

    objective: str = "clip"  # registry key of encoders.objectives
    objective_args: dict[str, Any] = field(default_factory=dict)  # passed to get_objective(name, **args)
    embed_dim: int = 128
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    # "pooler": the HF model's own pooled output (CLIP: post-LN CLS; SigLIP: attention-pool head;
    # DINOv2: LN CLS; ResNet: global average; ConvNeXt: LN of the global average); "mean": the mean of
    # the final patch tokens (for a ResNet the same as "pooler").
    image_pool: str = "pooler"
    # Initial logit parameters; None: the objective's own (init_logit_params), else CLIP's log(1/0.07).
    init_log_scale: float | None = None
    init_bias: float | None = None
    # CoCa (encoders.coca): a captioning decoder and attentional poolers on the pair; with `mim`, SyCoCa.
    coca: CocaConfig | None = None

    def __post_init__(self) -> None:
        if self.image_pool not in IMAGE_POOLS:
            raise ConfigError(
                f"model.encoder.image_pool must be one of {IMAGE_POOLS}, got {self.image_pool!r}"
            )
        if self.embed_dim < 1:
            raise ConfigError(f"model.encoder.embed_dim must be positive, got {self.embed_dim}")
        # The objective and its options are checked when the recipe loads (an unknown name, an unknown
        # key, a value out of range), not when the model is built: build it once and drop it.
        if not isinstance(self.objective_args, dict):
            raise ConfigError(
                f"model.encoder.objective_args must be a mapping, got {type(self.objective_args).__name__}"
            )
        try:
            get_objective(self.objective, **self.objective_args)
        except (ValueError, TypeError) as e:
            key = "objective_args" if self.objective_args and self.objective in OBJECTIVES else "objective"
            raise ConfigError(f"model.encoder.{key}: {e}") from e
        if self.coca is not None:
            if type(self) is not EncoderConfig:  # TIPS, CLOC: their models would ignore it
                raise ConfigError(
                    f"model.encoder.coca is an option of model.kind contrastive, not of {type(self).__name__}"
                )
            self.coca.check_objective(get_objective(self.objective, **self.objective_args))

    def pair(self) -> EncoderConfig:
        """The contrastive pair's part alone (a TIPS or CLOC config less its own section)."""
        return EncoderConfig(**{f.name: getattr(self, f.name) for f in fields(EncoderConfig)})


def encoder_config(raw: dict[str, Any] | EncoderConfig | None) -> EncoderConfig:
    """`model.encoder` of a contrastive recipe as an EncoderConfig (validated when built)."""
    return raw if isinstance(raw, EncoderConfig) else from_dict(EncoderConfig, raw or {}, "model.encoder")


def _initial_logit_params(cfg: EncoderConfig) -> tuple[float, float | None]:
    """The objective's declared initial (log_scale, bias), overridden by the recipe where it says so.

    A bias exists only for objectives that use one (SigLIP); `init_bias` cannot add one to others.
    """
    init = init_logit_params(cfg.objective)
    log_scale = init.log_scale if cfg.init_log_scale is None else cfg.init_log_scale
    bias = init.bias if cfg.init_bias is None or init.bias is None else cfg.init_bias
    return float(log_scale), (None if bias is None else float(bias))


class ContrastiveHeads(nn.Module):
    """Linear projections to the shared space and the learnable temperature (and bias, for sigmoid losses)."""

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int,
        log_scale: float,
        bias: float | None,
        objective_state: nn.Module | None = None,
    ):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        # 1-element tensors, not 0-d: ZeRO flattens parameters and some versions mishandle 0-d ones.
        self.logit_scale = nn.Parameter(torch.tensor([log_scale]))
        self.logit_bias = nn.Parameter(torch.tensor([bias])) if bias is not None else None
        # An objective's own parameters (FDT's codebook: `objective.make_state(embed_dim)`), trained and
        # saved with the heads; its `extras()` are passed to the objective by name.
        self.objective_state = objective_state


def objective_state(cfg: EncoderConfig) -> nn.Module | None:
    """The parameters an objective asks the model to keep (`make_state`), or None (most objectives)."""
    make = getattr(get_objective(cfg.objective, **cfg.objective_args), "make_state", None)
    return make(cfg.embed_dim) if make is not None else None


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor | None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's; logged by the engine


class ContrastiveModel(nn.Module):
    KIND = "contrastive"  # the `kind` of its saved folder (encoders.common.write_meta)

    def __init__(
        self,
        image_tower: Tower,
        text_tower: TextTower,
        cfg: EncoderConfig,
        heads: ContrastiveHeads | None = None,
    ):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.cfg = cfg
        if heads is None:
            # output_size, not hidden_size: the heads see the final outputs, whatever layer an MLLM selects
            heads = ContrastiveHeads(
                image_tower.output_size,
                text_tower.hidden_size,
                cfg.embed_dim,
                *_initial_logit_params(cfg),
                objective_state=objective_state(cfg),
            )
        self.heads = heads
        # Kept out of the module tree: the objective is a function of embeddings, not part of the weights.
        self.__dict__["objective"] = get_objective(cfg.objective, **cfg.objective_args)
        self._logit_init = init_logit_params(cfg.objective)  # how the log scale becomes a scale (clamp)

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self):
        return self.text_tower.tokenizer

    @property
    def needs(self) -> frozenset[str]:
        """Extra inputs the objective asks for (img_tokens, txt_tokens, txt_mask, hard_txt)."""
        return frozenset(getattr(self.objective, "needs", ()) or ())

    def logit_scale(self) -> torch.Tensor:
        """exp(log scale), capped where the objective says (CLIP: at 100); a 1-element tensor. The cap is
        kept by `after_step`'s clamp of the parameter; here it is only a guard (LogitInit)."""
        return self._logit_init.scale_from_log(self.heads.logit_scale)

    def after_step(self) -> None:
        """Called by the training engine after each applied optimiser step: clamp the log-scale parameter
        to the objective's range (CLIP and its kin: [0, ln 100]), as open_clip does, instead of capping
        the scale in the forward pass, whose gradient is 0 above the cap (LogitInit)."""
        self._logit_init.clamp_log_scale_(self.heads.logit_scale)

    def logit_bias(self) -> torch.Tensor | None:
        return self.heads.logit_bias

    # ------------------------------------------------------------------ encoding
    def encode_image(self, pixel_values: torch.Tensor, tokens: bool = False):
        """Normalised image embeddings [B, E]; with `tokens`, also normalised patch embeddings [B, N, E]."""
        tower = self.image_tower
        hidden, pooled = tower.final_outputs(pixel_values)
        patches = hidden[:, tower.num_prefix_tokens :]
        if self.cfg.image_pool == "mean" or pooled is None:
            pooled = patches.mean(1)
        emb = F.normalize(self.heads.image_proj(pooled), dim=-1)
        pool = getattr(self.objective, "embed_tokens", None)  # FDT: the embedding is the objective's
        if not tokens and pool is None:
            return emb
        tok = F.normalize(self.heads.image_proj(patches), dim=-1)
        if pool is not None:
            emb = pool(tok, None, **self.heads.objective_state.extras())
        return (emb, tok) if tokens else emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: bool = False):
        """Normalised text embeddings [B, E]; with `tokens`, also normalised token embeddings [B, T, E]
        (padding positions are embedded too; `attention_mask` says which are real)."""
        pooled, hidden = self.text_tower(input_ids, attention_mask)
        emb = F.normalize(self.heads.text_proj(pooled), dim=-1)
        pool = getattr(self.objective, "embed_tokens", None)  # FDT: the embedding is the objective's
        if not tokens and pool is None:
            return emb
        tok = F.normalize(self.heads.text_proj(hidden), dim=-1)
        if pool is not None:
            emb = pool(tok, attention_mask.bool(), **self.heads.objective_state.extras())
        return (emb, tok) if tokens else emb

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        hard_input_ids: torch.Tensor | None = None,
        hard_attention_mask: torch.Tensor | None = None,
        hard_pixel_values: torch.Tensor | None = None,
        hard_img_input_ids: torch.Tensor | None = None,
        hard_img_attention_mask: torch.Tensor | None = None,
        hard_img_hard_input_ids: torch.Tensor | None = None,
        hard_img_hard_attention_mask: torch.Tensor | None = None,
        sub_input_ids: torch.Tensor | None = None,
        sub_attention_mask: torch.Tensor | None = None,
        syn_input_ids: torch.Tensor | None = None,
        syn_attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> ContrastiveOutput:
        """The objective's loss on a batch of matching (image, text) pairs (row i matches row i).

        `hard_*`: NegCLIP's extras: each image's hard caption; with `hard_images` on the objective and in
        the batch (mllm.data.captions), each sample's hard image, its caption and its hard caption."""
        needs = self.needs
        extra: dict[str, torch.Tensor] = {}
        if needs & {"img_tokens", "txt_tokens", "txt_mask"}:
            img, img_tok = self.encode_image(pixel_values, tokens=True)
            txt, txt_tok = self.encode_text(input_ids, attention_mask, tokens=True)
            extra.update(img_tokens=img_tok, txt_tokens=txt_tok, txt_mask=attention_mask.bool())
        else:
            img = self.encode_image(pixel_values)
            txt = self.encode_text(input_ids, attention_mask)
        if "hard_txt" in needs:
            if hard_input_ids is None or hard_attention_mask is None:
                raise ValueError(
                    f"objective {self.cfg.objective!r} needs hard negative captions; the batch has "
                    "none (the data must carry GeoWorld `negatives`)"
                )
            extra["hard_txt"] = self.encode_text(hard_input_ids, hard_attention_mask)
            if getattr(self.objective, "hard_images", False) and hard_pixel_values is not None:
                if hard_img_input_ids is None or hard_img_hard_input_ids is None:
                    raise ValueError("the batch has hard images without their captions and hard captions")
                extra["hard_img"] = self.encode_image(hard_pixel_values)
                extra["hard_img_txt"] = self.encode_text(hard_img_input_ids, hard_img_attention_mask)
                extra["hard_img_hard_txt"] = self.encode_text(
                    hard_img_hard_input_ids, hard_img_hard_attention_mask
                )
        if "sub_txt" in needs:  # DreamLIP: K sub-captions per image (mllm.data.captions `sub_captions`)
            if sub_input_ids is None or sub_attention_mask is None:
                raise ValueError(
                    f"objective {self.cfg.objective!r} needs sub-captions; the batch has none "
                    "(set the stage's data.sub_captions to K > 0)"
                )
            extra["sub_txt"] = self.encode_text(sub_input_ids, sub_attention_mask)
        if "syn_txt" in needs:  # ALIP: each image's synthetic caption (GeoWorld's `synthetic`)
            if syn_input_ids is None or syn_attention_mask is None:
                raise ValueError(
                    f"objective {self.cfg.objective!r} needs synthetic captions; the batch has none"
                )
            extra["syn_txt"] = self.encode_text(syn_input_ids, syn_attention_mask)
        if self.heads.objective_state is not None:
            extra.update(self.heads.objective_state.extras())
        wanted = needs | set(getattr(self.objective, "optional", ()))
        extra = {k: v for k, v in extra.items() if k in wanted}
        loss, stats = self.objective(img, txt, self.logit_scale(), self.logit_bias(), **extra)
        return ContrastiveOutput(loss, stats)

    # ------------------------------------------------------------------ convenience (evaluation)
    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Normalised embeddings of PIL images, in batches (float32, on the model's device)."""
        out = []
        for s in range(0, len(images), batch_size):
            pv = self.image_tower.preprocess(images[s : s + batch_size])
            out.append(self.encode_image(pv).float())
        return torch.cat(out) if out else torch.empty(0, self.cfg.embed_dim)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        device = self.image_tower.device
        for s in range(0, len(texts), batch_size):
            ids, mask = self.text_tower.tokenize(texts[s : s + batch_size])
            out.append(self.encode_text(ids.to(device), mask.to(device)).float())
        return torch.cat(out) if out else torch.empty(0, self.cfg.embed_dim)

    @torch.no_grad()
    def match_scores(
        self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image->text [I, T], text->image [T, I]) scores, the way this model's objective compares a pair.

        Why not always the global embeddings' cosine: an objective that scores pairs its own way
        (`pair_scores`, e.g. FILIP's token-wise late interaction) never trains the global embeddings, so
        ranking by them measures an untrained head, not the model. For every other objective the two
        directions are the one cosine matrix and its transpose."""
        pair = getattr(self.objective, "pair_scores", None)
        if pair is None:
            sim = self.embed_images(images, batch_size) @ self.embed_texts(texts).T
            return sim, sim.T
        device = self.image_tower.device
        img_tok = []
        for s in range(0, len(images), batch_size):
            pv = self.image_tower.preprocess(images[s : s + batch_size])
            img_tok.append(self.encode_image(pv, tokens=True)[1].float())
        ids, mask = self.text_tower.tokenize(texts)  # one padding width for every caption
        txt_tok = torch.cat(
            [
                self.encode_text(ids[s : s + 256].to(device), mask[s : s + 256].to(device), tokens=True)[1]
                for s in range(0, len(texts), 256)
            ]
        ).float()
        return pair(torch.cat(img_tok), txt_tok, mask.bool().to(device))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write every part to a temporary folder beside `out_dir`, then rename it into place."""
        with atomic_dir(out_dir) as tmp:
            self.write_parts(tmp)
        return Path(out_dir)

    def write_parts(self, folder: Path) -> None:
        """The ContrastiveModel files into `folder` (CLOC and TIPS add theirs beside them)."""
        self.image_tower.save_pretrained(folder / "image_tower")
        self.text_tower.save_pretrained(folder / "text_tower")
        self.tokenizer.save_pretrained(str(folder / "tokenizer"))
        save_file(
            {k: v.detach().contiguous().cpu().float() for k, v in self.heads.state_dict().items()},
            str(folder / "heads.safetensors"),
        )
        write_meta(folder / META_FILE, self.KIND, FORMAT_VERSION, self.meta())

    def meta(self) -> dict[str, Any]:
        """What contrastive.json holds besides its kind and version (subclasses add their section)."""
        enc = to_dict(self.cfg.pair())
        enc["text"] = dict(enc["text"], path="text_tower", config={})
        return {
            "image_tower": dict(asdict(self.image_tower.config), path="image_tower", config={}),
            "encoder": enc,
        }

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ContrastiveModel:
        """The pair saved in `model_dir`: a contrastive folder, or the pair inside a TIPS or CLOC one."""
        model_dir = Path(model_dir)
        meta = read_meta(model_dir / META_FILE, PAIR_KINDS)
        tower_cfg = TowerConfig(
            **dict(meta["image_tower"], path=str(model_dir / meta["image_tower"]["path"]))
        )
        enc = encoder_config(meta["encoder"])
        enc.text.path = str(model_dir / meta["encoder"]["text"]["path"])
        tok = load_tokenizer(model_dir / "tokenizer")
        image_tower = build_tower(tower_cfg)
        text_tower = build_text_tower(enc.text, tok)
        weights = load_file(str(model_dir / "heads.safetensors"))
        heads = ContrastiveHeads(
            image_tower.output_size,
            text_tower.hidden_size,
            enc.embed_dim,
            0.0,
            0.0 if "logit_bias" in weights else None,
            objective_state=objective_state(enc),
        )
        heads.load_state_dict(weights)
        return cls(image_tower, text_tower, enc, heads).eval()
