"""The embedded default tokenizer: a byte-level BPE trained on GeoWorld text, saved in HF format.

Byte-level BPE never meets an unknown character, so a user's free-form chat input cannot crash the
demo model; the vocabulary is tiny because the world's language is. `<image>` and the ChatML markers
are added special tokens so they are never split, and the tokenizer carries a chat template so that
`template: tokenizer` and third-party tools see the same format the project trains with.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from encoders.common import load_tokenizer as load_tokenizer

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]

CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a Hugging Face fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"],
    )
    hf.chat_template = CHATML_JINJA
    return hf


def ensure_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> int:
    """Add `<image>` (and a pad token) to a user's tokenizer if missing; return the image token id.

    A real LM's tokenizer has no image token; adding it as a special token keeps it unsplittable.
    The caller must resize the LM's embeddings when this grows the vocabulary.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token)


def ensure_look_token(tokenizer: PreTrainedTokenizerBase, look_token: str) -> int:
    """Add a readout's look token (mllm.readout) as a special token if missing; return its id.

    Added beside the tokenizer's other special tokens (never replacing them); the caller resizes the
    LM's embeddings when this grows the vocabulary.
    """
    if look_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [look_token]}, replace_extra_special_tokens=False
        )
    return tokenizer.convert_tokens_to_ids(look_token)
