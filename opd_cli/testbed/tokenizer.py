"""Character-level tokenizer for the testbed, saved as a Hugging Face fast tokenizer.

One token per character, plus role markers so prompts go through a real chat template:

    <|system|>S:concise<|end|><|user|>Q:347+285<|end|><|assistant|>7+5+0=12;...;A:632<|end|>

`<|end|>` is the EOS token. transformers (`AutoTokenizer`) and vLLM load the saved directory like any
model's tokenizer, so the rollout, teacher and evaluation code paths are the ones used for Qwen3.

Byte-level, like Qwen's: the vocabulary holds GPT-2's byte-level symbols (`Ċ` for a newline, `Ġ` for a
space; printable ASCII maps to itself), the pre-tokenizer splits into characters and maps them with
ByteLevel, the decoder maps back. Why: the testbed models are `qwen2` models, and transformers 5's
`AutoTokenizer` loads their directory as `Qwen2Tokenizer`, which puts its own byte-level pre-tokenizer in
front of the saved vocabulary. With raw `\n`/` ` entries those two characters became unknown and were
silently dropped at run time (the OPSD teachers' `{problem}\nH:{answer}` prompts lost their separator),
while the build, which uses this module's tokenizer directly, kept them. With byte-level entries both
loaders give the same ids (tests/test_testbed.py checks every character through `AutoTokenizer`).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, END = "<pad>", "<unk>", "<|end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, END, SYSTEM, USER, ASSISTANT]
# newline + printable ASCII: every character a testbed string can contain (ids 6..101, in this order).
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]
# their byte-level symbols (GPT-2's byte-to-unicode map: printable ASCII is itself)
_BYTE_LEVEL = {"\n": "\u010a", " ": "\u0120"}

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
    symbols = [_BYTE_LEVEL.get(c, c) for c in CHARACTERS]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + symbols)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S]: any character, newline included (the tokenizers regex engine rejects the (?s) flag).
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
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
