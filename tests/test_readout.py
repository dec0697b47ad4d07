"""Look tokens (mllm.readout): where the question and image of each look come from, the readout's math,
the wire format, save/load, and bad configuration refused at recipe load."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TINY_LM, TINY_TOWER
from helpers import tiny_recipe, write_tiny_world

from encoders.common import ConfigError
from encoders.towers import TowerConfig
from mllm.chat import SampleError, encode_conversation
from mllm.config import load_recipe
from mllm.readout import (
    COUNT_CODE,
    LOOK_TOKEN,
    FocusReadout,
    build_readout,
    count_code,
    grounding_loss,
    look_inputs,
    look_words,
)

IMG, LOOK, PAD = 90, 91, 0


def _naive_looks(ids, emb, n_img, mask=None):
    """Loop form of `look_inputs`: per look, the mean text embedding since the previous look of the row,
    and the row-major index of the last complete image before it."""
    queries, index = [], []
    images_before_row = 0
    for r in range(ids.shape[0]):
        start, seen = 0, 0
        for t in range(ids.shape[1]):
            if ids[r, t] == IMG:
                seen += 1
            if ids[r, t] != LOOK:
                continue
            keep = [
                p for p in range(start, t) if ids[r, p] not in (IMG, LOOK) and (mask is None or mask[r, p])
            ]
            queries.append(emb[r, keep].mean(0) if keep else torch.zeros(emb.shape[-1]))
            full = seen // n_img
            index.append(images_before_row + full - 1 if full else -1)
            start = t + 1
        images_before_row += int((ids[r] == IMG).sum()) // n_img
    return torch.stack(queries), torch.tensor(index)


def test_look_inputs_match_the_loop_form():
    ids = torch.tensor(
        [
            [PAD, PAD, 5, IMG, IMG, 6, 7, LOOK, 8, 9, LOOK, 3],  # left padding, two looks after one image
            [4, LOOK, IMG, IMG, 5, LOOK, IMG, IMG, 6, 6, 6, LOOK],  # a look before any image; two images
            [IMG, IMG, 1, 2, 3, 4, 5, 6, 7, 8, 9, LOOK],
        ]
    )
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    emb = torch.randn(*ids.shape, 6)
    q, idx, is_look = look_inputs(ids, emb, LOOK, IMG, 2, mask)
    nq, nidx = _naive_looks(ids, emb, 2, mask)
    assert torch.allclose(q, nq, atol=1e-6)
    assert idx.tolist() == nidx.tolist() == [0, 0, -1, 1, 2, 3]
    assert int(is_look.sum()) == 6
    # the same segmentation word by word: each text position's look, the mean of whose words is q
    look = look_words(ids, LOOK, IMG, mask)
    assert look[0].tolist() == [-1, -1, 0, -1, -1, 0, 0, -1, 1, 1, -1, -1]  # after the last look: none
    assert look[1].tolist() == [2, -1, -1, -1, 3, -1, -1, -1, 4, 4, 4, -1]
    for i in range(6):
        assert torch.allclose(emb[look == i].mean(0), q[i], atol=1e-6)


def test_focus_readout_formula_and_gradients():
    torch.manual_seed(0)
    r = FocusReadout(feature_dim=5, lm_dim=7, heads=2, dim=3, scale=2.0)
    feats = torch.randn(3, 4, 5)
    queries = torch.randn(4, 7, requires_grad=True)
    index = torch.tensor([2, -1, 0, 2])
    out, none = r(feats, queries, index)
    assert out.shape == (4, 7) and none is None
    assert torch.equal(out[1], r.empty)  # no image before the look
    # naive: per look and head, softmax attention of the projected question over the projected features
    for j in (0, 2, 3):
        f = r.norm(feats[index[j]])
        parts, stats = [], []
        for h in range(2):
            qh = r.q(r.qnorm(queries[j]))[h * 3 : (h + 1) * 3]
            kh = r.k(f)[:, h * 3 : (h + 1) * 3]
            s = 2.0 * (kh @ qh) / math.sqrt(3)
            parts.append(torch.softmax(s, 0) @ f)
            stats.append(torch.stack([s.max(), torch.logsumexp(s, 0) - math.log(4), torch.sigmoid(s).sum()]))
        x = torch.cat([torch.cat([p, st]) for p, st in zip(parts, stats)])
        assert torch.allclose(out[j], r.out(x), atol=1e-5)
    out.sum().backward()
    for name, p in r.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert queries.grad[1].abs().sum() == 0 and queries.grad[0].abs().sum() > 0


def test_bad_readout_options_are_refused():
    with pytest.raises(ValueError, match="heads"):
        build_readout({"type": "focus", "heads": 0}, 4, 4)
    with pytest.raises(ValueError, match="readout"):
        build_readout({"type": "nope"}, 4, 4)
    with pytest.raises(ValueError, match="model.readout"):
        build_readout({"type": "focus", "width": 3}, 4, 4)
    for key, bad in (("scale", 0), ("words", "bert"), ("value", "x"), ("ground", -1)):
        with pytest.raises(ValueError, match=key):
            build_readout({"type": "focus", key: bad}, 4, 4)


def test_recipe_load_refuses_a_bad_readout(tmp_path):
    world = write_tiny_world(tmp_path, n=8)
    for readout, key in (
        ({"type": "nope"}, "readout"),
        ({"type": "focus", "dim": -1}, "dim"),
        ("focus", "mapping"),
    ):
        raw = tiny_recipe(world, backend="torch", zero=None)
        raw["model"]["readout"] = readout
        path = tmp_path / "r.yaml"
        path.write_text(json.dumps(raw))
        with pytest.raises(ConfigError, match=key):
            load_recipe(path)


#: A two-question conversation about one image.
TWO_TURNS = [
    {"from": "human", "value": "<image>\nwhat color is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many?"},
    {"from": "gpt", "value": "2"},
]


def _look_tokenizer(tokenizer):
    """A copy of the test tokenizer with the image and look tokens, and their ids."""
    from mllm.tokenizer import ensure_image_token, ensure_look_token

    tok = copy.deepcopy(tokenizer)
    return tok, ensure_image_token(tok), ensure_look_token(tok, LOOK_TOKEN)


def test_encode_conversation_appends_a_look_to_every_user_turn(tokenizer):
    tok, img, look = _look_tokenizer(tokenizer)
    conv = TWO_TURNS
    enc = encode_conversation(conv, tok, "chatml", img, 4, 1, look_token=LOOK_TOKEN)
    ids = enc["input_ids"].tolist()
    assert ids.count(look) == 2
    for p in (k for k, t in enumerate(ids) if t == look):
        assert enc["labels"][p] == -100  # a look is input, never a target
    text_only = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]
    assert (
        look
        not in encode_conversation(text_only, tok, "chatml", img, 4, 0, look_token=LOOK_TOKEN)["input_ids"]
    )
    without = encode_conversation(conv, tok, "chatml", img, 4, 1)["input_ids"].tolist()
    assert look not in without and len(without) == len(ids) - 2
    bad = [{"from": "human", "value": f"<image>\nred{LOOK_TOKEN}?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(SampleError, match="look token"):
        encode_conversation(bad, tok, "chatml", img, 4, 1, look_token=LOOK_TOKEN)


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1"])
def test_looks_at_the_answer_open_every_reply_and_end_the_generation_prompt(tokenizer, template):
    tok, img, look = _look_tokenizer(tokenizer)
    conv = TWO_TURNS
    enc = encode_conversation(conv, tok, template, img, 4, 1, look_token=LOOK_TOKEN, look_at="answer")
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    plain = encode_conversation(conv, tok, template, img, 4, 1)
    at = [k for k, t in enumerate(ids) if t == look]
    assert len(at) == 2 and len(ids) == len(plain["input_ids"]) + 2
    for p in at:
        assert labels[p] == -100  # never a target
        assert labels[p + 1] != -100  # the reply's first token is predicted from the look itself
        assert labels[p - 1] == -100  # and everything before it is prompt
    # without the looks, the same ids and labels: nothing else moved
    keep = [k for k in range(len(ids)) if k not in at]
    assert [ids[k] for k in keep] == plain["input_ids"].tolist()
    assert [labels[k] for k in keep] == plain["labels"].tolist()
    # a generation prompt ends with the look: the first generated token is read from it
    gen = encode_conversation(
        conv[:1], tok, template, img, 4, 1, for_generation=True, look_token=LOOK_TOKEN, look_at="answer"
    )
    assert gen["input_ids"][-1] == look and int((gen["input_ids"] == look).sum()) == 1
    # training prefix == generation prompt: the model is asked exactly as it was taught
    assert ids[: at[0] + 1] == gen["input_ids"].tolist()


def test_looks_at_the_answer_need_a_question(tokenizer):
    """The plain template drops the question (alignment captions): no look there; a bad place is refused."""
    tok, img, look = _look_tokenizer(tokenizer)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle"}]
    enc = encode_conversation(conv, tok, "plain", img, 4, 1, look_token=LOOK_TOKEN, look_at="answer")
    assert look not in enc["input_ids"].tolist()
    with pytest.raises(ValueError, match="look_at"):
        encode_conversation(conv, tok, "chatml", img, 4, 1, look_token=LOOK_TOKEN, look_at="middle")
    with pytest.raises(ValueError, match="model.readout.at"):
        build_readout({"type": "focus", "at": "middle"}, 8, 8)


def _build_look_model(tokenizer, projector: str = "mlp2x_gelu", **readout):
    """A tiny CLIP-tower + Llama model with a focus readout (2 heads of 8) and `readout`'s options."""
    from mllm.model import MultimodalLM, build_lm
    from mllm.tokenizer import ensure_look_token

    tok = copy.deepcopy(tokenizer)
    ensure_look_token(tok, LOOK_TOKEN)
    torch.manual_seed(0)
    return MultimodalLM.build(
        TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1),
        projector,
        build_lm(None, TINY_LM, len(tok)),
        tok,
        template="chatml",
        max_length=128,
        readout={"type": "focus", "heads": 2, "dim": 8, **readout},
    )


@pytest.fixture(
    params=[{}, {"words": "own", "value": "tokens", "scale": 4.0}], ids=["lm-features", "own-tokens"]
)
def look_model(tokenizer, request):
    return _build_look_model(tokenizer, **request.param)


def _batch(model, questions):
    from mllm.data.conversations import Collator
    from mllm.tokenizer import ensure_image_token

    img = ensure_image_token(model.tokenizer)
    items = []
    for q in questions:
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "red"}]
        enc = encode_conversation(
            conv, model.tokenizer, "chatml", img, model.num_image_tokens, 1, look_token=model.meta.look_token
        )
        items.append(
            {"index": len(items), "id": str(len(items)), **enc, "pixel_values": torch.randn(1, 3, 32, 32)}
        )
    return Collator(model.tokenizer.pad_token_id)(items)


def test_each_look_reads_its_own_image_and_question(look_model):
    m = look_model.eval()
    b = _batch(m, ["what color is the circle?", "how many squares are there?"])
    with torch.no_grad():
        e1 = m.embed(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"])
        px = b["pixel_values"].clone()
        px[0] += 1.0  # change the first image only
        e2 = m.embed(b["input_ids"], px, attention_mask=b["attention_mask"])
    looks = (b["input_ids"] == m.meta.look_token_id).nonzero(as_tuple=True)
    assert len(looks[0]) == 2
    (r0, r1), (c0, c1) = looks[0].tolist(), looks[1].tolist()
    assert not torch.allclose(e1[r0, c0], e2[r0, c0])  # the first look sees the first image
    assert torch.allclose(e1[r1, c1], e2[r1, c1])  # the second does not


def test_look_model_trains_saves_and_loads(look_model, tmp_path):
    from mllm.model import MultimodalLM

    m = look_model
    b = _batch(m, ["what color is the circle?", "is there a star?"])
    out = m(**b)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in m.readout.parameters())
    m.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "mllm.json").read_text())
    assert meta["readout"]["type"] == "focus" and meta["look_token"] == LOOK_TOKEN
    back = MultimodalLM.from_pretrained(tmp_path / "m")
    m.eval()
    with torch.no_grad():
        a = m(**b).loss
        c = back(**b).loss
    assert torch.allclose(a, c, atol=1e-6)


def test_a_model_without_readout_keeps_its_meta(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "mllm.json").read_text())
    assert "readout" not in meta and "look_token" not in meta
    assert not (tmp_path / "m" / "readout.safetensors").exists()


def test_grounding_loss_formula():
    torch.manual_seed(0)
    att = torch.randn(3, 2, 5).softmax(-1).requires_grad_()
    t = torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 2]])
    got = grounding_loss(att, t)
    a = att.mean(1)
    want = -(0.5 * a[0, 0].log() + 0.5 * a[0, 1].log() + a[2, 4].log()) / 2  # the empty row is left out
    assert torch.allclose(got, want)
    g1 = torch.autograd.grad(got, att)[0]
    g2 = torch.autograd.grad(want, att)[0]
    assert torch.allclose(g1, g2) and g1[1].abs().sum() == 0
    assert grounding_loss(att, torch.zeros(3, 5)).item() == 0.0


def test_grounded_looks_add_their_loss(look_model):
    m = look_model
    b = _batch(m, ["what color is the circle?", "is there a star?"])
    n_looks = int((b["input_ids"] == m.meta.look_token_id).sum())
    targets = torch.zeros(n_looks, m.num_image_tokens)
    targets[0, :3] = 1
    plain = m(**b).loss
    m.readout.ground = 0.5
    grounded = m(**b, look_targets=targets).loss
    m.readout.ground = 0.0
    assert grounded > plain
    with pytest.raises(ValueError, match="look_targets"):
        m.readout.ground = 0.5
        m(**b, look_targets=targets[:1])


def test_referents_read_from_the_question():
    from mllm.data.geoworld.referents import referent_patches, referents
    from mllm.data.geoworld.scene import Scene, Shape

    def shape(kind, color, size, x, y, region):
        r = 8 if size == "large" else 4
        return Shape(kind, color, size, r, x, y, 0, None, region, [x - r, y - r, x + r, y + r])

    scene = Scene(
        64,
        64,
        [
            shape("circle", "red", "large", 10, 10, "top left"),
            shape("circle", "blue", "small", 54, 54, "bottom right"),
            shape("square", "red", "small", 54, 10, "top right"),
        ],
    )
    assert referents(scene, "What color is the circle at the top left?") == [0]
    assert referents(scene, "How many circles are there?") == [0, 1]
    assert referents(scene, "How many shapes are there?") == [0, 1, 2]
    assert referents(scene, "Is the square small or large?") == [2]  # both sizes offered: no size filter
    assert referents(scene, "Is there a red circle in the image?") == [0]
    assert referents(scene, "Is there a green circle in the image?") == []
    assert referents(scene, "Is the circle on the left or the right?") == [0, 1]  # a choice, not a filter
    assert referents(scene, "What shape is the object in the top right? (a) circle (b) square") == [2]
    p = referent_patches(scene, [0], (8, 8))
    assert p.shape == (64,) and p[0] == 1 and p[9] == 2 and p[63] == 0 and p.sum() == 5  # 2: its centre
    # a relation: each side filtered on its own (mixed, "red" and "blue" would filter nothing)
    from mllm.data.geoworld.referents import look_target, relation_roles

    q = "<image>\nIs the red circle above the blue circle?"
    assert relation_roles(scene, q) == ([0], [1]) and referents(scene, q) == [0, 1]
    assert relation_roles(scene, "Is the square to the left of the large circle?") == ([2], [0])
    assert relation_roles(scene, "What color is the circle at the top left?") is None
    t = look_target(scene, q, (8, 8))  # the object's patches 3, its centre 4; the subject's as before
    assert torch.equal(t[t <= 2], p[t <= 2]) and int((t == 2).sum()) == 1
    assert torch.equal(t >= 3, referent_patches(scene, [1], (8, 8)) > 0) and int((t == 4).sum()) == 1
    assert torch.equal(
        look_target(scene, "How many circles are there?", (8, 8)), referent_patches(scene, [0, 1], (8, 8))
    )


def test_role_grounding_grounds_each_half_of_the_heads_on_its_side():
    """roles: a relation's subject (1, 2) grounds the first half of the heads and its object (3, 4) the
    second; any other row grounds both halves on all its referents."""
    from mllm.readout import grounding_loss, role_grounding_loss

    torch.manual_seed(0)
    a = torch.randn(2, 4, 6).softmax(-1)
    t = torch.tensor([[1.0, 2.0, 0.0, 0.0, 3.0, 4.0], [1.0, 2.0, 2.0, 0.0, 0.0, 0.0]])
    sub, obj, both = (
        torch.tensor([[1.0, 1, 0, 0, 0, 0]]),
        torch.tensor([[0.0, 0, 0, 0, 1, 1]]),
        torch.tensor([[1.0, 1, 1, 0, 0, 0]]),
    )
    first = 0.5 * (grounding_loss(a[:1, :2], sub) + grounding_loss(a[:1, 2:], obj))
    second = 0.5 * (grounding_loss(a[1:, :2], both) + grounding_loss(a[1:, 2:], both))
    assert torch.allclose(role_grounding_loss(a, t), (first + second) / 2)
    with pytest.raises(ValueError, match="roles needs order"):
        FocusReadout(5, 7, heads=2, roles=True)
    with pytest.raises(ValueError, match="even number"):
        FocusReadout(5, 7, heads=3, order=1.0, roles=True)


def test_a_look_model_is_not_exported_to_llava(look_model):
    from mllm.hf_export import ExportError, _check_exportable

    with pytest.raises(ExportError, match="readout"):
        _check_exportable(look_model)


def test_counting_readout_counts_objects_not_patches():
    """count > 0: per group the question picks a word or "any" (u_g = softmax over each word's max over
    the question's words of W_g LN(e), and a learned "any"), a patch matches
    with m_p = prod_g (sum_w u_gw P_p(w) + u_g,any), n = sum_p d_p m_p from the projector's maps, fed to
    the look as n and its triangular code; its loss is BCE(m, referent patches) weighted by P(object)
    plus Huber(n, number of 2s), by the formula written out here."""
    torch.manual_seed(0)
    r = FocusReadout(feature_dim=5, lm_dim=7, heads=2, dim=3, ground=0.5, count=2.0, count_words=(2, 3))
    feats = torch.randn(1, 4, 5)
    queries = torch.randn(2, 7)
    index = torch.tensor([0, 0])
    targets = torch.tensor([[1.0, 2, 0, 2], [0, 0, 0, 0]])
    density = torch.tensor([[0.5, 0.5, 0.0, 1.0]])
    colours = torch.rand(1, 4, 3).softmax(-1)[..., 1:]  # index 0 (background) is not a word
    shapes = torch.rand(1, 4, 4).softmax(-1)[..., 1:]
    words = torch.randn(5, 7)  # the questions' words: three in look 0, two in look 1
    which = torch.tensor([0, 0, 0, 1, 1])
    look, aux = r(
        feats, queries, index, targets, count_maps=(density, (colours, shapes)), words=(words, which)
    )
    f = r.norm(feats[0])
    q = r.q(r.qnorm(queries)).view(2, 2, 1, 3)
    k = r.k(f).view(4, 2, 3).transpose(0, 1)
    s = (q * k[None]).sum(-1) / math.sqrt(3)  # [2, H, N]

    def pick(g):  # per look, the max over its words of each word's logit, and "any"; then a softmax
        logits = r.count_select[g](r.qnorm(words))
        votes = torch.stack([logits[:3].amax(0), logits[3:].amax(0)])
        return torch.cat([votes, r.count_any[g].expand(2, 1)], -1).softmax(-1)

    uc, us = pick(0), pick(1)  # [2, 3], [2, 4]
    m = torch.stack(
        [(colours[0] @ uc[i, :2] + uc[i, 2]) * (shapes[0] @ us[i, :3] + us[i, 3]) for i in range(2)]
    )
    n = (density * m).sum(-1)
    on = (targets > 0).float()
    shown = colours[0].sum(-1).expand(2, 4)
    bce = -(on * m.log() + (1 - on) * (1 - m).log())
    counting = (bce * shown).sum() / shown.sum() + torch.nn.functional.huber_loss(n, torch.tensor([2.0, 0.0]))
    want = 0.5 * grounding_loss(s.softmax(-1), targets) + 2.0 * counting
    assert torch.allclose(aux, want, atol=1e-5)
    # the code: an integer count is one unit vector, a fraction between two neighbours
    code = count_code(torch.tensor([2.0, 0.25, 12.0]))
    assert code.shape == (3, COUNT_CODE)
    assert code[0].tolist() == [0, 0, 1] + [0] * (COUNT_CODE - 3)
    assert torch.allclose(code[1, :2], torch.tensor([0.75, 0.25])) and code[2].sum() == 0
    # the look reads n: more density (more objects) changes every look
    torch.nn.init.normal_(r.out[-1].weight)
    before, _ = r(feats, queries, index, count_maps=(density, (colours, shapes)), words=(words, which))
    after, _ = r(feats, queries, index, count_maps=(2 * density, (colours, shapes)), words=(words, which))
    assert not torch.allclose(before, after)
    # the selector learns what a question counts: "shape 1 of any colour" over patches showing shapes 0-2
    one_hot = torch.eye(3)[None]
    maps = (torch.ones(1, 3), (torch.full((1, 3, 2), 0.5), one_hot))
    rows = torch.tensor([[0.0, 2, 0]])
    opt = torch.optim.Adam([*r.count_select.parameters(), r.count_any], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        _, loss = r(feats[:, :3], queries[:1], index[:1], rows, count_maps=maps, words=(words[:3], which[:3]))
        loss.backward()
        opt.step()
    uc, us = pick(0), pick(1)
    assert us[0].argmax() == 1 and uc[0].argmax() == 2  # shape 1, any colour
    with pytest.raises(ValueError, match="count"):
        FocusReadout(5, 7, count=-1)
    with pytest.raises(ValueError, match="anchored projector"):
        FocusReadout(5, 7, count=1.0)  # nothing to count with
    with pytest.raises(ValueError, match="count_maps"):
        r(feats, queries, index, words=(words, which))
    with pytest.raises(ValueError, match="words"):
        r(feats, queries, index, count_maps=(density, (colours, shapes)))


def test_a_model_looking_at_the_answer_generates_from_its_look(tokenizer, tmp_path):
    """`at: answer` end to end: the generation prompt ends with the look, whose embedding is the readout's
    (changing the image changes the first answer logits through it), and the placement survives save/load."""
    from PIL import Image

    from mllm.inference import answer_batch, prompt_ids
    from mllm.model import MultimodalLM

    m = _build_look_model(tokenizer, at="answer").eval()
    ids = prompt_ids(m, [("user", "<image>\nwhat color is the circle?")], 1)
    assert ids[-1] == m.meta.look_token_id and int((ids == m.meta.look_token_id).sum()) == 1
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        e1 = m.embed(ids[None], px)
        e2 = m.embed(ids[None], px + 1.0)
    assert not torch.allclose(e1[0, -1], e2[0, -1]) and torch.allclose(
        e1[0, :-1][ids[:-1] != m.image_token_id], e2[0, :-1][ids[:-1] != m.image_token_id]
    )
    out = answer_batch(
        m, ["what color is the circle?"], [Image.new("RGB", (32, 32), "red")], max_new_tokens=3
    )
    assert len(out) == 1 and isinstance(out[0], str)
    m.save_pretrained(tmp_path / "m")
    again = MultimodalLM.from_pretrained(tmp_path / "m")
    assert again.meta.readout["at"] == "answer"
    assert torch.equal(prompt_ids(again, [("user", "<image>\nwhat color is the circle?")], 1), ids)


def test_a_counting_readout_sums_the_projectors_heads(tokenizer, tmp_path):
    """With an anchored projector, `readout.count` gets the projector's per-patch density and word
    probabilities (the heads the tower warm-up trains) for its images, and the model saves and loads
    with the counter sized by the projector's words."""
    from mllm.model import MultimodalLM

    model = _build_look_model(tokenizer, "anchored_mlp2x_gelu", count=1.0, value="tokens")
    assert model.projector.count_words == (8, 8)
    assert [sel.out_features for sel in model.readout.count_select] == [8, 8]
    conv = [{"from": "human", "value": "<image>\nHow many circles are there?"}, {"from": "gpt", "value": "2"}]
    enc = encode_conversation(
        conv,
        model.tokenizer,
        "chatml",
        model.image_token_id,
        model.num_image_tokens,
        1,
        look_token=LOOK_TOKEN,
    )
    pix = torch.randn(1, 3, 32, 32)
    got = {}
    original = model.readout.forward

    def spy(*args, **kwargs):
        got.update(kwargs)
        return original(*args, **kwargs)

    model.readout.forward = spy
    with torch.no_grad():
        model(input_ids=enc["input_ids"][None], pixel_values=pix)
        density, words = model.projector.count_maps(model.tower_features(pix))
    assert torch.allclose(got["count_maps"][0], density)
    assert all(torch.allclose(a, b) for a, b in zip(got["count_maps"][1], words, strict=True))
    # ... and the question's words one by one (the LM's embeddings here: `words: lm`), all in the one look
    text, look = got["words"]
    ids = enc["input_ids"]
    want = look_words(ids[None], model.meta.look_token_id, model.image_token_id)[0]
    special = torch.isin(ids, torch.tensor(model.tokenizer.all_special_ids))
    kept = ids[(want >= 0) & ~special]
    table = model.readout.words or model.lm.get_input_embeddings()
    assert look.tolist() == [0] * len(kept) and torch.allclose(text, table(kept))
    model.readout.forward = original
    model.save_pretrained(tmp_path / "m")
    again = MultimodalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(again.readout.count_select[1].weight, model.readout.count_select[1].weight)


def _tokens_look(r, s, tokens, where=None):
    """The look of a `value: tokens` readout `r` written out from its attention scores s [m, H, N]: the
    heads' mean of the attention-pooled tokens [N, d] plus r.out of the match statistics (max,
    log-mean-exp, sigmoid sum and, with `where` = (xs, ys), the attended column and row)."""
    a = s.softmax(-1)
    parts = [s.amax(-1), torch.logsumexp(s, -1) - math.log(s.shape[-1]), torch.sigmoid(s).sum(-1)]
    if where is not None:
        parts += [(a * where[0]).sum(-1), (a * where[1]).sum(-1)]
    return torch.einsum("mhn,nd->md", a, tokens) / s.shape[1] + r.out(torch.stack(parts, -1).flatten(1))


def test_where_adds_the_attended_place_to_the_statistics():
    """where: true: per head, sum_p a_p x_p and sum_p a_p y_p over a square grid's centres in [-1, 1]."""
    from mllm.readout import _patch_coordinates

    xs, ys = _patch_coordinates(4, torch.device("cpu"), torch.float32)
    assert xs.tolist() == [-0.5, 0.5, -0.5, 0.5] and ys.tolist() == [-0.5, -0.5, 0.5, 0.5]
    torch.manual_seed(0)
    r = FocusReadout(feature_dim=5, lm_dim=7, heads=2, dim=3, value="tokens", where=True)
    torch.nn.init.normal_(r.out[-1].weight)  # the statistics' MLP starts at zero; make it count here
    feats, tokens = torch.randn(1, 4, 5), torch.randn(1, 4, 7)
    queries, index = torch.randn(3, 7), torch.tensor([0, 0, 0])
    looks, _ = r(feats, queries, index, tokens=tokens)
    f = r.norm(feats[0])
    q = r.q(r.qnorm(queries)).view(3, 2, 1, 3)
    k = r.k(f).view(4, 2, 3).transpose(0, 1)
    s = (q * k[None]).sum(-1) / math.sqrt(3)  # [3, H, N]
    want = _tokens_look(r, s, tokens[0], (xs, ys))
    assert torch.allclose(looks, want, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        r(torch.randn(1, 6, 5), queries, index, tokens=torch.randn(1, 6, 7))
    with pytest.raises(ValueError, match="model.readout.where"):
        FocusReadout(5, 7, where="yes")


def test_the_counters_selector_starts_lexical(tokenizer):
    """anchor_count: a selector row scores ~`logit` / j for a question word among its word's j distinct
    form tokens (alone, after a space, plural) and ~0 for other words, once; reloads keep it (a buffer)."""
    torch.manual_seed(0)
    vocab = len(tokenizer)
    r = FocusReadout(5, 64, vocab, words="own", count=1.0, count_words=(2, 1))
    assert r.anchor_count((("red", "blue"), ("circle",)), tokenizer, logit=10.0) == 3
    first = tokenizer(" red", add_special_tokens=False)["input_ids"][0]
    other = tokenizer(" blue", add_special_tokens=False)["input_ids"][0]
    logits = r.count_select[0](r.qnorm(r.words.weight[[first, other]]))  # [2 tokens, 2 words]
    assert logits[0, 0] > 3.0 and logits[1, 1] > 3.0 and logits[0, 1].abs() < 2.0 and logits[1, 0].abs() < 2.0
    assert bool(r.count_anchored) and r.anchor_count((("red", "blue"), ("circle",)), tokenizer) == 0
    again = FocusReadout(5, 64, vocab, words="own", count=1.0, count_words=(2, 1))
    again.load_state_dict(r.state_dict())
    assert bool(again.count_anchored) and again.anchor_count((("red", "blue"), ("circle",)), tokenizer) == 0
    with pytest.raises(ValueError, match="groups"):
        FocusReadout(5, 64, vocab, words="own", count=1.0, count_words=(2, 1)).anchor_count(
            (("red",),), tokenizer
        )
    # no own word table, no counter: nothing to anchor
    assert (
        FocusReadout(5, 64, vocab, count=1.0, count_words=(2, 1)).anchor_count(
            (("a", "b"), ("c",)), tokenizer
        )
        == 0
    )
    assert FocusReadout(5, 64, vocab, words="own").anchor_count((), tokenizer) == 0


def test_where_words_add_the_attended_side_as_the_lms_words():
    """where_words: look += sigmoid(w . LN(q) + b) * sum over (axis, side) of
    sigmoid(+-k * mean_h sum_p a_p coord_p) * row, the rows tied to the LM's embeddings of both forms of
    each word minus the axis mean, plus offsets; refused without `where` or with other than four words."""
    from mllm.readout import _patch_coordinates

    torch.manual_seed(0)
    r = FocusReadout(5, 7, heads=2, dim=3, value="tokens", where=True, where_words=["l", "r", "t", "b"])
    emb = torch.nn.Embedding(10, 7)
    r.where_ids.copy_(torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]))  # what anchor_where records
    torch.nn.init.normal_(r.where_offsets)
    torch.nn.init.normal_(r.where_gate.weight)
    rows = r.where_table(emb)
    w = emb.weight[1:9].view(2, 2, 2, 7).sum(2)  # [axis, side, d]: the word plus its spaced form
    assert torch.allclose(rows, (w - w.mean(1, keepdim=True)).reshape(4, 7) + r.where_offsets)
    feats, tokens = torch.randn(1, 4, 5), torch.randn(1, 4, 7)
    queries, index = torch.randn(3, 7), torch.tensor([0, 0, 0])
    base = FocusReadout(5, 7, heads=2, dim=3, value="tokens", where=True)
    base.load_state_dict({k: v for k, v in r.state_dict().items() if not k.startswith("where_")}, strict=True)
    looks, _ = r(feats, queries, index, tokens=tokens, where_rows=rows)
    plain, _ = base(feats, queries, index, tokens=tokens)
    f = r.norm(feats[0])
    q = r.q(r.qnorm(queries)).view(3, 2, 1, 3)
    k = r.k(f).view(4, 2, 3).transpose(0, 1)
    a = ((q * k[None]).sum(-1) / math.sqrt(3)).softmax(-1)  # [3, H, N]
    xs, ys = _patch_coordinates(4, torch.device("cpu"), torch.float32)
    x, y = (a * xs).sum(-1).mean(1), (a * ys).sum(-1).mean(1)
    p = torch.sigmoid(4.0 * torch.stack([-x, x, -y, y], -1))
    gate = torch.sigmoid(r.where_gate(r.qnorm(queries)))
    assert torch.allclose(looks, plain + gate * (p @ rows), atol=1e-5)
    with pytest.raises(ValueError, match="where_rows|where_table"):
        r(feats, queries, index, tokens=tokens)
    with pytest.raises(ValueError, match="needs where: true"):
        FocusReadout(5, 7, where_words=["l", "r", "t", "b"])
    with pytest.raises(ValueError, match="four words"):
        FocusReadout(5, 7, where=True, where_words=["left", "right"])


def test_where_words_are_tied_when_the_projector_is_anchored(tokenizer, tmp_path):
    """The model passes the where rows from the LM's live embeddings; anchor_where records the words'
    first tokens (alone and after a space) once, and a reloaded model keeps them."""
    from mllm.model import MultimodalLM

    model = _build_look_model(
        tokenizer,
        "anchored_mlp2x_gelu",
        value="tokens",
        where=True,
        where_words=["left", "right", "top", "bottom"],
    )
    assert not bool((model.readout.where_ids >= 0).any())
    emb = model.lm.get_input_embeddings()
    assert model.readout.anchor_where(emb, model.tokenizer) == 4
    first = model.tokenizer(" top", add_special_tokens=False)["input_ids"][0]
    assert model.readout.where_ids[2, 1] == first and model.readout.anchor_where(emb, model.tokenizer) == 0
    got = {}
    original = model.readout.forward

    def spy(*args, **kwargs):
        got.update(kwargs)
        return original(*args, **kwargs)

    model.readout.forward = spy
    batch = _batch(model, ["Is the circle at the top or the bottom?"])
    with torch.no_grad():
        model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    assert torch.allclose(got["where_rows"], model.readout.where_table(emb))
    model.readout.forward = original
    model.save_pretrained(tmp_path / "m")
    again = MultimodalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(again.readout.where_ids, model.readout.where_ids)


def test_where_bias_shapes_the_attention_by_place():
    """where_bias: s_p += sum_j c_hj phi_j(p), phi = (x, y, x^2, y^2), c = W LN(q); zero at the start."""
    from mllm.readout import _patch_coordinates

    torch.manual_seed(0)
    r = FocusReadout(5, 7, heads=2, dim=3, value="tokens", where=True, where_bias=True)
    feats, tokens = torch.randn(1, 4, 5), torch.randn(1, 4, 7)
    queries, index = torch.randn(3, 7), torch.tensor([0, 0, 0])
    base = FocusReadout(5, 7, heads=2, dim=3, value="tokens", where=True)
    base.load_state_dict({k: v for k, v in r.state_dict().items() if not k.startswith("where_bias")})
    torch.nn.init.normal_(r.out[-1].weight)
    torch.nn.init.normal_(base.out[-1].weight)
    base.out[-1].weight.data.copy_(r.out[-1].weight)
    assert torch.allclose(
        r(feats, queries, index, tokens=tokens)[0], base(feats, queries, index, tokens=tokens)[0]
    )
    torch.nn.init.normal_(r.where_bias.weight)
    looks, _ = r(feats, queries, index, tokens=tokens)
    f = r.norm(feats[0])
    q = r.q(r.qnorm(queries)).view(3, 2, 1, 3)
    k = r.k(f).view(4, 2, 3).transpose(0, 1)
    xs, ys = _patch_coordinates(4, torch.device("cpu"), torch.float32)
    c = r.where_bias(r.qnorm(queries)).view(3, 2, 4)
    bias = c[..., 0:1] * xs + c[..., 1:2] * ys + c[..., 2:3] * xs**2 + c[..., 3:4] * ys**2  # [3, H, N]
    s = (q * k[None]).sum(-1) / math.sqrt(3) + bias
    want = _tokens_look(r, s, tokens[0], (xs, ys))
    assert torch.allclose(looks, want, atol=1e-5)
    with pytest.raises(ValueError, match="where_bias"):
        FocusReadout(5, 7, where_bias="yes")


def test_order_gives_each_head_the_words_weighed_by_their_place():
    """order: head h's query is sum_t softmax_t(g_h r_t) e_t over its question's words, r from -1 (first)
    to 1 (last), g spread over [-order, order] at the start; a look without words keeps the mean."""
    torch.manual_seed(0)
    r = FocusReadout(5, 7, heads=2, dim=3, value="tokens", order=2.0)
    assert r.order.tolist() == [-2.0, 2.0]
    text, look = torch.randn(5, 7), torch.tensor([0, 0, 0, 2, 2])  # look 1 has no words
    queries = torch.randn(3, 7)
    ranks = {0: torch.tensor([-1.0, 0.0, 1.0]), 2: torch.tensor([-1.0, 1.0])}
    words = {0: text[:3], 2: text[3:]}
    per_head = r._ordered_queries(text, look, queries)
    for j in (0, 2):
        for h, g in enumerate((-2.0, 2.0)):
            want = (torch.softmax(g * ranks[j], 0)[:, None] * words[j]).sum(0)
            assert torch.allclose(per_head[j, h], want, atol=1e-6)
    assert torch.allclose(per_head[1], queries[1].expand(2, 7))
    # the look: each head attends with its own query (head h's slice of W_q applied to its words)
    feats, tokens, index = torch.randn(1, 4, 5), torch.randn(1, 4, 7), torch.tensor([0, 0, 0])
    looks, _ = r(feats, queries, index, tokens=tokens, words=(text, look))
    k = r.k(r.norm(feats[0])).view(4, 2, 3).transpose(0, 1)  # [H, N, d]
    for j in range(3):
        q = torch.stack([r.q(r.qnorm(per_head[j, h])).view(2, 3)[h] for h in range(2)])  # [H, d]
        s = (q[:, None] * k).sum(-1) / math.sqrt(3)  # [H, N]
        want = _tokens_look(r, s[None], tokens[0])[0]
        assert torch.allclose(looks[j], want, atol=1e-5)
    with pytest.raises(ValueError, match="words"):
        r(feats, queries, index, tokens=tokens)


def test_relation_words_say_where_the_object_heads_looked_against_the_subject_heads():
    """relation_words: look += sigmoid(w . LN(q) + b) * sum over (axis, side) of
    sigmoid(+-k * (mean place of the second half of the heads - of the first half)) * row; left and above
    when the object lies right of / below the subject. Refused without roles."""
    from mllm.readout import _patch_coordinates

    torch.manual_seed(0)
    kw = dict(heads=2, dim=3, value="tokens", order=1.0, roles=True)
    r = FocusReadout(5, 7, relation_words=["left", "right", "above", "below"], **kw)
    emb = torch.nn.Embedding(10, 7)
    r.relation_ids.copy_(torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]))
    torch.nn.init.normal_(r.relation_gate.weight)
    rows = r.relation_table(emb)
    w = emb.weight[1:9].view(2, 2, 2, 7).sum(2)
    assert torch.allclose(rows, (w - w.mean(1, keepdim=True)).reshape(4, 7))
    text, look = torch.randn(4, 7), torch.tensor([0, 0, 1, 1])
    feats, tokens = torch.randn(1, 4, 5), torch.randn(1, 4, 7)
    queries, index = torch.randn(2, 7), torch.tensor([0, 0])
    base = FocusReadout(5, 7, **kw)
    base.load_state_dict({k: v for k, v in r.state_dict().items() if not k.startswith("relation_")})
    looks, _ = r(feats, queries, index, tokens=tokens, words=(text, look), relation_rows=rows)
    plain, _ = base(feats, queries, index, tokens=tokens, words=(text, look))
    per_head = r._ordered_queries(text, look, queries)
    k = r.k(r.norm(feats[0])).view(4, 2, 3).transpose(0, 1)
    xs, ys = _patch_coordinates(4, torch.device("cpu"), torch.float32)
    for j in range(2):
        q = torch.stack([r.q(r.qnorm(per_head[j, h])).view(2, 3)[h] for h in range(2)])
        a = ((q[:, None] * k).sum(-1) / math.sqrt(3)).softmax(-1)  # [H, N]
        dx, dy = (a[1] * xs).sum() - (a[0] * xs).sum(), (a[1] * ys).sum() - (a[0] * ys).sum()
        p = torch.sigmoid(4.0 * torch.stack([dx, -dx, dy, -dy]))
        gate = torch.sigmoid(r.relation_gate(r.qnorm(queries[j])))
        assert torch.allclose(looks[j], plain[j] + gate * (p @ rows), atol=1e-5)
    with pytest.raises(ValueError, match="relation_rows|relation_table"):
        r(feats, queries, index, tokens=tokens, words=(text, look))
    with pytest.raises(ValueError, match="needs roles"):
        FocusReadout(5, 7, relation_words=["left", "right", "above", "below"])


# ---------------------------------------------------------------- a readout on a fused model (MoF graft)


def _mof(alpha: float):
    from mllm.config import FusionConfig

    dino = TowerConfig(type="dinov2", config=dict(TINY_TOWER), select_layer=-1)
    return FusionConfig(type="mof_additive", alpha=alpha, tower2=dino)


def _pictures(n: int = 2):
    from PIL import Image

    ims = []
    for i in range(n):
        im = Image.new("RGB", (64, 64), "white")
        im.paste((200, 40 * i, 30), (6 + 9 * i, 8, 34 + 9 * i, 40))
        ims.append(im)
    return ims


def _look_logits(model, images):
    """The embedded sequence (image tokens and looks filled) and the loss on it, for two questions."""
    b = _batch(model, ["what color is the circle?", "is there a star?"])
    b["pixel_values"] = model.preprocess(images)
    with torch.no_grad():
        embeds = model.embed(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"])
        return torch.cat([embeds.flatten(), model(**b).loss.reshape(1)])


def test_additive_mof_grafted_at_alpha_one_answers_as_the_single_tower_model(tokenizer):
    """alpha 1 keeps only the model's own tower: the graft (projector and readout kept, the fused model
    fed canonical pixels and normalising per tower) must not change a logit; alpha 0.5 must."""
    m = _build_look_model(tokenizer, **{"words": "own", "value": "tokens"}).eval()
    images = _pictures()
    want = _look_logits(m, images)
    same = m.with_fusion(_mof(1.0)).eval()
    assert same.readout is m.readout and same.projector is m.projector
    torch.testing.assert_close(_look_logits(same, images), want, atol=1e-4, rtol=1e-4)
    mixed = m.with_fusion(_mof(0.5)).eval()
    assert not torch.allclose(_look_logits(mixed, images), want, atol=1e-3)


def test_a_grafted_look_model_saves_and_loads_identically(tokenizer, tmp_path):
    from mllm.model import MultimodalLM

    fused = _build_look_model(tokenizer).with_fusion(_mof(0.5)).eval()
    images = _pictures()
    fused.save_pretrained(tmp_path / "m")
    back = MultimodalLM.from_pretrained(tmp_path / "m")
    assert back.meta.fusion["type"] == "mof_additive" and back.readout is not None
    torch.testing.assert_close(_look_logits(back, images), _look_logits(fused, images))


def _interleaved(**kw):
    from mllm.config import FusionConfig

    return FusionConfig(type="mof_interleaved", tower2=_mof(0.5).tower2, **kw)


def _embedded(model, images):
    """(image tokens [B, N', d], looks [n_looks, d]) of two questions on `images`, as `embed` fills them."""
    b = _batch(model, ["what color is the circle?", "how many squares are there?"])
    with torch.no_grad():
        e = model.embed(b["input_ids"], model.preprocess(images), attention_mask=b["attention_mask"])
    ids = b["input_ids"]
    return e[ids == model.image_token_id].view(len(images), model.num_image_tokens, -1), e[
        ids == model.meta.look_token_id
    ]


def _counting_look_model(tokenizer):
    """The demo's shape: an anchored projector (anchored to the LM's words) and a counting readout."""
    m = _build_look_model(tokenizer, "anchored_mlp2x_gelu", count=1.0, value="tokens").eval()
    torch.nn.init.normal_(m.projector.body[-1].weight, std=0.1)  # a trained projector's body is not silent
    m.projector.anchor(m.lm.get_input_embeddings(), m.tokenizer)
    return m


def test_interleaved_mof_graft_keeps_the_first_stream_and_starts_the_second_silent(tokenizer):
    """Grafted interleaved MoF: the first stream is the model's own (projector, readout, looks unchanged),
    the second stream's tokens start at zero, and max_length grows by the positions it adds. Once the
    second stream's projector has trained, its tokens speak, and the looks still read the first stream."""
    m = _counting_look_model(tokenizer)
    fused = m.with_fusion(_interleaved(projector2="mlp2x_gelu")).eval()
    assert fused.projector[0] is m.projector and fused.readout is m.readout
    assert fused.grid_projector is m.projector and not hasattr(fused.projector[1], "anchor")
    n = m.num_image_tokens
    assert fused.num_image_tokens == 2 * n and fused.meta.max_length == m.meta.max_length + n
    images = _pictures()
    img, looks = _embedded(m, images)
    img_f, looks_f = _embedded(fused, images)
    torch.testing.assert_close(img_f[:, 0::2], img)
    assert img.abs().sum() > 0 and torch.count_nonzero(img_f[:, 1::2]) == 0
    torch.testing.assert_close(looks_f, looks)
    torch.nn.init.normal_(fused.projector[1][-1].weight)
    img_t, looks_t = _embedded(fused, images)
    assert img_t[:, 1::2].abs().sum() > 0
    torch.testing.assert_close(img_t[:, 0::2], img)
    torch.testing.assert_close(looks_t, looks)


def test_an_interleaved_look_of_both_streams_starts_as_the_original_and_then_carries_the_second(
    tokenizer, tmp_path
):
    """look: both pools the second stream's projected tokens into the looks beside the first's: at the
    graft (the second stream silent) the looks are the original's; once the second stream speaks, the
    looks move (with look: first they did not), the loss reaches the second projector, and a saved model
    keeps the choice. look is refused where there is one grid (additive)."""
    from mllm.config import FusionConfig
    from mllm.model import MultimodalLM

    m = _counting_look_model(tokenizer)
    images = _pictures()
    img, looks = _embedded(m, images)
    fused = m.with_fusion(_interleaved(projector2="mlp2x_gelu", look="both")).eval()
    img_f, looks_f = _embedded(fused, images)
    torch.testing.assert_close(looks_f, looks)
    torch.testing.assert_close(img_f[:, 0::2], img)
    torch.nn.init.normal_(fused.projector[1][-1].weight)
    img_t, looks_t = _embedded(fused, images)
    assert not torch.allclose(looks_t, looks, atol=1e-3)
    # the looks' pooled value is the first stream's plus the second's at the same cells
    px = fused.preprocess(images)
    with torch.no_grad():
        _, _, pooled = fused.encode_with_grid(px)
    torch.testing.assert_close(pooled, img_t[:, 0::2] + img_t[:, 1::2])
    b = _batch(fused, ["what color is the circle?"])
    b["pixel_values"] = fused.preprocess(_pictures(1))
    fused.train()
    fused(**b).loss.backward()
    assert fused.projector[1][-1].weight.grad.abs().sum() > 0
    fused.eval().save_pretrained(tmp_path / "m")
    back = MultimodalLM.from_pretrained(tmp_path / "m")
    assert back.meta.fusion["look"] == "both"
    torch.testing.assert_close(_embedded(back, images)[1], looks_t)
    with pytest.raises(ValueError, match="look"):
        m.with_fusion(FusionConfig(type="mof_additive", tower2=_mof(0.5).tower2, look="both"))
    with pytest.raises(ValueError, match="look must be one of"):
        m.with_fusion(_interleaved(look="second"))


def test_an_interleaved_look_model_builds_trains_saves_and_loads(tokenizer, tmp_path):
    """A readout with interleaved MoF is a valid recipe (it reads the first stream); grafted or built
    fresh, the model's loss backpropagates into both streams' projectors, and a saved model reloads with
    each stream's own projector type and the same outputs."""
    from mllm.config import ModelConfig
    from mllm.model import MultimodalLM, build_lm
    from mllm.tokenizer import ensure_look_token

    inter = _interleaved(projector2="mlp2x_gelu")
    ModelConfig(readout={"type": "focus"}, fusion=inter)  # accepted at recipe load
    fused = _counting_look_model(tokenizer).with_fusion(inter)
    torch.nn.init.normal_(fused.projector[1][-1].weight)
    b = _batch(fused, ["what color is the circle?", "is there a star?"])
    b["pixel_values"] = fused.preprocess(_pictures())
    fused(**b).loss.backward()
    assert fused.projector[0].body[0].weight.grad.abs().sum() > 0
    assert fused.projector[1][0].weight.grad.abs().sum() > 0
    fused.eval().save_pretrained(tmp_path / "m")
    back = MultimodalLM.from_pretrained(tmp_path / "m")
    assert back.meta.fusion["projector2"] == "mlp2x_gelu" and back.meta.max_length == fused.meta.max_length
    assert bool(back.projector[0].anchored) and isinstance(back.projector[1], torch.nn.Sequential)
    torch.testing.assert_close(_look_logits(back, _pictures()), _look_logits(fused, _pictures()))
    tok = copy.deepcopy(tokenizer)
    ensure_look_token(tok, LOOK_TOKEN)
    fresh = MultimodalLM.build(
        TowerConfig(type="clip", config=TINY_TOWER, select_layer=-1),
        "anchored_mlp2x_gelu",
        build_lm(None, TINY_LM, len(tok)),
        tok,
        template="chatml",
        max_length=256,
        fusion=inter,
        readout={"type": "focus", "heads": 2, "dim": 8, "count": 1.0, "value": "tokens"},
    )
    assert fresh.readout.count_select[0].out_features == 8  # sized by the first stream's heads
    b = _batch(fresh, ["how many circles are there?"])
    b["pixel_values"] = fresh.preprocess(_pictures(1))
    assert torch.isfinite(fresh(**b).loss)
