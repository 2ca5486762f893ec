"""Records how transformers 4.37.2 tokenizes and decodes with the tiny checkpoints' sentencepiece tokenizer.model,
for tests/test_original_tokenizer.py. Writes reference/tokenizers.json.

Not run by the tests: it needs the original code's environment (see make_reference.py's docstring), from the
repository root:

    .venv-llava-orig/bin/python tests/original/make_tokenizer_reference.py

The three tiny checkpoints share one tokenizer.model and differ in tokenizer_config.json's `legacy` (false for
llava-v1.5-tiny and llava-v1.6-vicuna-tiny, true for llava-v1.6-mistral-tiny). Recorded for six tokenizers: the
slow LlamaTokenizer with legacy false and true, the fast LlamaTokenizerFast converted from tokenizer.model (from
both directories: the conversion ignores `legacy`), and the slow ones with the tokens the original builder adds
(`<im_patch>`, `<im_start>`, `<im_end>`, added as it adds them):

- `encode`: tokenizer(text).input_ids for every hand-picked text; `encode_random`: the same for seeded random
  texts, with the three tokenizers without added tokens;
- `image_chunks`: llava's tokenizer_image_token(text, tokenizer) for texts with `<image>` (-200 marks an image);
- `decode`: tokenizer.decode(ids, skip_special_tokens=False and True) for hand-built id sequences and for the
  encoding of the hand-picked texts (with the added tokens: of those that contain them).

Deterministic: two runs write the same file.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference" / "tokenizers.json"
IM_TOKENS = ["<im_patch>", "<im_start>", "<im_end>"]

TEXTS = [
    "",
    " ",
    "  ",
    "    ",
    "\n",
    "\t",
    "Hello world",
    "hello world",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "   both sides   ",
    "two  spaces and   three",
    "a\nnewline",
    "\nstarts with a newline",
    "ends with a newline\n",
    "\n\n\ndouble\n\nnewlines\n\n",
    "tabs\tand\t\ttwo tabs",
    "\tstarts with a tab",
    "windows\r\nline end",
    "mixed \t \n whitespace",
    "digits 12345 and 3.14",
    "1,000,000 and 0.5%",
    "2024-01-31 12:59:59",
    "unicode: café, naïve, 北京, 🦙",
    "über straße résumé",
    "e\u0301 combining accent",
    "non\u00a0breaking space",
    "ideographic\u3000space",
    "zero\u200bwidth",
    "emoji 😀🎉 and family 👨‍👩‍👧",
    "Ελληνικά και русский",
    "العربية",
    "日本語のテキスト",
    "control \x01 and \x7f chars",
    "▁literal metaspace",
    "▁",
    "▁▁two",
    "a▁b",
    "<s>",
    "</s>",
    "<unk>",
    "<s>Hello",
    "<s> Hello",
    "Hello</s>",
    "Hello </s>",
    "Hello</s>world",
    "Hello </s> world",
    "</s> after an end token",
    "text<s>inside",
    "<s></s>",
    "<s> </s>",
    "</s></s>",
    "</s>\n</s>",
    "x<unk>y",
    " <unk> ",
    "<<s>>",
    "<s",
    "</s",
    "s>",
    "<image>",
    "<image>\nDescribe",
    "USER: <image>\nWhat is this? ASSISTANT:",
    "[INST] hi [/INST]",
    "[INST] <image>\nWhat is shown? [/INST]",
    "A chat between a curious human and an artificial intelligence assistant. USER: hi ASSISTANT: hello</s>USER: "
    "again ASSISTANT:",
    "<im_patch>",
    "<im_start><im_end>",
    "a<im_patch>b",
    "a <im_start> b <im_end> c",
    "<im_start>\n<image>\n<im_end>",
    " <im_patch>",
    "<im_patch> </s>",
    "Describe the image in detail.",
    "What is the color of the square in the picture?",
    "ASSISTANT: The image shows a red circle.",
    "yes.no!maybe?",
    "(parentheses) [brackets] {braces}",
    'quotes "double" and \'single\'',
    "path/to/file.txt",
    "x" * 40,
    "ab" * 25,
    "the the the the the",
    "Thethethe",
]

IMAGE_TEXTS = [
    "<image>",
    "<image>\nDescribe",
    "A<image>B",
    "A <image> B",
    "<image><image>",
    "<image>\n<image>\nWhat is different between these two pictures?",
    "USER: <image>\nHi ASSISTANT:",
    "[INST] <image>\nWhat is shown? [/INST]",
    "no image at all",
    "",
    " <image>",
    "<image> ",
    "text<image>",
    "</s><image></s>",
    "<s><image>",
    "<image><s>",
    "<im_start><image><im_end>",
    "x <im_patch><image> y",
]

WORDS = ("a chat between curious human user and an artificial intelligence assistant the gives helpful detailed polite "
         "answers to human's user's questions USER ASSISTANT describe image in detail what is shown this picture "
         "color red green blue circle square there are two three small large cat dog sky").split()
EXTRAS = [" ", " ", " ", "  ", "\n", "\t", ".", ",", "?", "!", ":", "'", "1", "23", "456", "é", "北", "🦙", "€",
          "ß", "▁", "<s>", "</s>", "<unk>", "<image>", "<", ">", "/", "-", "\u00a0", "Ü", "q", "zz", "x"]


def random_texts(count: int = 150, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.55:
                word = rng.choice(WORDS)
                parts.append(word.capitalize() if rng.random() < 0.2 else word)
            else:
                parts.append(rng.choice(EXTRAS))
            if rng.random() < 0.6:
                parts.append(" ")
        texts.append("".join(parts))
    return texts


def load_tokenizers():
    from transformers import AutoTokenizer

    v15 = HERE / "llava-v1.5-tiny"
    mistral = HERE / "llava-v1.6-mistral-tiny"
    tokenizers = {
        "slow_legacy_false": AutoTokenizer.from_pretrained(v15, use_fast=False),
        "slow_legacy_true": AutoTokenizer.from_pretrained(mistral, use_fast=False),
        "fast": AutoTokenizer.from_pretrained(mistral, use_fast=True),
        "fast_from_legacy_false": AutoTokenizer.from_pretrained(v15, use_fast=True),
    }
    for name, directory, use_fast in (("slow_legacy_false_im", v15, False), ("slow_legacy_true_im", mistral, False),
                                      ("fast_im", mistral, True)):
        tokenizer = AutoTokenizer.from_pretrained(directory, use_fast=use_fast)
        # as llava/model/builder.py adds them (mm_use_im_patch_token, then mm_use_im_start_end)
        tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
        tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
        tokenizers[name] = tokenizer
    described = {
        name: {"directory": ("llava-v1.5-tiny" if "legacy_false" in name else "llava-v1.6-mistral-tiny"),
               "class": type(t).__name__, "added_tokens": IM_TOKENS if name.endswith("_im") else [],
               "len": len(t)}
        for name, t in tokenizers.items()
    }
    return tokenizers, described


def decode_sequences(tokenizer) -> list[list[int]]:
    """Id sequences around the decoders' particulars: leading "▁" pieces, special tokens inside text, byte pieces
    that make whole, partial and malformed characters, the unknown id, added tokens."""
    def byte(value: int) -> int:
        return tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>")

    space = tokenizer.convert_tokens_to_ids("▁")
    words = tokenizer(" Hello world", add_special_tokens=False).input_ids
    plain = tokenizer("Hello", add_special_tokens=False).input_ids
    llama = [byte(b) for b in "🦙".encode()]
    sequences = [
        [], [0], [1], [2], [1, 2], [2, 1], [1, *words], [*words, 2], [1, *words, 2], [2, *words], [*words, 2, *words],
        [1, 1, *words], [*words, 0, *words], [0, *words], [*plain, 2, *plain], [*plain, 1, 2, *plain],
        [space], [space, space], [space, *words], [space, space, *words], [space, 2, space], [byte(10), *words],
        [*words, byte(10)], [byte(10), byte(10)], [byte(0xE5)], [byte(0xE5), byte(0x8C)], [byte(0xFF)],
        [byte(0xFF), *words], [byte(0xC3), byte(0xA9), *words], [*words, *llama], [*words, *llama[:2]],
        [*llama[:2], *words], [*llama[:3], byte(0x41)], [byte(0x41), byte(0xC3)], [byte(0x20), *words],
        [1, byte(0x20), *words], [space, *llama], [1, space, *plain],
    ]
    if len(tokenizer) > 1000:  # the added tokens: 1000 <im_patch>, 1001 <im_start>, 1002 <im_end>
        sequences += [
            [1000], [1000, 1000], [1, 1000, *words], [*words, 1000, *words], [1001, *words, 1002], [*words, 1000],
            [space, 1000, space], [1000, *plain], [*plain, 1000, 2, *plain], [1001, 1, 1002], [1000, space, *words],
            [*words, 2, 1000, *words], [byte(0xE5), 1000, byte(0x8C)],
        ]
    return sequences


def main() -> None:
    import sentencepiece
    import tokenizers as hf_tokenizers
    import transformers
    from llava.mm_utils import tokenizer_image_token

    tokenizers, described = load_tokenizers()
    fuzz = random_texts()
    ref = {
        "versions": {"transformers": transformers.__version__, "tokenizers": hf_tokenizers.__version__,
                     "sentencepiece": sentencepiece.__version__},
        "tokenizers": described,
        "texts": TEXTS,
        "random_texts": fuzz,
        "image_texts": IMAGE_TEXTS,
        "encode": {}, "encode_random": {}, "image_chunks": {}, "decode": {},
    }
    for name, tokenizer in tokenizers.items():
        ref["encode"][name] = [tokenizer(t).input_ids for t in TEXTS]
        ref["image_chunks"][name] = [tokenizer_image_token(t, tokenizer) for t in IMAGE_TEXTS]
        # kept under 200 KB: the random texts and the decoding of every text only where they can differ (the
        # added tokens change nothing for text without them, and the conversion ignores legacy)
        if name in ("slow_legacy_false", "slow_legacy_true", "fast"):
            ref["encode_random"][name] = [tokenizer(t).input_ids for t in fuzz]
        if name == "fast_from_legacy_false":
            continue
        encoded = [ids for t, ids in zip(TEXTS, ref["encode"][name]) if "<im_" in t or not name.endswith("_im")]
        sequences = decode_sequences(tokenizer) + encoded
        ref["decode"][name] = [
            {"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=False),
             "text_skipping_special": tokenizer.decode(ids, skip_special_tokens=True)}
            for ids in sequences
        ]
    text = json.dumps(ref, indent=1, ensure_ascii=False)
    # one line per list of numbers keeps the file short and readable
    text = re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)
    text = re.sub(r"\[\s*\]", "[]", text)
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
