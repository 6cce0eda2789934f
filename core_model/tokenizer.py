"""GPT-2's byte-level BPE, offline, from GPT-2's own data files vendored in `gpt2_tokenizer/`.

`encoder.json` and `vocab.bpe` are OpenAI's files, unchanged (origin and licence in
`core_model/gpt2_tokenizer/NOTICE` and `LICENSE`); they ship inside the wheel as package data.

`CaptionTokenizer(vocab_size)` with vocab_size < 50257 keeps GPT-2's first `vocab_size - 1` ids
(the 256 byte tokens and the earliest, most frequent merges) and puts <|endoftext|> at the last
id. GPT-2 numbers merge k as id 256 + k, so the limited tokenizer is GPT-2's with fewer merges:
its ids are GPT-2 ids, and every string is still encodable from the byte tokens.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

from .config import GPT2_VOCAB_SIZE

EOS_TEXT = "<|endoftext|>"
N_BYTE_TOKENS = 256


@functools.cache
def _gpt2_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("core_model") / "gpt2_tokenizer"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    # lines[0] is the "#version" header; some real merges begin with "#" too, so skip by position only.
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    if len(vocab) != GPT2_VOCAB_SIZE or len(merges) != GPT2_VOCAB_SIZE - N_BYTE_TOKENS - 1:
        raise RuntimeError(f"{data} does not hold GPT-2's BPE (wrong sizes)")
    return vocab, merges  # type: ignore[return-value]


class CaptionTokenizer:
    """Encodes captions to ids and back. `eos_id` ends every caption and pads batches."""

    def __init__(self, vocab_size: int = GPT2_VOCAB_SIZE):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        if not N_BYTE_TOKENS + 1 <= vocab_size <= GPT2_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be in [{N_BYTE_TOKENS + 1}, {GPT2_VOCAB_SIZE}]")
        full_vocab, full_merges = _gpt2_files()
        n_regular = vocab_size - 1
        vocab = {tok: i for tok, i in full_vocab.items() if i < n_regular}
        vocab[EOS_TEXT] = n_regular
        merges = full_merges[: n_regular - N_BYTE_TOKENS]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab_size = vocab_size
        self.eos_id = n_regular

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS. A leading space is added (as GPT-2 sees mid-text words)."""
        return self._tok.encode(" " + text.strip()).ids

    def encode_caption(self, text: str, max_tokens: int) -> list[int]:
        """Ids for training: the caption cut to max_tokens - 1, then EOS, so the model learns to stop."""
        ids = self.encode(text)[: max_tokens - 1]
        return ids + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, stopping at the first EOS."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            out.append(i)
        return self._tok.decode(out).strip()
