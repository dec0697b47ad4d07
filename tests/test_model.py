import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mllm.chat import IGNORE_INDEX, encode_conversation
from mllm.data.conversations import Collator, left_pad
from mllm.model import MultimodalLM


def _batch(model, tok, convs):
    items = []
    for i, (conv, n_img) in enumerate(convs):
        enc = encode_conversation(conv, tok, "chatml", model.image_token_id, model.num_image_tokens, n_img)
        pix = torch.randn(n_img, 3, 32, 32) if n_img else None
        items.append({"id": str(i), **enc, "pixel_values": pix})
    return Collator(tok.pad_token_id)(items)


CONV_IMG = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"}]
CONV_TXT = [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "3"}]


def test_splice_matches_hand_built_embeddings(tiny_model, tokenizer):
    m = tiny_model.eval()
    b = _batch(m, tokenizer, [(CONV_IMG, 1), (CONV_TXT, 0), (CONV_IMG, 1)])
    embeds = m.embed(b["input_ids"], b["pixel_values"])
    img = m.encode_images(b["pixel_values"])  # [2, N, d]
    table = m.lm.get_input_embeddings().weight
    n = m.num_image_tokens
    k = 0
    for r in range(3):
        pos = (b["input_ids"][r] == m.image_token_id).nonzero().flatten().tolist()
        for j, p in enumerate(pos):
            assert torch.allclose(embeds[r, p], img[k + j // n, j % n])
        k += len(pos) // n
        other = [p for p in range(b["input_ids"].shape[1]) if p not in pos]
        assert torch.allclose(embeds[r, other], table[b["input_ids"][r, other]])
    assert k == 2


def test_splice_count_mismatch_is_an_error(tiny_model, tokenizer):
    b = _batch(tiny_model, tokenizer, [(CONV_IMG, 1)])
    with pytest.raises(ValueError, match="image positions"):
        tiny_model.embed(b["input_ids"], torch.cat([b["pixel_values"], b["pixel_values"]]))
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model.embed(b["input_ids"], None)


def test_loss_equals_reference_and_weights(tiny_model, tokenizer):
    m = tiny_model.eval()
    b = _batch(m, tokenizer, [(CONV_IMG, 1), (CONV_TXT, 0)])
    out = m(**{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
    embeds = m.embed(b["input_ids"], b["pixel_values"])
    logits = m.lm(inputs_embeds=embeds, attention_mask=b["attention_mask"]).logits
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        b["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    assert torch.allclose(out.loss, ref, atol=1e-5)
    # all-ones weights: the plain loss; doubling one token's weight changes it by that token's CE / n.
    w = (b["labels"] != IGNORE_INDEX).float()
    same = m(**{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}, token_weights=w)
    assert torch.allclose(same.loss, out.loss, atol=1e-6)
    pos = (b["labels"][0] != IGNORE_INDEX).nonzero().flatten()[0]
    w2 = w.clone()
    w2[0, pos] = 2.0
    ce = F.cross_entropy(logits[0, pos - 1].float(), b["labels"][0, pos])
    n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    heavier = m(
        **{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}, token_weights=w2
    )
    assert torch.allclose(heavier.loss, out.loss + ce / n, atol=1e-5)


def test_save_load_round_trip_and_generate(tiny_model, tokenizer, tmp_path):
    m = tiny_model.eval()
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "lm" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "tower" / "model.safetensors").is_file()
    m2 = MultimodalLM.from_pretrained(tmp_path / "m")
    b = _batch(m, tokenizer, [(CONV_IMG, 1)])
    inputs = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    assert torch.allclose(m(**inputs).logits, m2(**inputs).logits, atol=1e-6)
    # Greedy generation with KV cache equals step-by-step argmax without cache.
    prompt = encode_conversation(
        [("user", "<image>\nWhat color?")],
        tokenizer,
        "chatml",
        m.image_token_id,
        m.num_image_tokens,
        1,
        for_generation=True,
    )["input_ids"]
    ids, mask = left_pad([prompt], tokenizer.pad_token_id)
    pix = m2.tower.preprocess([Image.new("RGB", (40, 30), "red")])
    new = m2.generate(ids, pix, mask, max_new_tokens=5, stop_token_ids=[])
    seq = ids
    for _ in range(5):
        logits = m2(input_ids=seq, pixel_values=pix).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert new[0].tolist() == seq[0, ids.shape[1] :].tolist()


def test_batched_left_padded_generation_matches_single(tiny_model, tokenizer):
    m = tiny_model.eval()
    prompts = [
        encode_conversation(
            [("user", q)], tokenizer, "chatml", m.image_token_id, m.num_image_tokens, 1, for_generation=True
        )["input_ids"]
        for q in ("<image>\nWhat color?", "<image>\nHow many shapes are there in the picture?")
    ]
    pix = torch.randn(2, 3, 32, 32)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    both = m.generate(ids, pix, mask, max_new_tokens=4, stop_token_ids=[])
    for i, p in enumerate(prompts):
        one = m.generate(p[None], pix[i : i + 1], None, max_new_tokens=4, stop_token_ids=[])
        assert both[i].tolist() == one[0].tolist()


def test_anchored_projector_anchors_at_the_first_conversation_stage_and_round_trips(tokenizer, tmp_path):
    """The first conversation task that trains the projector (not lm_pretrain) sets the anchors from the
    LM's embeddings, once; save/load keeps them and the flag, and the reloaded model embeds alike."""
    from conftest import TINY_LM, TINY_TOWER

    from encoders.towers import TowerConfig
    from mllm.config import DataConfig, StageConfig
    from mllm.families.mllm import conversation_task
    from mllm.model import build_lm

    torch.manual_seed(0)
    lm = build_lm(None, TINY_LM, len(tokenizer))
    model = MultimodalLM.build(
        TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1),
        "anchored_mlp2x_gelu",
        lm,
        tokenizer,
        template="chatml",
        max_length=128,
    )
    assert not bool(model.projector.anchored)
    (tmp_path / "c.json").write_text("[]")
    data = DataConfig(json=str(tmp_path / "c.json"))
    conversation_task(model, StageConfig(name="lm_pretrain", kind="lm_pretrain", data=data), "chatml")
    assert not bool(model.projector.anchored)  # the LM has not learned its words yet
    conversation_task(model, StageConfig(name="align", kind="align", data=data), "chatml")
    assert bool(model.projector.anchored) and (model.projector.word_ids[1:] >= 0).any()
    pix = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.encode_images(pix)
    model.save_pretrained(tmp_path / "m")
    again = MultimodalLM.from_pretrained(tmp_path / "m")
    assert bool(again.projector.anchored)
    with torch.no_grad():
        assert torch.allclose(again.encode_images(pix), want, atol=1e-6)


def test_image_placement_is_saved_only_when_not_llavas(tiny_model, tmp_path):
    import json

    tiny_model.save_pretrained(tmp_path / "a")
    assert "image_placement" not in json.loads((tmp_path / "a" / "mllm.json").read_text())
    tiny_model.meta.image_placement = "after"
    tiny_model.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "mllm.json").read_text())["image_placement"] == "after"
    assert MultimodalLM.from_pretrained(tmp_path / "b").meta.image_placement == "after"
    assert MultimodalLM.from_pretrained(tmp_path / "a").meta.image_placement == "before"


def test_unknown_image_placement_is_refused_at_build(tokenizer):
    from conftest import TINY_LM, TINY_TOWER

    from encoders.towers import TowerConfig
    from mllm.model import build_lm

    lm = build_lm(None, TINY_LM, len(tokenizer))
    with pytest.raises(ValueError, match="unknown image placement 'middle'"):
        MultimodalLM.build(
            TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1),
            "mlp2x_gelu",
            lm,
            tokenizer,
            image_placement="middle",
        )
