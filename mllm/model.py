"""MultimodalLM: a vision tower, a projector and any Hugging Face causal LM.

Image embeddings are scattered into the positions of the expanded `<image>` placeholder tokens in
one vectorised `masked_scatter` (transformers' LLaVA convention), so there is no per-sample Python
loop and a single-tower model maps onto `LlavaForConditionalGeneration` by renaming keys.

A saved model is a folder of parts in their native formats: `lm/` and `tower/` are ordinary Hugging
Face directories (usable alone), `projector.safetensors` holds the projector, `tokenizer/` the
tokenizer, and `mllm.json` (the folder's one meta file: kind `mllm`, format_version) how they fit together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from encoders.common import KIND_KEY, atomic_dir, read_meta, write_meta
from encoders.fusion import StreamProjectors
from encoders.towers import Tower, TowerConfig, build_tower
from mllm.chat import IGNORE_INDEX, check_image_placement
from mllm.config import FusionConfig
from mllm.data.packing import check_packing_support
from mllm.hf_import import is_llava_dir, read_llava
from mllm.lm_init import apply_lm_init
from mllm.projectors import build_projector
from mllm.readout import LOOK_TOKEN, build_readout, look_inputs, look_words
from mllm.tokenizer import load_tokenizer
from mllm.vision import Fusion, build_fusion, fusion_from_meta

FORMAT_VERSION = 1
# Per-shard progress bars for a model of a few MB are noise in every log line of a run.
hf_logging.disable_progress_bar()


@dataclass
class MultimodalMeta:
    """What `from_pretrained` needs beyond the parts' own configs."""

    tower: dict[str, Any] = field(default_factory=dict)  # TowerConfig fields (path rewritten on save)
    projector: str = "mlp2x_gelu"
    image_token: str = "<image>"
    image_token_id: int = -1
    template: str = "chatml"
    max_length: int = 512
    # How this model writes boxes in text (grounding): "norm1" (0-1), "norm1000" or "pixel", relative to
    # the padded square image when the tower pads to square. Evaluators read it instead of guessing.
    box_format: str = "norm1"
    # Where the `<image>` marker goes beside a question (mllm.chat.IMAGE_PLACEMENTS): what the model was
    # trained with, so evaluation, chat and serving ask it the same way.
    image_placement: str = "before"
    format_version: int = FORMAT_VERSION
    # Fused vision side only (mllm.vision): a FusionConfig as a dict. Absent from a single-tower mllm.json.
    fusion: dict[str, Any] | None = None
    # A question-conditioned readout (mllm.readout): its config and the look token it fills after every
    # question. Absent from the mllm.json of a model without one.
    readout: dict[str, Any] | None = None
    look_token: str | None = None
    look_token_id: int = -1


@dataclass
class MultimodalOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    num_loss_tokens: int = 0


def build_lm(
    path: str | None,
    config: dict[str, Any],
    vocab_size: int,
    attn: str = "sdpa",
    trust_remote_code: bool = False,
    init: str = "default",
) -> PreTrainedModel:
    """A causal LM from a local directory, or from config kwargs (`model_type` picks the class) with its
    weights started by `init` (`mllm.lm_init.LM_INITS`)."""
    if path and init != "default":
        raise ValueError(
            f"model.lm.init {init!r} applies to an LM built from model.lm.config; "
            f"a pretrained LM ({path}) keeps its weights"
        )
    if path:
        lm = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=True,
            attn_implementation=attn,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # weights never from pickle files
        )
    else:
        cfg = dict(config)
        model_type = cfg.pop("model_type", "llama")
        cfg["vocab_size"] = vocab_size
        hf_cfg = AutoConfig.for_model(model_type, **cfg)
        lm = AutoModelForCausalLM.from_config(
            hf_cfg, attn_implementation=attn, trust_remote_code=trust_remote_code
        )
        apply_lm_init(lm, init)
    if lm.get_input_embeddings().num_embeddings < vocab_size:
        lm.resize_token_embeddings(vocab_size)
    return lm


class MultimodalLM(nn.Module):
    def __init__(
        self,
        tower: Tower,
        projector: nn.Module,
        lm: PreTrainedModel,
        meta: MultimodalMeta,
        tokenizer: PreTrainedTokenizerBase | None = None,
        fusion: Fusion | None = None,
        parts: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.tower = tower
        self.projector = projector
        self.lm = lm
        self.meta = meta
        self.tokenizer = tokenizer
        # Fused vision side (mllm.vision): extra modules (tower2 / geo / router) beside tower and projector.
        self.fusion = fusion
        for name, module in (parts or {}).items():
            self.add_module(name, module)
        if "readout" not in self._modules:
            self.readout: nn.Module | None = None  # mllm.readout; set through `parts`

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        tower_cfg: TowerConfig,
        projector: str,
        lm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        image_token: str = "<image>",
        template: str = "chatml",
        max_length: int = 512,
        load_tower_weights: bool = True,
        box_format: str = "norm1",
        fusion: FusionConfig | None = None,
        image_placement: str = "before",
        readout: dict[str, Any] | None = None,
    ) -> MultimodalLM:
        tower = build_tower(tower_cfg, load_weights=load_tower_weights)
        d_llm = lm.get_input_embeddings().embedding_dim
        fuse, parts = None, {}
        if fusion is not None:
            fuse = build_fusion(fusion)
            parts = fuse.build_parts(tower, projector, d_llm, load_weights=load_tower_weights)
            proj = parts.pop("projector")
        else:
            proj = build_projector(projector, tower.hidden_size, d_llm)
        look_id = -1
        if readout is not None:
            vocab = lm.get_input_embeddings().num_embeddings
            parts["readout"] = _build_readout(readout, tower, fuse, parts, proj, d_llm, vocab)
            look_id = tokenizer.convert_tokens_to_ids(LOOK_TOKEN)
            if look_id is None or look_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"model.readout needs {LOOK_TOKEN} in the tokenizer (mllm.tokenizer.ensure_look_token)"
                )
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        meta = MultimodalMeta(
            tower=asdict(tower_cfg),
            projector=projector,
            image_token=image_token,
            image_token_id=int(image_token_id),
            template=template,
            max_length=max_length,
            box_format=box_format,
            image_placement=check_image_placement(image_placement),
            fusion=asdict(fusion) if fusion is not None else None,
            readout=dict(readout) if readout is not None else None,
            look_token=LOOK_TOKEN if readout is not None else None,
            look_token_id=int(look_id),
        )
        return cls(tower, proj, lm, meta, tokenizer, fuse, parts)

    @property
    def num_image_tokens(self) -> int:
        """Placeholder positions per image: N for one tower, 2N for interleaved MoF (see mllm.vision)."""
        return self.fusion.num_tokens(self) if self.fusion is not None else self.tower.num_tokens

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the `pixel_values` this model's `encode_images` takes (one tensor per batch)."""
        return (
            self.fusion.preprocess(self, images) if self.fusion is not None else self.tower.preprocess(images)
        )

    @property
    def image_token_id(self) -> int:
        return self.meta.image_token_id

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, N, d_llm] in the LM's dtype."""
        if self.fusion is not None and not self.fusion.single_grid:
            return self.fusion.encode(self, pixel_values)
        return self.project_features(self.grid_features(pixel_values))

    def grid_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pre-projector tokens on the tower's patch grid: the tower's own, a single-grid fusion's
        (additive MoF's mixture, SVE-Math's routed tokens), or interleaved MoF's first stream. What a
        readout reads beside the projected tokens. Unlike `tower_features` it is never cached: a fusion's
        parts may train (the router)."""
        if self.fusion is not None:
            return self.fusion.features(self, pixel_values)
        return self.tower_features(pixel_values)

    @property
    def grid_projector(self) -> nn.Module:
        """The projector of `grid_features`: `projector`, or interleaved MoF's first stream's. Where an
        anchored projector's heads, anchors and counts are read."""
        return self.fusion.grid_projector(self.projector) if self.fusion is not None else self.projector

    def encode_with_grid(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings for the LM, `grid_features`, the grid's projected tokens), each computed
        once: what `embed` needs when a readout reads the grid."""
        if self.fusion is not None and not self.fusion.single_grid:
            return self.fusion.encode_with_grid(self, pixel_values)
        feats = self.grid_features(pixel_values)
        img = self.project_features(feats)
        return img, feats, img

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> the pre-projector tokens [n_images, N, D].

        The split point of `encode_images`: everything before it is what `mllm.feature_cache` stores
        for a stage that freezes the tower, everything after it (`project_features`) still trains.
        """
        if self.fusion is not None:
            raise NotImplementedError(
                f"{self.meta.fusion['type']} fusion has no single pre-projector feature "
                "tensor to cache; train fused models without the feature cache"
            )
        return self.tower(pixel_values.to(self._param_dtype(self.tower))).tokens

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-projector tokens (computed now or read from the feature cache) -> image embeddings."""
        return self.project_with(self.projector, features)

    def project_with(self, projector: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """`features` through `projector` (this model's, or one stream's of a fused model), in its dtype,
        with the LM's input embeddings where the projector reads them (mllm.projectors.AnchoredProjector)."""
        x = features.to(self._param_dtype(projector))
        if getattr(projector, "reads_lm_embeddings", False):
            return projector(x, self.lm.get_input_embeddings())
        return projector(x)

    def gradient_checkpointing_enable(self) -> list[str]:
        """Recompute layer activations in backward in every Hugging Face model inside (LM, towers).

        Non-reentrant checkpointing (`use_reentrant=False`) is the form that works when a block's
        inputs need no gradient (a frozen tower, a frozen LM under a trained projector). Returns the
        names of the modules it was enabled on.
        """
        done: list[str] = []
        for name, m in self.named_modules():
            if not isinstance(m, PreTrainedModel) or not m.supports_gradient_checkpointing:
                continue
            if any(name.startswith(d + ".") for d in done):
                continue  # an inner model of one already switched (LlamaModel inside LlamaForCausalLM)
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x name
                m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            done.append(name)
        return done

    @staticmethod
    def _param_dtype(module: nn.Module) -> torch.dtype:
        for p in module.parameters():
            return p.dtype
        return torch.float32

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image embeddings scattered into the placeholder positions, and each look
        position (a readout's, mllm.readout) filled from its image and the question before it.

        `image_features` (pre-projector tokens from the feature cache) replace `pixel_values`.
        """
        return self._embed(input_ids, pixel_values, image_features, attention_mask)[0]

    def _embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        look_targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`embed`, and the readout's grounding loss when `look_targets` are given (else None)."""
        is_image = input_ids == self.image_token_id
        # The placeholder id may be outside a resized-but-unused range; embed a safe id there instead.
        safe_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.lm.get_input_embeddings()(safe_ids)
        n_slots = int(is_image.sum())
        source = image_features if image_features is not None else pixel_values
        if source is None or source.shape[0] == 0:
            if n_slots:
                raise ValueError(f"{n_slots} image positions in the batch but no pixel_values")
            return embeds, None
        feats = tokens = None
        if image_features is not None:
            feats = image_features
            img = tokens = self.project_features(image_features)
        elif self.readout is not None:
            img, feats, tokens = self.encode_with_grid(pixel_values)
        else:
            img = self.encode_images(pixel_values)
        if img.shape[0] * img.shape[1] != n_slots:
            raise ValueError(
                f"{source.shape[0]} image(s) yield {img.shape[0] * img.shape[1]} embeddings "
                f"but the batch has {n_slots} image positions"
            )
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), img.to(embeds.dtype))
        if self.readout is not None and feats is not None:
            return self._fill_looks(input_ids, embeds, feats, attention_mask, look_targets, tokens)
        return embeds, None

    def _fill_looks(
        self,
        input_ids: torch.Tensor,
        embeds: torch.Tensor,
        features: torch.Tensor,
        attention_mask: torch.Tensor | None,
        targets: torch.Tensor | None,
        tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the readout's embedding at every look position (see mllm.readout); `tokens` are the
        projected image tokens (a readout that pools them)."""
        if not bool((input_ids == self.meta.look_token_id).any()):
            return embeds, None
        words = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool)
        )
        if self.tokenizer is not None:  # the template's markers say nothing about the question
            words &= ~torch.isin(
                input_ids, torch.tensor(self.tokenizer.all_special_ids, device=input_ids.device)
            )
        table = getattr(self.readout, "words", None)  # a readout's own word table, else the LM's
        text = table(input_ids.clamp(max=table.num_embeddings - 1)) if table is not None else embeds
        # which look's question each position is in: what the queries average, and (below) the words a
        # counter or an ordered readout reads one by one
        look = look_words(input_ids, self.meta.look_token_id, self.image_token_id, words)
        queries, index, is_look = look_inputs(
            input_ids,
            text,
            self.meta.look_token_id,
            self.image_token_id,
            self.num_image_tokens,
            words,
            look,
        )
        if targets is not None and targets.shape[0] != index.shape[0]:
            raise ValueError(
                f"look_targets has {targets.shape[0]} rows but the batch has {index.shape[0]} looks"
            )
        rp = self._param_dtype(self.readout)
        extra = {}
        if getattr(self.readout, "count", 0) > 0:
            # a counting readout sums the warm-up's per-patch heads (mllm.readout); read, not trained, here
            with torch.no_grad():
                proj = self.grid_projector
                maps = proj.count_maps(features.to(self._param_dtype(proj)))
            extra["count_maps"] = (maps[0].to(rp), tuple(w.to(rp) for w in maps[1]))
        if getattr(self.readout, "count", 0) > 0 or getattr(self.readout, "order", None) is not None:
            # the question's words one by one (mllm.readout): what a counter selects with, and what an
            # ordered readout weighs by place
            extra["words"] = (text[look >= 0].to(rp), look[look >= 0])
        if getattr(self.readout, "where_gate", None) is not None:  # the attended side as words
            extra["where_rows"] = self.readout.where_table(self.lm.get_input_embeddings()).to(rp)
        if getattr(self.readout, "relation_gate", None) is not None:  # the two roles' places as words
            extra["relation_rows"] = self.readout.relation_table(self.lm.get_input_embeddings()).to(rp)
        looks, ground = self.readout(features.to(rp), queries.to(rp), index, targets, tokens, **extra)
        return embeds.masked_scatter(is_look.unsqueeze(-1), looks.to(embeds.dtype)), ground

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = False,
        image_features: torch.Tensor | None = None,
        look_targets: torch.Tensor | None = None,
        **_: Any,
    ) -> MultimodalOutput:
        """Next-token loss, optionally weighted per token (PRIOR), over labelled positions only.

        The LM head is applied only where a label exists: with a 150k vocabulary, full-sequence
        logits are most of a step's activation memory, and most positions (prompt, image) carry none.

        Packed rows (`mllm.data.packing`): `position_ids` restart at 0 for each sample and
        `attention_mask` is None; transformers' mask code then builds the block-diagonal causal mask
        (SDPA/eager) or flash-attn's varlen boundaries from the position ids, so no sample sees another.
        """
        if attention_mask is None and position_ids is not None:
            check_packing_support(self.lm)
        embeds, ground = self._embed(input_ids, pixel_values, image_features, attention_mask, look_targets)
        base = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.base_model
        out = base(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        head = self.lm.get_output_embeddings()
        if labels is None:
            return MultimodalOutput(None, head(hidden))
        shift_labels = labels[:, 1:]
        valid = shift_labels != IGNORE_INDEX
        h = hidden[:, :-1][valid]
        logits = head(h).float()
        ce = F.cross_entropy(logits, shift_labels[valid], reduction="none")
        n = int(valid.sum())
        if token_weights is not None:
            ce = ce * token_weights[:, 1:][valid].to(ce.dtype)
        loss = ce.sum() / max(n, 1)
        if ground is not None:
            # the look's grounding (and counting) losses, weighted by the readout (mllm.readout; training
            # on GeoWorld's scene graphs only)
            loss = loss + ground.to(loss.dtype)
        return MultimodalOutput(loss, logits if return_logits else None, n)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_token_ids: list[int] | None = None,
        streamer: Any = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """New token ids [B, T] (prompt excluded), using the LM's own KV-cached `generate`.

        Prompts must be left-padded so every row's last position is its last prompt token.
        `generate_kwargs` go to the LM's `generate` as they are (a server's per-row stopping criteria
        and logits processors, `mllm.serving.engine`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values, attention_mask=attention_mask)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if stop_token_ids:
            kwargs["eos_token_id"] = stop_token_ids
        return self.lm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            streamer=streamer,
            **kwargs,
            **generate_kwargs,
        )

    # ------------------------------------------------------------------ persistence
    def with_fusion(self, fusion: FusionConfig) -> MultimodalLM:
        """This model with a second source of image features fused in (MoF's second tower, SVE-Math's
        geometric encoder and router), sharing this model's modules.

        Why: the fusion claims add to a vision side that already works; grafting the fusion onto a trained
        single-tower model (its warmed-up tower, its anchored projector, its readout) makes a fused arm
        differ from the single-tower one by the fusion alone. So:
        - additive MoF (the tower's width and grid): the projector and readout read the mixture;
        - interleaved MoF: the first stream is this model's tower, projector and readout, unchanged; the
          second stream's fresh projector starts silent (its last layer zero: zero tokens have zero keys
          and values after the LM's RMSNorm), so the LM starts from what it had learned, plus as many
          silent positions per image as the second stream adds. `max_length` grows by those positions,
          so a one-image conversation keeps the text budget it had;
        - the residual router (tower width, its branch starting at zero) keeps the projector and readout,
          and the grafted model answers exactly as this one did until the router trains;
        - a fusion that changes the grid's width (the concatenating router) takes its fresh projector,
          and a readout (built for the tower's width) is refused."""
        if self.fusion is not None:
            raise ValueError(f"the model is already fused ({self.meta.fusion['type']})")
        fuse = build_fusion(fusion)
        d_llm = self.lm.get_input_embeddings().embedding_dim
        parts = fuse.build_parts(self.tower, self.meta.projector, d_llm)
        fresh = parts.pop("projector")
        same_grid = fuse.feature_dim(self.tower, parts) == self.tower.hidden_size
        if isinstance(fresh, StreamProjectors):
            _silence(fresh[1])
            projector: nn.Module = StreamProjectors([self.projector, fresh[1]])
        else:
            projector = self.projector if same_grid else fresh
        if self.readout is not None:
            if not same_grid:
                raise ValueError(
                    f"fusion {fusion.type!r} changes the features' width or grid, which this model's readout "
                    "was built for; graft it onto a model without a readout"
                )
            parts["readout"] = self.readout
        meta = replace(self.meta, fusion=asdict(fusion))
        out = MultimodalLM(self.tower, projector, self.lm, meta, self.tokenizer, fuse, parts)
        added = out.num_image_tokens - self.num_image_tokens
        out.meta = replace(meta, max_length=meta.max_length + added)
        return out

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write every part to a temporary folder beside `out_dir`, then rename it into place.

        A crash while saving leaves either the old folder or none, never a half-written model.
        """
        with atomic_dir(out_dir) as tmp:
            self.tower.save_pretrained(tmp / "tower")
            self.lm.save_pretrained(tmp / "lm", safe_serialization=True)
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
                str(tmp / "projector.safetensors"),
            )
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            meta = asdict(self.meta)
            meta["tower"] = dict(meta["tower"], path="tower")
            if self.fusion is not None:
                meta["fusion"] = self.fusion.save_parts(self, tmp)
            else:
                del meta["fusion"]  # single-tower mllm.json keeps its original fields (plus its kind)
            if self.readout is not None:
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in self.readout.state_dict().items()},
                    str(tmp / "readout.safetensors"),
                )
            else:
                for key in ("readout", "look_token", "look_token_id"):
                    del meta[key]
            if meta["image_placement"] == "before":
                del meta["image_placement"]  # LLaVA's placement, the default when the field is absent
            write_meta(tmp / "mllm.json", "mllm", FORMAT_VERSION, meta)
        return Path(out_dir)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, torch_dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"
    ) -> MultimodalLM:
        model_dir = Path(model_dir)
        meta_path = model_dir / "mllm.json"
        if not meta_path.is_file() and (model_dir / "config.json").is_file():  # a transformers LLaVA folder
            if is_llava_dir(model_dir):
                return load_llava(model_dir, torch_dtype, attn_implementation)
        if not meta_path.is_file():
            raise FileNotFoundError(f"{model_dir}: not an mllm model folder (no mllm.json)")
        raw = read_meta(meta_path, "mllm", FORMAT_VERSION)
        raw.pop(KIND_KEY)
        meta = MultimodalMeta(**raw)
        tower_cfg = TowerConfig(**dict(meta.tower, path=str(model_dir / meta.tower["path"])))
        tower = build_tower(tower_cfg, load_weights=True)
        lm = AutoModelForCausalLM.from_pretrained(
            str(model_dir / "lm"),
            local_files_only=True,
            use_safetensors=True,
            attn_implementation=attn_implementation,
        )
        d_llm = lm.get_input_embeddings().embedding_dim
        fuse, parts = None, {}
        if meta.fusion is not None:
            fuse = fusion_from_meta(meta.fusion)
            parts = fuse.build_parts(tower, meta.projector, d_llm, model_dir=model_dir)
            proj = parts.pop("projector")
        else:
            proj = build_projector(meta.projector, tower.hidden_size, d_llm)
        proj.load_state_dict(load_file(str(model_dir / "projector.safetensors")))
        if meta.readout is not None:
            vocab = lm.get_input_embeddings().num_embeddings
            readout = _build_readout(meta.readout, tower, fuse, parts, proj, d_llm, vocab)
            readout.load_state_dict(load_file(str(model_dir / "readout.safetensors")))
            parts["readout"] = readout
        tok = load_tokenizer(model_dir / "tokenizer") if (model_dir / "tokenizer").is_dir() else None
        model = cls(tower, proj, lm, meta, tok, fuse, parts)
        if torch_dtype is not None:
            model.to(torch_dtype)
        return model.eval()


def _build_readout(
    cfg: dict[str, Any],
    tower: Tower,
    fuse: Fusion | None,
    parts: dict[str, nn.Module],
    projector: nn.Module,
    d_llm: int,
    vocab: int,
) -> nn.Module:
    """The readout over the grid it reads: the tower's, a single-grid fusion's, or a multi-stream
    fusion's first stream (whose projector's heads a counting readout sums)."""
    if fuse is None:
        width, grid = tower.hidden_size, projector
    else:
        width, grid = fuse.feature_dim(tower, parts), fuse.grid_projector(projector)
    return build_readout(cfg, width, d_llm, vocab, getattr(grid, "count_words", ()))


def _silence(projector: nn.Module) -> None:
    """Zero a fresh projector's last Linear, so the stream it projects starts as zero tokens."""
    last = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"cannot start {type(projector).__name__} silent: it has no Linear layer")
    nn.init.zeros_(last[-1].weight)
    if last[-1].bias is not None:
        nn.init.zeros_(last[-1].bias)


def load_llava(
    model_dir: str | Path,
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    template: str | None = None,
) -> MultimodalLM:
    """A `MultimodalLM` holding the weights of the transformers LLaVA directory `model_dir` (mllm.hf_import
    reads it). The conversation template comes from `template`, else from the export's
    `mllm_export.json`, else LLaVA-1.5's `vicuna_v1`."""
    parts = read_llava(model_dir, torch_dtype, attn_implementation, template)
    model = MultimodalLM(
        parts.tower, parts.projector, parts.lm, MultimodalMeta(**parts.meta), parts.tokenizer
    )
    return model.eval()
