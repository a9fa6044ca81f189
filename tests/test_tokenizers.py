import importlib.util
import random

import pytest
import torch

from m2model.tokenizers import (
    BertTokenizer,
    GLMTokenizer,
    bundled_bert_vocab_path,
    get_tokenizer,
    require_vocab_match,
)

MIXED = [
    "一只猫坐在垫子上。A cat sits on the mat!",
    "Café naïve résumé，你好世界 hello-world 2024年",
    "北京的秋天 is beautiful, 尤其是香山的红叶 (red leaves).",
    "THE QUICK brown fox 跳过了 lazy dogs",
]


@pytest.fixture(scope="module")
def bert():
    return get_tokenizer("bert-base-chinese", context_length=52)


def test_bert_matches_chinese_clip_reference_tokenizer(bert):
    path = bundled_bert_vocab_path().parent / "bert_tokenizer.py"
    pytest.importorskip("six")
    spec = importlib.util.spec_from_file_location("_cnclip_bert_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = mod.FullTokenizer()
    # words of 150 and 250 characters: cn-clip gives [UNK] only past 200
    fixed = [*MIXED, "unaffable tokenization 😀 ☃", "\tTabs\nand\r\nnewlines ", "", "a" * 150, "b" * 250,
             "x\u0000y\ufffdz", "ＡＢＣ１２３ full-width", "日本語のテキスト 한국어 текст",
             "\u200bzero\u00adsoft",
             # special-token strings in a text are plain characters to cn-clip (not [CLS] = 101)
             "a [CLS] b [SEP]", "x[MASK]y [PAD] [UNK]", "<|endoftext|>"]
    rng = random.Random(0)
    alphabet = [chr(c) for c in [*range(32, 0x250), *range(0x3000, 0x3040), *range(0x4E00, 0x4E80),
                                 *range(0x1F300, 0x1F340), 0x200B, 0xAD, 0xFEFF, 0xA0]]
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for text in fixed + fuzz:
        assert bert.encode_one(text) == ref.convert_tokens_to_ids(ref.tokenize(text)), text
    ids, _ = bert(fixed, context_length=52)  # the batched (Rust, parallel) path agrees
    for row, text in zip(ids, fixed):
        body = ref.convert_tokens_to_ids(ref.tokenize(text))[:50]
        assert row[1: 1 + len(body)].tolist() == body


def test_bert_layout_round_trip_and_mask(bert):
    ids, mask = bert(MIXED)
    assert ids.shape == mask.shape == (len(MIXED), 52) and ids.dtype == mask.dtype == torch.long
    for i, text in enumerate(MIXED):
        n = int(mask[i].sum())
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert ids[i, 0] == bert.cls_id and ids[i, n - 1] == bert.end_id and (ids[i, n:] == bert.pad_id).all()
        body = ids[i, 1 : n - 1].tolist()
        assert bert.unk_id not in body
        decoded = bert.decode(ids[i])
        assert bert.encode_one(decoded) == body  # decode -> encode round trip
        # same characters as the lower-cased, accent-free input
        import unicodedata

        norm = "".join(
            c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn"
        )
        assert decoded.replace(" ", "") == norm.replace(" ", "")


def test_bert_truncation_keeps_the_start(bert):
    text = "".join(str(i % 10) + "字" for i in range(100))  # 200 tokens
    ids, mask = bert(text, context_length=12)
    assert ids.shape == (1, 12) and mask.all()
    full = bert.encode_one(text)
    assert ids[0, 1:11].tolist() == full[:10]  # right truncation: the end of the text is dropped
    assert ids[0, -1] == bert.end_id


def test_empty_text_and_bad_inputs(bert):
    ids, mask = bert(["", "a"])
    assert ids[0, :2].tolist() == [bert.cls_id, bert.end_id] and mask[0].sum() == 2
    with pytest.raises(ValueError, match="empty"):
        bert([])
    with pytest.raises(TypeError, match="not a str"):
        bert(["ok", 3])
    with pytest.raises(ValueError, match="context_length"):
        BertTokenizer(context_length=1)
    with pytest.raises(FileNotFoundError):
        get_tokenizer("/nonexistent/tokenizer.model")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    lines = MIXED * 3 + [
        "今天天气很好，我们去公园散步。",
        "The weather is nice today, let us walk in the park.",
        "机器学习 machine learning 和 深度学习 deep learning",
        "图像 image 文本 text 对齐 alignment",
        "一张猫的照片 a photo of a cat",
        "两只狗在草地上奔跑 two dogs running on the grass",
    ]
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(d / "sp"),
        vocab_size=200,
        model_type="unigram",
        character_coverage=1.0,
        user_defined_symbols=["[CLS]", "<|endoftext|>", "[MASK]"] + [f"<|blank_{n}|>" for n in range(2, 11)],
        bos_id=-1,
        eos_id=-1,
        unk_piece="[UNK]",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return d / "sp.model"


def test_glm_sentencepiece_conventions(sp_model):
    tok = get_tokenizer(sp_model, context_length=52)
    assert isinstance(tok, GLMTokenizer) and tok.truncation_side == "left"
    assert tok.cls_id == tok.sp.piece_to_id("[CLS]") and tok.pad_id == tok.end_id == tok.sp.piece_to_id(
        "<|endoftext|>"
    )
    assert tok.vocab_size == tok.sp.get_piece_size()
    ids, mask = tok(MIXED)
    for i, text in enumerate(MIXED):
        n = int(mask[i].sum())
        assert ids[i, 0] == tok.cls_id and ids[i, n - 1] == tok.end_id and (ids[i, n:] == tok.pad_id).all()
        assert tok.decode(ids[i]) == text  # lossless round trip (all characters are in the vocabulary)
    # runs of spaces become <|blank_n|> pieces and come back
    spaced = "两只  狗 and   the cat"
    body = tok.encode_one(spaced)
    assert tok.sp.piece_to_id("<|blank_2|>") in body and tok.sp.piece_to_id("<|blank_3|>") in body
    assert tok.decode(body) == spaced


def test_glm_special_token_strings_in_text_are_split_out_as_the_official_tokenizer_does(sp_model):
    """transformers' PreTrainedTokenizer (4.17, the official requirement) splits the special-token
    strings out of a text, drops the whitespace beside them and encodes every stretch between them on its
    own (each with SentencePiece's word-start marker)."""
    tok = GLMTokenizer(sp_model)
    enc = tok.sp.encode
    cls, end, mask, unk = (tok.special_ids[t] for t in ("[CLS]", "<|endoftext|>", "[MASK]", "[UNK]"))
    cases = {
        "a cat [CLS] two dogs": [*enc("a cat"), cls, *enc("two dogs")],
        "photo<|endoftext|>cat": [*enc("photo"), end, *enc("cat")],  # "cat" starts a new stretch
        "  [MASK]   the cat  ": [mask, *enc("the cat"), tok.sp.piece_to_id("<|blank_2|>")],
        "[CLS][CLS] [UNK]": [cls, cls, unk],
        "两只  狗 [MASK]": [*enc("两只<|blank_2|>狗"), mask],  # runs of spaces are still blank pieces
        "[cls] [SEP] <|endoftext|": enc("[cls] [SEP] <|endoftext|"),  # not special tokens: plain text
    }
    for text, want in cases.items():
        assert tok.encode_one(text) == want, text
    assert "▁" in tok.sp.id_to_piece(enc("cat")[0])  # the stretch after <|endoftext|> got the marker
    assert enc("photo<|endoftext|>cat") != cases["photo<|endoftext|>cat"]  # what one encode call gives
    ids, mask_ = tok(["a cat [CLS] two dogs"])
    n = int(mask_[0].sum())
    assert ids[0, :n].tolist() == [cls, *cases["a cat [CLS] two dogs"], end]


def test_glm_truncates_on_the_left_and_handles_empty(sp_model):
    tok = GLMTokenizer(sp_model, context_length=8)
    text = " ".join(MIXED)
    full = tok.encode_one(text)
    assert len(full) > 6
    ids, mask = tok(text)
    assert mask.all() and ids[0, 1:7].tolist() == full[-6:]  # the start of the text is dropped
    assert ids[0, 0] == tok.cls_id and ids[0, 7] == tok.end_id
    ids, mask = tok("")
    assert ids[0, :2].tolist() == [tok.cls_id, tok.end_id] and mask.sum() == 2


def test_glm_special_tokens_missing_from_the_model_get_appended_ids(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(MIXED * 5), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "m"),
        vocab_size=120,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tok = GLMTokenizer(tmp_path / "m.model")
    n = tok.sp.get_piece_size()
    # no special token is a piece: ids after the vocabulary in the official registration order, except
    # [UNK], which the official tokenizer never adds (it is the model's own unknown piece then)
    assert tok.special_ids == {"<|endoftext|>": n, "[UNK]": tok.sp.unk_id(), "[CLS]": n + 1, "[MASK]": n + 2}
    assert tok.end_id == tok.pad_id == n and tok.cls_id == n + 1 and tok.vocab_size == n + 3
    tok2 = GLMTokenizer(tmp_path / "m.model", special_ids={"[CLS]": 5})
    assert tok2.cls_id == 5
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        GLMTokenizer(bad)


def test_vocabulary_sizes_must_match(bert):
    require_vocab_match(bert, 21128)
    with pytest.raises(ValueError, match=r"21,128 ids .* 115,244-entry vocabulary: .*GLM .*sp.model"):
        require_vocab_match(bert, 115244)
    with pytest.raises(ValueError, match=r"21,128 ids .* 21,129-entry"):
        require_vocab_match(bert, 21129)
