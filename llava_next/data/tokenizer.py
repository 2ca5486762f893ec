"""Training a small tokenizer, for models built from scratch (the demo model's), with the `tokenizers` library.

It is in the style of the llama tokenizers the LLaVA checkpoints use: byte-fallback BPE over sentencepiece-style
"▁" word boundaries, BOS added by the post-processor, and `<image>` and `<pad>` as special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ..outputs import output_directory
from .records import DataError, read_records

SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 512) -> Path:
    """Train on `texts` and write tokenizer.json and tokenizer_config.json into `out`. `vocab_size` bounds what BPE
    learns (the special tokens and the characters seen included); the 256 byte tokens come on top."""
    texts = list(texts)
    if not any(text.strip() for text in texts):
        raise DataError("there is no text to train a tokenizer on: the data has no turns with text")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # words never merge across a space, and the first word gets its "▁" too, as sentencepiece does
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                             show_progress=False))
    # The 256 byte tokens go right after the specials, as ordinary vocabulary: any character outside the training
    # text still encodes (and decodes) exactly, byte by byte.
    spec = json.loads(tokenizer.to_str())
    trained = spec["model"]["vocab"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"]["vocab"] = vocab
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    out = output_directory(out)
    tokenizer.save(str(out / "tokenizer.json"))
    decoder = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True} for t in SPECIALS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "padding_side": "left", "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2))
    return out


def texts_of(paths: Iterable[str | Path], template_source: str | None = None) -> list[str]:
    """Every turn's text of LLaVA-format files without the image placeholders, and, given a chat template, every
    conversation as that template renders it (so its role markers become tokens too)."""
    from ..prompt import ChatTemplate

    records = [r for path in paths for r in read_records(path)]
    texts = [text.replace("<image>", "") for r in records for _, text in r.turns]
    if template_source is not None:
        template = ChatTemplate(template_source, "template", {"bos_token": "<s>", "eos_token": "</s>"})
        texts += [template.render(r.messages(), add_generation_prompt=False).text.replace("<image>", "")
                  for r in records]
    return texts
