import pytest

from mllm.config import ConfigError, load_recipe, recipe_from_dict
from mllm.tokenizer import IMAGE_TOKEN, ensure_image_token, load_tokenizer, train_tokenizer


def test_tokenizer_round_trips_in_hf_format(tmp_path):
    tok = train_tokenizer(["a red circle", "What color is the square?", "blue"] * 10, vocab_size=300)
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    text = "<image>\nWhat color is the purple hexagon? ünïcode ok"
    ids = again(text, add_special_tokens=False)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert again.decode(ids) == text  # byte-level: nothing is unknown
    assert ids[0] == again.convert_tokens_to_ids(IMAGE_TOKEN)  # never split
    assert again.chat_template and "<|im_start|>" in again.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )
    assert ensure_image_token(again) == again.convert_tokens_to_ids(IMAGE_TOKEN)


def test_recipes_load_and_overrides_apply():
    r = load_recipe(
        "train/recipes/tiny-geoworld.yaml",
        ["extra.world=/w", "stages.instruct.lr=2e-5", "engine.backend=deepspeed"],
    )
    assert r.stage("align").data.json == "/w/align.json"
    assert r.stage("instruct").data.live.heldout == "/w" and r.stage("instruct").data.json is None
    assert r.stage("instruct").lr == 2e-5 and r.engine.backend == "deepspeed"
    big = load_recipe("train/recipes/llava15-7b.yaml")
    assert big.model.tower.path == "/models/clip-vit-large-patch14-336" and big.model.template == "vicuna_v1"
    assert big.stage("align").zero_config == "train/ds/zero2.json"


def test_recipe_typos_are_errors():
    with pytest.raises(ConfigError, match="unknown key"):
        recipe_from_dict({"name": "x", "engine": {"backnd": "torch"}})
    with pytest.raises(ConfigError, match="expected int"):
        recipe_from_dict({"stages": [{"name": "a", "batch_size": "big"}]})
    with pytest.raises(ConfigError, match="extra.world is not set"):
        recipe_from_dict({"stages": [{"name": "a", "data": {"json": "${world}/a.json"}}]})
