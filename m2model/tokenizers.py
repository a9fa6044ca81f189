"""Bilingual tokenizers with one interface: ``tokenizer(texts) -> (input_ids, attention_mask)``.

Both return LongTensors of shape [N, context_length]: ``[CLS] tokens... [END]`` then padding on the right;
the mask is 1 on tokens (including [CLS] and [END]) and 0 on padding.

* :class:`GLMTokenizer` reads the official GLM SentencePiece model (``sp.model``, 115,244 entries, shipped
  with the released M2-Encoder code; supply the file yourself). Conventions of the official
  ``GLMChineseTokenizer``: runs of 2-10 spaces become ``<|blank_n|>`` pieces, the sequence is
  ``[CLS] ... <|endoftext|>``, padding uses ``<|endoftext|>``, 52 positions, and over-long texts are
  truncated on the LEFT (the start of the text is dropped, the end kept).
* :class:`BertTokenizer` (the default, ``"bert-base-chinese"``) is the Hugging Face ``tokenizers``
  (Rust) WordPiece pipeline of ``BertWordPieceTokenizer`` over the bert-base-chinese vocabulary (21,128
  entries) that ships inside the ``cn-clip`` wheel, configured as Chinese-CLIP's tokenizer for Chinese
  and English alike: lower-casing, accent stripping, one token per CJK character, punctuation split,
  greedy longest-match WordPiece, words of more than 200 characters -> ``[UNK]``, and special-token
  strings written in a text read as plain characters (tested to give cn-clip's ids). Sequence
  ``[CLS] ... [SEP]``, pad id 0, truncation on the RIGHT (the end of the text is dropped), as in
  Chinese-CLIP.

Empty texts are allowed: they encode to ``[CLS] [END]`` (a documented, deterministic result); an empty
*list* of texts raises ValueError, as does anything that is not a string.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import BERT_CHINESE_VOCAB_SIZE, OFFICIAL_VOCAB_SIZE

__all__ = [
    "Tokenizer", "BertTokenizer", "GLMTokenizer", "get_tokenizer", "bundled_bert_vocab_path",
    "require_vocab_match",
]


class Tokenizer:
    """Common interface. Subclasses implement :meth:`encode_one` (text -> ids without special tokens)."""

    cls_id: int
    end_id: int
    pad_id: int
    truncation_side: str  # "left" or "right"
    vocab_size: int

    def __init__(self, context_length: int):
        if not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                f"context_length must be an int >= 2 (room for the two special tokens), "
                f"got {context_length!r}"
            )
        self.context_length = context_length

    def encode_one(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids without special tokens for each text (subclasses may batch this)."""
        return [self.encode_one(text) for text in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None):
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: nothing to tokenize")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a str")
        length = self.context_length if context_length is None else context_length
        if length < 2:
            raise ValueError(f"context_length must be >= 2, got {length}")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), length), dtype=torch.long)
        room = length - 2
        for i, body in enumerate(self.encode_batch(list(texts))):
            if len(body) > room:
                body = body[len(body) - room :] if self.truncation_side == "left" else body[:room]
            row = [self.cls_id, *body, self.end_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask


# --------------------------------------------------------------------------- WordPiece (bert-base-chinese)


def bundled_bert_vocab_path() -> Path:
    """Path of the bert-base-chinese vocab.txt inside the installed cn-clip wheel (nothing is imported)."""
    spec = importlib.util.find_spec("cn_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default tokenizer needs the bert-base-chinese vocabulary shipped in the "
            "cn-clip wheel: `pip install --no-deps cn-clip`, or pass a vocab.txt path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "clip" / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f"cn-clip is installed but {path} is missing")
    return path


class BertTokenizer(Tokenizer):
    """Uncased WordPiece over a BERT vocab.txt (default: bert-base-chinese from the cn-clip wheel), run by
    the Rust ``tokenizers`` library."""

    truncation_side = "right"

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        context_length: int = 52,
        max_chars_per_word: int = 200,  # Chinese-CLIP's WordpieceTokenizer limit
    ):
        super().__init__(context_length)
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers

        path = Path(vocab_file) if vocab_file is not None else bundled_bert_vocab_path()
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        vocab = {t: i for i, t in enumerate(tokens)}
        for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
            if t not in vocab:
                raise ValueError(f"{path} is not a BERT vocabulary: {t} is missing")
        self.vocab, self.inv_vocab, self.vocab_size = vocab, tokens, len(tokens)
        self.cls_id, self.end_id = vocab["[CLS]"], vocab["[SEP]"]
        self.pad_id, self.unk_id = vocab["[PAD]"], vocab["[UNK]"]
        # BertWordPieceTokenizer's pipeline, but without registering [CLS], [SEP], ... as added tokens: those
        # would be matched inside a text ("a [CLS] b" -> 101), where Chinese-CLIP's tokenizer reads plain
        # characters ("[", "cl", "##s", "]")
        self._tok = RustTokenizer(models.WordPiece(vocab, unk_token="[UNK]",
                                                   max_input_chars_per_word=max_chars_per_word))
        self._tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                          strip_accents=True, lowercase=True)
        self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tok.decoder = decoders.WordPiece(prefix="##")

    def encode_one(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # the whole batch in Rust (in parallel)
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        special = {self.cls_id, self.end_id, self.pad_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in special])


# --------------------------------------------------------------------------- GLM SentencePiece


def _encode_whitespaces(text: str) -> str:
    for n in range(10, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _decode_whitespaces(text: str) -> str:
    for n in range(10, 1, -1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text


class GLMTokenizer(Tokenizer):
    """The official M2-Encoder tokenizer: the GLM SentencePiece model (``sp.model``).

    Special tokens ``[CLS]``, ``<|endoftext|>`` (end and pad), ``[MASK]``, ``[UNK]`` are looked up as
    pieces of the model. One that is not a piece gets an id after the SentencePiece vocabulary in the order
    the official (Hugging Face) tokenizer registers added tokens: ``<|endoftext|>``, ``[CLS]``,
    ``[MASK]``; ``[UNK]`` is then the model's own unknown piece. ``special_ids`` overrides any of them,
    e.g. ``{"[CLS]": 50002}``.

    These four strings written in a text are special tokens there too (``"a [CLS] b"`` -> ``a``,
    ``[CLS]``, ``b``, the spaces beside them dropped), as the official tokenizer splits them out; tested
    against its ids.
    """

    truncation_side = "left"
    SPECIAL_ORDER = ("<|endoftext|>", "[UNK]", "[CLS]", "[MASK]")

    def __init__(
        self,
        model_file: str | os.PathLike,
        context_length: int = 52,
        special_ids: dict[str, int] | None = None,
    ):
        super().__init__(context_length)
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover
            raise ImportError("GLMTokenizer needs the `sentencepiece` package") from e
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {path} does not exist")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on corrupt files
            raise ValueError(f"{path} is not a readable SentencePiece model: {e}") from e
        n = self.sp.get_piece_size()
        ids, extra = {}, n
        for tok in self.SPECIAL_ORDER:
            pid = self.sp.piece_to_id(tok)
            if pid != self.sp.unk_id() or self.sp.id_to_piece(pid) == tok or tok == "[UNK]":
                ids[tok] = pid  # [UNK] is never added: without a piece of its own it is the model's unk
            else:
                ids[tok] = extra
                extra += 1
        ids.update(special_ids or {})
        self.special_ids = ids
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self.SPECIAL_ORDER) + ")")
        self.cls_id, self.end_id = ids["[CLS]"], ids["<|endoftext|>"]
        self.pad_id = self.end_id
        self.vocab_size = max(extra, max(ids.values()) + 1)

    def encode_one(self, text: str) -> list[int]:
        # As the official tokenizer (a transformers 4.17 PreTrainedTokenizer): a special-token string in
        # the text is that token, the whitespace on both sides of it is dropped, and every stretch between
        # them is encoded on its own (so each gets SentencePiece's word-start marker).
        parts = self._special_re.split(text)
        for i in range(1, len(parts), 2):  # odd positions hold the special tokens
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        ids = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(_encode_whitespaces(part), out_type=int))
        return ids

    def decode(self, ids) -> str:
        n = self.sp.get_piece_size()
        special = set(self.special_ids.values())
        body = [int(i) for i in ids if int(i) not in special and 0 <= int(i) < n]
        return _decode_whitespaces(self.sp.decode(body))


def require_vocab_match(tokenizer: Tokenizer, vocab_size: int, what: str = "the model") -> None:
    """ValueError unless ``tokenizer`` has exactly ``vocab_size`` ids: a tokenizer of another vocabulary
    (the default bert-base-chinese, 21,128 entries, against a released checkpoint's 115,244 GLM pieces)
    runs without error and gives meaningless embeddings."""
    if tokenizer.vocab_size == vocab_size:
        return
    hint = ""
    if vocab_size == OFFICIAL_VOCAB_SIZE:
        hint = ": it is the official GLM vocabulary, use the GLM SentencePiece model (sp.model)"
    elif vocab_size == BERT_CHINESE_VOCAB_SIZE:
        hint = ": it is the bert-base-chinese vocabulary, use the tokenizer 'bert-base-chinese'"
    raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has {tokenizer.vocab_size:,} ids but "
                     f"{what} has a {vocab_size:,}-entry vocabulary{hint}")


def get_tokenizer(
    name_or_path: str | os.PathLike = "bert-base-chinese", context_length: int = 52, **kwargs
) -> Tokenizer:
    """``"bert-base-chinese"`` (bundled default), a ``*.model`` SentencePiece file (official GLM tokenizer),
    a ``vocab.txt`` (WordPiece), or a directory holding ``sp.model`` or ``vocab.txt``."""
    name = str(name_or_path)
    if name in ("bert-base-chinese", "bert", "default"):
        return BertTokenizer(None, context_length, **kwargs)
    path = Path(name)
    if path.is_dir():
        for fname, cls in (("sp.model", GLMTokenizer), ("vocab.txt", BertTokenizer)):
            if (path / fname).is_file():
                return cls(path / fname, context_length, **kwargs)
        raise FileNotFoundError(f"{path} holds neither sp.model nor vocab.txt")
    if not path.is_file():
        raise FileNotFoundError(f"unknown tokenizer {name!r}: not 'bert-base-chinese' and no such file")
    if path.suffix == ".txt":
        return BertTokenizer(path, context_length, **kwargs)
    return GLMTokenizer(path, context_length, **kwargs)
