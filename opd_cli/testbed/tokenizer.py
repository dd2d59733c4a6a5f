"""Character-level tokenizer for the testbed, saved as a Hugging Face fast tokenizer.

One token per character, plus role markers so prompts go through a real chat template:

    <|system|>S:concise<|end|><|user|>Q:347+285<|end|><|assistant|>7+5+0=12;...;A:632<|end|>

`<|end|>` is the EOS token. transformers (`AutoTokenizer`) and vLLM load the saved directory like any
model's tokenizer, so the rollout, teacher and evaluation code paths are the ones used for Qwen3.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, END = "<pad>", "<unk>", "<|end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, END, SYSTEM, USER, ASSISTANT]
# newline + printable ASCII: every character a testbed string can contain.
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|system|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The testbed tokenizer (vocabulary: 6 special tokens + 96 characters = 102 ids)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S]: any character, newline included (the tokenizers regex engine rejects the (?s) flag).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_char_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    tok = build_char_tokenizer()
    tok.save_pretrained(str(directory))
    return tok
