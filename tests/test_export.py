"""`mllm export --format hf` -> transformers LlavaForConditionalGeneration, and the import back.

Every check runs the real transformers classes on what was written to disk: `from_pretrained` of the
model and of the processor, the processor's own `<image>` expansion and pixels, and logits against
`MultimodalLM` on the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_LM, TINY_TOWER
from PIL import Image
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from encoders.towers import TowerConfig
from mllm import cli
from mllm.chat import encode_conversation
from mllm.config import FusionConfig
from mllm.hf_export import ExportError, export_hf
from mllm.hf_import import ImportError_, resolve_model_path
from mllm.model import MultimodalLM, build_lm, load_llava

QUESTION = "What color is the circle?"


def _model(
    tokenizer,
    tower: str = "clip",
    projector: str = "mlp2x_gelu",
    select_layer: int = -2,
    select_feature: str = "patch",
    pad: bool = False,
    extra: dict | None = None,
) -> MultimodalLM:
    torch.manual_seed(0)
    lm = build_lm(None, TINY_LM, len(tokenizer))
    cfg = TowerConfig(
        type=tower,
        config={**TINY_TOWER, **(extra or {})},
        select_layer=select_layer,
        select_feature=select_feature,
        pad_to_square=pad,
    )
    model = MultimodalLM.build(cfg, projector, lm, tokenizer, template="chatml", max_length=200)
    with torch.no_grad():  # non-zero biases everywhere, so a dropped or swapped bias shows in the logits
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _image() -> Image.Image:
    img = Image.new("RGB", (48, 30), (240, 240, 240))  # not square: padding and cropping both matter
    img.paste((200, 20, 20), (5, 5, 30, 25))
    return img


def _hf_inputs(out: Path, tokenizer, model: MultimodalLM) -> dict:
    """What a transformers user does: AutoProcessor, its chat template, its <image> expansion."""
    proc = AutoProcessor.from_pretrained(out)
    assert isinstance(proc, LlavaProcessor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    enc = proc(text=text, images=_image(), return_tensors="pt")
    ours = encode_conversation(
        [("user", f"<image>\n{QUESTION}")],
        tokenizer,
        "chatml",
        model.image_token_id,
        model.num_image_tokens,
        1,
        for_generation=True,
    )
    assert enc["input_ids"][0].tolist() == ours["input_ids"].tolist()  # same template, same expansion
    assert int((enc["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens
    assert torch.equal(enc["pixel_values"], model.tower.preprocess([_image()]))
    return dict(enc)


def _our_logits(model: MultimodalLM, enc: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(enc["input_ids"], enc["attention_mask"], enc["pixel_values"]).logits


VARIANTS = {
    # tower, projector, select_layer, select_feature, pad_to_square -> expected (strategy, act)
    "clip-mlp2x-penultimate": (("clip", "mlp2x_gelu", -2, "patch", False), ("default", "gelu")),
    "clip-cls_patch-last": (("clip", "mlp2x_gelu", -1, "cls_patch", False), ("full", "gelu")),
    "siglip-linear": (("siglip", "linear", -2, "patch", False), ("full", "linear")),
    "dinov2-pad": (("dinov2", "mlp2x_gelu", -2, "patch", True), ("default", "gelu")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_loads_in_transformers_with_the_same_logits(tokenizer, tmp_path, variant):
    (tower, projector, layer, feature, pad), (strategy, act) = VARIANTS[variant]
    model = _model(tokenizer, tower, projector, layer, feature, pad)
    out = export_hf(model, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["vision_feature_layer"] == layer
    assert config["vision_feature_select_strategy"] == strategy
    assert config["projector_hidden_act"] == act
    assert config["image_token_index"] == model.image_token_id
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))

    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    enc = _hf_inputs(out, tokenizer, model)
    with torch.no_grad():
        theirs = hf(**enc).logits
    torch.testing.assert_close(theirs, _our_logits(model, enc), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["clip-mlp2x-penultimate", "siglip-linear"])
def test_round_trip_export_then_import_gives_identical_logits(tokenizer, tmp_path, variant):
    (tower, projector, layer, feature, pad), _ = VARIANTS[variant]
    model = _model(tokenizer, tower, projector, layer, feature, pad)
    out = export_hf(model, tmp_path / "hf")
    back = MultimodalLM.from_pretrained(out)  # dispatches on config.json model_type == "llava"
    assert back.meta.template == "chatml" and back.meta.max_length == 200
    assert back.meta.projector == projector
    assert back.tower.config.select_layer == layer and back.tower.config.select_feature == feature
    enc = _hf_inputs(out, tokenizer, model)
    torch.testing.assert_close(_our_logits(back, enc), _our_logits(model, enc), atol=1e-5, rtol=1e-5)
    # ... and it is an ordinary MultimodalLM again: the native save reloads with the same logits.
    back.save_pretrained(tmp_path / "native")
    again = MultimodalLM.from_pretrained(tmp_path / "native")
    torch.testing.assert_close(_our_logits(again, enc), _our_logits(model, enc), atol=1e-5, rtol=1e-5)


def test_export_meta_has_kind_and_version_and_old_exports_still_load(tokenizer, tmp_path):
    import json

    from encoders.common import FormatError

    out = export_hf(_model(tokenizer), tmp_path / "hf")
    meta = json.loads((out / "mllm_export.json").read_text())
    assert (meta["kind"], meta["format_version"]) == ("llava_export", 1)
    del meta["kind"], meta["format_version"]  # an export written before the convention
    (out / "mllm_export.json").write_text(json.dumps(meta))
    assert load_llava(out).meta.template == "chatml"
    (out / "mllm_export.json").write_text(json.dumps(dict(meta, format_version=2)))
    with pytest.raises(FormatError, match="'llava_export' format_version 2 is newer"):
        load_llava(out)


def test_import_of_a_plain_transformers_llava_without_mllm_metadata(tokenizer, tmp_path):
    """A LLaVA folder that mllm did not write (no mllm_export.json): LLaVA-1.5 defaults apply."""
    out = export_hf(_model(tokenizer), tmp_path / "hf")
    (out / "mllm_export.json").unlink()
    model = load_llava(out)
    assert model.meta.template == "vicuna_v1"
    assert model.meta.image_token == "<image>" and model.tower.num_tokens == 16
    assert load_llava(out, template="chatml").meta.template == "chatml"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("vision_feature_layer", [-2, -1], "concatenates several layers"),
        ("projector_hidden_act", "relu", "projector_hidden_act='relu'"),
    ],
)
def test_import_refuses_what_it_cannot_represent(tokenizer, tmp_path, field, value, message):
    out = export_hf(_model(tokenizer), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    cfg[field] = value
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportError_, match=message.replace("[", r"\[")):
        load_llava(out)


def test_export_refuses_register_tokens_unknown_projectors_and_fused_models(tokenizer, tmp_path):
    registers = _model(tokenizer, "dinov2_registers", extra={"num_register_tokens": 4})
    with pytest.raises(ExportError, match="5 prefix token"):
        export_hf(registers, tmp_path / "a")
    with pytest.raises(ExportError, match="projector 'mlp3x_gelu'.*--format mllm"):
        export_hf(_model(tokenizer, projector="mlp3x_gelu"), tmp_path / "b")

    class TwoTowers(nn.Module):  # stands in for a fused vision side: not a single encoders.towers.Tower
        def __init__(self, tower):
            super().__init__()
            self.first = tower

    fused = _model(tokenizer)
    fused.tower = TwoTowers(fused.tower)
    with pytest.raises(ExportError, match=r"fused \(TwoTowers\).*--format mllm"):
        export_hf(fused, tmp_path / "c")
    torch.manual_seed(0)
    mof = MultimodalLM.build(  # a real Mixture-of-Features model: CLIP + DINOv2 streams interleaved
        TowerConfig(type="clip", config=TINY_TOWER),
        "mlp2x_gelu",
        build_lm(None, TINY_LM, len(tokenizer)),
        tokenizer,
        fusion=FusionConfig(type="mof_interleaved", tower2=TowerConfig(type="dinov2", config=TINY_TOWER)),
    )
    with pytest.raises(ExportError, match=r"fused \(mof_interleaved\).*--format mllm"):
        export_hf(mof, tmp_path / "d")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_export_hf_and_native(tokenizer, tmp_path, capsys):
    _model(tokenizer).save_pretrained(tmp_path / "m")
    assert (
        cli.main(["export", "--model", str(tmp_path / "m"), "--format", "hf", "--out", str(tmp_path / "hf")])
        == 0
    )
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").config.model_type == "llava"
    assert (
        cli.main(
            ["export", "--model", str(tmp_path / "m"), "--format", "mllm", "--out", str(tmp_path / "native")]
        )
        == 0
    )
    assert (tmp_path / "native" / "mllm.json").is_file()
    registers = _model(tokenizer, "dinov2_registers", extra={"num_register_tokens": 4})
    registers.save_pretrained(tmp_path / "r")
    assert (
        cli.main(["export", "--model", str(tmp_path / "r"), "--format", "hf", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "--format mllm" in capsys.readouterr().err


def test_parts_from_local_hf_checkpoints_and_hub_names_only_with_network(tokenizer, tmp_path):
    """A tower from a local CLIP directory and an LM from a local causal-LM directory build a model;
    a name that is not a local directory is refused unless the recipe allows the network."""
    donor = _model(tokenizer)
    donor.tower.save_pretrained(tmp_path / "clip")
    donor.lm.save_pretrained(tmp_path / "lm")
    lm = build_lm(str(tmp_path / "lm"), {}, len(tokenizer))
    model = MultimodalLM.build(
        TowerConfig(type="clip", path=str(tmp_path / "clip"), select_layer=-2),
        "mlp2x_gelu",
        lm,
        tokenizer,
        template="chatml",
        max_length=200,
    )
    model.projector.load_state_dict(donor.projector.state_dict())
    enc = _hf_inputs(export_hf(model.eval(), tmp_path / "hf"), tokenizer, model)
    torch.testing.assert_close(_our_logits(model, enc), _our_logits(donor, enc))
    assert resolve_model_path(str(tmp_path / "clip"), False, "tower") == str(tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="allow_network"):
        resolve_model_path("openai/clip-vit-large-patch14-336", False, "tower")
    from mllm.config import ModelConfig
    from mllm.training.runner import build_model

    hub = ModelConfig(tower=TowerConfig(type="clip", path="openai/clip-vit-large-patch14-336"))
    with pytest.raises(FileNotFoundError, match="model.tower.path.*allow_network"):
        build_model(hub, tmp_path / "run", [], seed=0)
