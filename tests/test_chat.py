import pytest
import torch

from mllm.chat import IGNORE_INDEX, SampleError, adds_bos, encode_conversation


def _conv(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chatml_labels_match_hand_built(tokenizer):
    img = tokenizer.convert_tokens_to_ids("<image>")
    enc = encode_conversation(
        _conv(("<image>\nWhat color is the circle?", "red"), ("How many shapes are there?", "2")),
        tokenizer,
        "chatml",
        img,
        num_image_tokens=3,
        num_images=1,
    )
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    # Hand-built: bos, user turn (image expanded to 3), assistant header, reply + <|im_end|> (target), "\n", ...
    user1 = _ids(tokenizer, "<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n")
    k = user1.index(img)
    user1 = user1[:k] + [img] * 3 + user1[k + 1 :]
    head = _ids(tokenizer, "<|im_start|>assistant\n")
    r1 = _ids(tokenizer, "red<|im_end|>")
    nl = _ids(tokenizer, "\n")
    user2 = _ids(tokenizer, "<|im_start|>user\nHow many shapes are there?<|im_end|>\n")
    r2 = _ids(tokenizer, "2<|im_end|>")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    want = bos + user1 + head + r1 + nl + user2 + head + r2 + nl
    assert ids == want
    want_labels = (
        [IGNORE_INDEX] * (len(bos) + len(user1) + len(head))
        + r1
        + [IGNORE_INDEX] * (len(nl) + len(user2) + len(head))
        + r2
        + [IGNORE_INDEX] * len(nl)
    )
    assert labels == want_labels
    assert ids.count(img) == 3


def test_plain_template_keeps_only_caption(tokenizer):
    img = tokenizer.convert_tokens_to_ids("<image>")
    enc = encode_conversation(
        _conv(("Describe the image briefly.\n<image>", "a red circle")),
        tokenizer,
        "plain",
        img,
        num_image_tokens=4,
        num_images=1,
    )
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    cap = _ids(tokenizer, "a red circle") + [tokenizer.eos_token_id]
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    assert ids == bos + [img] * 4 + _ids(tokenizer, "\n") + cap
    assert [t for t in labels if t != IGNORE_INDEX] == cap


def test_vicuna_and_tokenizer_templates_mask_user_turns(tokenizer):
    img = tokenizer.convert_tokens_to_ids("<image>")
    for name in ("vicuna_v1", "tokenizer"):
        enc = encode_conversation(
            _conv(("<image>\nWhat color is the circle?", "blue")), tokenizer, name, img, 2, 1
        )
        kept = [t for t in enc["labels"].tolist() if t != IGNORE_INDEX]
        assert tokenizer.decode(kept, skip_special_tokens=True).strip() == "blue"


@pytest.mark.parametrize(
    "conv,n_images,msg",
    [
        (_conv(("<image>\n<image> What?", "red")), 1, "2 <image> marker"),
        (_conv(("What color?", "red")), 1, "0 <image> marker"),
        ([{"from": "human", "value": "<image> hi"}], 1, "no assistant turn"),
        ([{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}], 0, "unknown role"),
        ([], 0, "non-empty"),
    ],
)
def test_bad_conversations_name_the_sample(tokenizer, conv, n_images, msg):
    img = tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(SampleError) as e:
        encode_conversation(conv, tokenizer, "chatml", img, 4, n_images, sample="data.json sample #7")
    assert "data.json sample #7" in str(e.value) and msg in str(e.value)


def test_too_long_is_an_error_not_a_truncation(tokenizer):
    img = tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(SampleError, match="exceed max_length"):
        encode_conversation(
            _conv(("<image>\nWhat color?", "red")),
            tokenizer,
            "chatml",
            img,
            64,
            1,
            max_length=32,
            sample="s1",
        )


def test_generation_prompt_is_a_prefix_of_training_ids(tokenizer):
    img = tokenizer.convert_tokens_to_ids("<image>")
    full = encode_conversation(_conv(("<image>\nWhat color?", "red")), tokenizer, "chatml", img, 2, 1)[
        "input_ids"
    ]
    prompt = encode_conversation(
        [("user", "<image>\nWhat color?")], tokenizer, "chatml", img, 2, 1, for_generation=True
    )["input_ids"]
    assert torch.equal(full[: len(prompt)], prompt)


def test_image_placement_before_and_after():
    from mllm.chat import with_image

    assert with_image("What color is it?") == "<image>\nWhat color is it?"
    assert with_image("What color is it?", "after") == "What color is it?\n<image>"
    assert with_image("Compare.", "after", n=2) == "Compare.\n<image>\n<image>"
    assert with_image("No image.", "after", n=0) == "No image."
    with pytest.raises(ValueError, match="unknown image placement 'middle'"):
        with_image("q", "middle")


def test_answer_batch_asks_where_the_model_was_trained_to_see(tiny_model, monkeypatch):
    """`meta.image_placement` decides the evaluation prompt: the question's tokens precede the image's."""
    from PIL import Image

    import mllm.inference as inf

    seen = []
    real = inf.prompt_ids
    monkeypatch.setattr(inf, "prompt_ids", lambda m, turns, n: seen.append(turns) or real(m, turns, n))
    img = Image.new("RGB", (32, 32), "white")
    tiny_model.meta.image_placement = "after"
    inf.answer_batch(tiny_model, ["What color is it?"], [img], max_new_tokens=1)
    tiny_model.meta.image_placement = "before"
    inf.answer_batch(tiny_model, ["What color is it?"], [img], max_new_tokens=1)
    assert [t[0][1] for t in seen] == ["What color is it?\n<image>", "<image>\nWhat color is it?"]
