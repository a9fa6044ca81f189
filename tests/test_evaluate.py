import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2model.config import get_config
from m2model.data import Record
from m2model.evaluate import (
    RetrievalData,
    encode_images,
    encode_texts,
    evaluate_retrieval,
    imagenet_classnames,
    imagenet_templates,
    load_image,
    load_retrieval_jsonl,
    main,
    preprocess_caption,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from m2model.metrics import best_relevant_rank, official_retrieval_metrics, retrieval_metrics, topk_accuracy
from m2model.modeling import M2Encoder
from m2model.tokenizers import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _brute_rank(scores, relevant, ties):
    """Sort each row with an explicit key and return the position of the first relevant candidate."""
    ranks = []
    for s, r in zip(scores.tolist(), relevant.tolist()):
        if ties == "pessimistic":
            keys = [(-s[j], 1 if r[j] else 0) for j in range(len(s))]
        elif ties == "optimistic":
            keys = [(-s[j], 0 if r[j] else 1) for j in range(len(s))]
        else:
            keys = [(-s[j], j) for j in range(len(s))]
        order = sorted(range(len(s)), key=keys.__getitem__)
        ranks.append(next(p for p, j in enumerate(order) if r[j]))
    return torch.tensor(ranks)


def _brute_metrics(img, txt, rel, ties):
    sim = img @ txt.T
    out = {}
    for name, s, r in (("i2t", sim, rel), ("t2i", sim.T, rel.T)):
        ranks = _brute_rank(s, r, ties)
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * sum(int(x < k) for x in ranks) / len(ranks)
    out["MR"] = sum(out.values()) / 6
    return out


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic", "index"])
def test_retrieval_metrics_match_brute_force_with_ties(ties):
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        n_img = 3 + trial * 2
        caps = torch.randint(1, 4, (n_img,), generator=g)  # 1-3 captions per image
        text_image = torch.repeat_interleave(torch.arange(n_img), caps)
        rel = torch.zeros(n_img, len(text_image), dtype=torch.bool)
        rel[text_image, torch.arange(len(text_image))] = True
        # small integer embeddings: many exactly tied similarities
        img = torch.randint(0, 2, (n_img, 3), generator=g).float()
        txt = torch.randint(0, 2, (len(text_image), 3), generator=g).float()
        got = retrieval_metrics(img, txt, rel, ties=ties)
        want = _brute_metrics(img, txt, rel, ties)
        for k, v in want.items():
            assert got[k] == pytest.approx(v), (trial, k)


def test_hand_made_case_and_tie_rules():
    # 2 images; image 0 has captions 0, 1; image 1 has caption 2
    rel = torch.tensor([[True, True, False], [False, False, True]])
    scores = torch.tensor(
        [
            [0.1, 0.5, 0.5],  # best relevant (0.5) tied with the irrelevant text 2
            [0.9, 0.2, 0.3],
        ]
    )  # relevant text 2 ranks second
    assert best_relevant_rank(scores, rel, "pessimistic").tolist() == [1, 1]
    assert best_relevant_rank(scores, rel, "optimistic").tolist() == [0, 1]
    assert best_relevant_rank(scores, rel, "index").tolist() == [0, 1]
    scores2 = torch.tensor([[0.5, 0.1, 0.5], [0.5, 0.5, 0.5]])
    assert best_relevant_rank(scores2.flip(1), rel.flip(1), "index").tolist() == [1, 0]
    assert best_relevant_rank(scores2, rel, "index").tolist() == [0, 2]
    # degenerate embeddings cannot score above chance under the default rule
    rel4 = torch.eye(4, dtype=torch.bool).repeat_interleave(2, dim=1)  # 4 images, 2 captions each
    m = retrieval_metrics(torch.ones(4, 8), torch.ones(8, 8), rel4)
    assert (m["i2t_R@1"], m["i2t_R@5"], m["i2t_R@10"]) == (0, 0, 100)  # 6 tied wrong captions rank first
    assert (m["t2i_R@1"], m["t2i_R@5"]) == (0, 100)  # 3 tied wrong images rank first
    with pytest.raises(ValueError, match="no relevant"):
        best_relevant_rank(scores, torch.zeros_like(rel))
    with pytest.raises(ValueError, match="NaN"):
        best_relevant_rank(torch.full((2, 3), float("nan")), rel)
    with pytest.raises(ValueError, match="ties"):
        best_relevant_rank(scores, rel, "random")
    assert topk_accuracy(
        torch.tensor([[0.0, 1.0, 0.5], [2.0, 2.0, 0.0]]), torch.tensor([1, 1]), ks=(1, 2)
    ) == {"top1": 50.0, "top2": 100.0}


def test_metrics_agree_with_official_argsort_recall():
    """The official calu_recall (np.argsort on -similarity, cumulative hits), re-run on tie-free scores."""
    rng = np.random.default_rng(0)
    img, txt = (
        rng.normal(size=(12, 4)),
        rng.normal(size=(36, 4)),
    )  # >= 10 candidates, as the official code needs
    text_image = np.repeat(np.arange(12), 3)
    rel = np.zeros((12, 36), dtype=bool)
    rel[text_image, np.arange(36)] = True
    official = []
    for sims, gt in ((txt @ img.T, rel.T), (img @ txt.T, rel)):  # t2i then i2t, as printed there
        idx = np.argsort(-sims, axis=1)[:, :10]
        hits = np.cumsum(np.take_along_axis(gt, idx, 1), axis=1) > 0
        official += [hits[:, k - 1].mean() * 100 for k in (1, 5, 10)]
    ours = retrieval_metrics(torch.tensor(img), torch.tensor(txt), torch.tensor(rel))
    mine = [ours[f"t2i_R@{k}"] for k in (1, 5, 10)] + [ours[f"i2t_R@{k}"] for k in (1, 5, 10)]
    assert mine == pytest.approx(official)
    assert ours["MR"] == pytest.approx(sum(official) / 6)


def _write_images(root: Path, n: int, size=(40, 30)):
    from PIL import Image

    paths = []
    for i in range(n):
        color = ((50 * i) % 256, (90 * i + 30) % 256, (20 * i + 200) % 256)
        p = root / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", size, color).save(p)
        paths.append(p)
    return paths


def test_load_image_and_jsonl(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 7), (255, 255, 255)).save(tmp_path / "w.png")
    Image.new("L", (9, 9), 0).save(tmp_path / "b.png")
    w, b = load_image(tmp_path / "w.png", 16), load_image(tmp_path / "b.png", 16)
    assert w.shape == b.shape == (3, 16, 16) and w.dtype == torch.float32
    assert torch.allclose(w, torch.ones_like(w)) and torch.allclose(b, -torch.ones_like(b))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg", 16)

    lines = [
        {"image": "a.jpg", "caption": ["A “Red” Car", "一辆红色的车"]},
        {"image": "sub/b.jpg", "caption": ["一辆红色的车"]},  # same caption as image a
        {"image": "c.jpg", "caption": "single string caption"},
    ]
    f = tmp_path / "test.jsonl"
    f.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n", encoding="utf-8")
    data = load_retrieval_jsonl(f, image_root="/imgs")
    assert data.images == ["/imgs/a.jpg", "/imgs/sub/b.jpg", "/imgs/c.jpg"]
    assert data.texts[0] == 'a "red" car' and data.text_image == [0, 0, 1, 2]
    assert data.relevance().tolist() == [
        [True, True, True, False],
        [False, True, True, False],
        [False, False, False, True],
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "caption": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_retrieval_jsonl(bad)
    bad.write_text('{"image": "a.jpg"\n')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_retrieval_jsonl(bad)
    # evaluation fails on a line that is not UTF-8, naming the file and the line (training skips it)
    bad.write_bytes(b'{"image": "a.jpg", "caption": ["ok"]}\n{"image": "b.jpg", "caption": ["\xff"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid UTF-8"):
        load_retrieval_jsonl(bad)
    # the official protocol keeps captions as written (a trailing space is a GLM token); the m2model one
    # reads them as training does: stripped, blank ones dropped
    bad.write_text('{"image": "a.jpg", "caption": ["  Two  Words ", " "]}\n')
    assert load_retrieval_jsonl(bad).texts == ["  two  words ", " "]
    assert load_retrieval_jsonl(bad, protocol="m2model").texts == ["two  words"]
    bad.write_text('{"image": "a.jpg", "caption": [" ", ""]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: .*non-empty"):
        load_retrieval_jsonl(bad)


def test_classification_jsonl_errors_name_file_and_line(tmp_path):
    from m2model.evaluate import load_classification_data

    f = tmp_path / "cls.jsonl"
    f.write_text('{"image": "a.jpg", "label": 1}\n{"image": "b.jpg", "label": "dog"}\n{"image": "c.jpg"}\n')
    with pytest.raises(ValueError, match=r"cls.jsonl:3: expected a \"label\""):
        load_classification_data(f, ["cat", "dog"])
    f.write_text('{"image": "a.jpg", "label": 1}\n{"image": "b.jpg", "label": "dog"}\n')
    records, labels = load_classification_data(f, ["cat", "dog"])
    assert labels.tolist() == [1, 1] and records[0].path == str(tmp_path / "a.jpg")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = M2Encoder(get_config("tiny")).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return model, path


def test_retrieval_cli_end_to_end(tmp_path, tiny):
    model, ckpt = tiny
    paths = _write_images(tmp_path, 5)
    caps = [
        ["红色 red", "第一张 first"],
        ["green 绿色"],
        ["蓝色 blue", "third", "三"],
        ["黄色"],
        ["white 白"],
    ]
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps({"image": p.name, "caption": c}, ensure_ascii=False) for p, c in zip(paths, caps)
        ),
        encoding="utf-8",
    )
    out_file = tmp_path / "metrics.json"
    out = main(
        [
            "retrieval",
            "--data",
            str(jsonl),
            "--image-root",
            str(tmp_path),
            "--checkpoint",
            str(ckpt),
            "--config",
            "tiny",
            "--batch-size",
            "2",
            "--output",
            str(out_file),
            "--no-progress",
        ]
    )
    assert json.loads(out_file.read_text()) == out
    # the same numbers from the library calls
    tok = get_tokenizer("bert-base-chinese")
    data = load_retrieval_jsonl(jsonl, tmp_path)
    ref = evaluate_retrieval(model, tok, data, batch_size=3, progress=False)
    assert out["num_images"] == 5 and out["num_texts"] == 8 and out["skipped_images"] == 0
    for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "MR"):
        assert out[k] == pytest.approx(ref[k])
    assert out["t2i_R@5"] == 100.0 and out["i2t_R@10"] == 100.0  # 5 images, 8 texts: always within reach
    # corrupt image: clear error, or skipped and counted
    (tmp_path / paths[1].name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=paths[1].name):
        evaluate_retrieval(model, tok, data, progress=False)
    skipped = evaluate_retrieval(model, tok, data, skip_bad_images=True, progress=False)
    assert skipped["skipped_images"] == 1 and skipped["num_images"] == 4 and skipped["num_texts"] == 7


def test_zero_shot_classification(tmp_path, tiny):
    model, ckpt = tiny
    tok = get_tokenizer("bert-base-chinese")
    classes = ["猫 cat", "狗 dog", "鸟 bird"]
    templates = ["a photo of a {}.", lambda c: f"{c}的照片。"]
    clf = zero_shot_classifier(model, tok, classes, templates, progress=False)
    assert clf.shape == (model.cfg.embed_dim, 3)
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(3))
    manual = encode_texts(model, tok, ["a photo of a 狗 dog.", "狗 dog的照片。"], progress=False).mean(0)
    torch.testing.assert_close(clf[:, 1], manual / manual.norm())
    # ImageFolder-style data through the CLI equals the library computation
    for label, c in enumerate(["a_cat", "b_dog", "c_bird"]):
        (tmp_path / "val" / c).mkdir(parents=True)
        _write_images(tmp_path / "val" / c, 2 + label)
    (tmp_path / "classes.txt").write_text("\n".join(classes), encoding="utf-8")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n{}的照片。\n", encoding="utf-8")
    out = main(
        [
            "classify",
            "--data",
            str(tmp_path / "val"),
            "--classes",
            str(tmp_path / "classes.txt"),
            "--templates",
            str(tmp_path / "templates.txt"),
            "--checkpoint",
            str(ckpt),
            "--config",
            "tiny",
            "--no-progress",
        ]
    )
    images = torch.stack(
        [
            load_image(p, 32)
            for c in ["a_cat", "b_dog", "c_bird"]
            for p in sorted((tmp_path / "val" / c).iterdir())
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    ref = zero_shot_accuracy(model, clf, [(images[:4], labels[:4]), (images[4:], labels[4:])], progress=False)
    assert out["num_images"] == ref["num_images"] == 9
    assert out["top1"] == pytest.approx(ref["top1"])
    logits = model.encode_image(images) @ clf
    assert ref["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    with pytest.raises(ValueError, match="template"):
        zero_shot_classifier(model, tok, classes, ["no placeholder"])


def test_class_embeddings_are_computed_in_batches_across_classes(tiny, monkeypatch):
    model, _ = tiny
    tok = get_tokenizer("bert-base-chinese")
    classes, templates = [f"class {i}" for i in range(7)], ["a photo of a {}.", "{}的照片。", "a {c}"]
    whole = zero_shot_classifier(model, tok, classes, templates, batch_size=256, progress=False)
    sizes, encode = [], model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda ids, mask: sizes.append(len(ids)) or encode(ids, mask))
    batched = zero_shot_classifier(model, tok, classes, templates, batch_size=5, progress=False)
    assert sizes == [5, 5, 5, 5, 1]  # 21 prompts, batches spanning classes
    torch.testing.assert_close(batched, whole)
    # each class: the normalised mean of its prompts' embeddings
    manual = encode(*tok([t.replace("{}", "class 3").replace("{c}", "class 3") for t in templates]))
    torch.testing.assert_close(batched[:, 3], F.normalize(manual.mean(0), dim=0))


def test_imagenet_metadata():
    en, zh = imagenet_classnames("en"), imagenet_classnames("zh")
    assert len(en) == len(zh) == 1000 and en[1] == "goldfish" and zh[1] == "金鱼"
    assert len(imagenet_templates("en")) == 80 and len(imagenet_templates("en", simple=True)) == 7
    zt = imagenet_templates("zh")
    assert len(zt) > 10 and "金鱼" in zt[0]("金鱼")
    with pytest.raises(ValueError):
        imagenet_classnames("fr")


def test_module_entry_point(tmp_path, tiny):
    _, ckpt = tiny
    paths = _write_images(tmp_path, 2)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"image": p.name, "caption": [f"caption {i}"]}) for i, p in enumerate(paths))
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "m2model.evaluate",
            "retrieval",
            "--data",
            str(jsonl),
            "--checkpoint",
            str(ckpt),
            "--config",
            "tiny",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["num_texts"] == 2
    assert "images" in res.stderr and "texts" in res.stderr  # tqdm progress bars


# --------------------------------------------------------------------------- the official protocol


def _official_get_data(lines):
    """The official eval_retrieval.get_data, transcribed (captions preprocessed as there)."""
    from collections import defaultdict

    img2txt, txt2img = defaultdict(list), defaultdict(list)
    texts, images, text_ids, image_ids = [], [], {}, {}
    for i, data in enumerate(lines):
        img, cap = data["image"], list(data["caption"])
        images.append(img)
        image_ids[img] = i
        for j in range(len(cap)):
            cap[j] = cap[j].lower().replace("\u201c", '"').replace("\u201d", '"')
            img2txt[img].append(cap[j])
            txt2img[cap[j]].append(img)
            texts.append(cap[j])
            text_ids[cap[j]] = len(texts) - 1
    img2txt_gt = np.zeros((len(images), len(texts)))
    txt2img_gt = np.zeros((len(texts), len(images)))
    for i, img in enumerate(images):
        for txt in img2txt[img]:
            img2txt_gt[i][text_ids[txt]] = 1
    for i, txt in enumerate(texts):
        for img in txt2img[txt]:
            txt2img_gt[i][image_ids[img]] = 1
    return texts, images, txt2img_gt, img2txt_gt


def _official_calu_recall(txt_feats, img_feats, txt2img_gt, img2txt_gt):
    """The official calu_recall, transcribed: [t2i R@1, R@5, R@10, i2t R@1, R@5, R@10]."""
    out = []
    for feats_q, feats_c, gt in ((txt_feats, img_feats, txt2img_gt), (img_feats, txt_feats, img2txt_gt)):
        idx = np.argsort(-(feats_q @ feats_c.T), axis=1)
        pred = np.zeros((len(idx), 10))
        for i in range(len(idx)):
            for j in range(10):
                if gt[i][idx[i][j]] == 1:
                    pred[i][j] = 1
        pred = np.cumsum(pred, axis=1)
        topk = np.asarray([sum(1 for i in range(len(pred)) if pred[i][j] > 0) for j in range(10)])
        topk = topk / len(pred) * 100
        out += [topk[0], topk[4], topk[9]]
    return out


def _duplicate_caption_lines():
    """12 images; repeated captions within and across images, one repeated image path, a trailing space."""
    lines = [{"image": f"im{i}.jpg", "caption": [f"Caption {i}", f"other {i}"]} for i in range(12)]
    lines[1]["caption"].append("A “Dog” ")  # the same text (after preprocessing) for images 1, 4 and 7
    lines[4]["caption"].append('a "dog" ')
    lines[7]["caption"].append("a “dog” ")
    lines[2]["caption"].append("caption 2")  # twice for the same image
    lines[9]["caption"].append("a “dog”")  # without the space: another text
    lines.append({"image": "im3.jpg", "caption": ["a repeated path"]})
    return lines


def test_official_relevance_is_the_official_get_data():
    lines = _duplicate_caption_lines()
    data = RetrievalData(
        records=[Record(key=x["image"], path=x["image"], captions=tuple(x["caption"])) for x in lines],
        texts=[preprocess_caption(c) for x in lines for c in x["caption"]],
        text_image=[i for i, x in enumerate(lines) for _ in x["caption"]],
    )
    texts, images, t2i_gt, i2t_gt = _official_get_data(lines)
    assert data.texts == texts and [r.key for r in data.records] == images
    i2t, t2i = data.official_relevance()
    assert np.array_equal(i2t.numpy(), i2t_gt.astype(bool))
    assert np.array_equal(t2i.numpy(), t2i_gt.astype(bool))
    # where it differs from crediting every copy: the earlier copies of a repeated caption (and the
    # repeated image path, whose lines share their captions)
    every = data.relevance()
    assert every[1, 4] and not i2t[1, 4] and i2t[1, 19] and i2t[4, 19]  # 'a "dog" ': texts 4, 12, 19
    assert every[2, 5] and not i2t[2, 5] and i2t[2, 7]  # "caption 2" twice for image 2
    assert i2t[12, 8] and not every[12, 8]  # line 12 repeats the image of line 3 (texts 8, 9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_protocol_reproduces_the_official_numbers_with_duplicates_and_ties(seed):
    lines = _duplicate_caption_lines()
    texts, images, t2i_gt, i2t_gt = _official_get_data(lines)
    rng = np.random.default_rng(seed)
    # one embedding per distinct text (copies score exactly alike), a few exact image ties, 0/1 values
    # to make many tied scores
    table = {t: rng.integers(0, 2, 6).astype(np.float32) for t in dict.fromkeys(texts)}
    txt = np.stack([table[t] for t in texts])
    img = rng.integers(0, 2, (len(images), 6)).astype(np.float32)
    img[5] = img[6]
    want = _official_calu_recall(txt.astype(np.float64), img.astype(np.float64), t2i_gt, i2t_gt)
    i2t, t2i = torch.from_numpy(i2t_gt.astype(bool)), torch.from_numpy(t2i_gt.astype(bool))
    got = official_retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), i2t, t2i)
    assert [got[f"t2i_R@{k}"] for k in (1, 5, 10)] + [got[f"i2t_R@{k}"] for k in (1, 5, 10)] == want
    assert got["MR"] == pytest.approx(sum(want) / 6)
    assert got["i2t_tie_dependent"] > 0  # the repeated captions tie with their credited copy


def test_protocol_choice_on_the_cli_and_in_the_result(tmp_path, tiny):
    model, ckpt = tiny
    lines = _duplicate_caption_lines()[:12]
    for x, p in zip(lines, _write_images(tmp_path, len(lines))):
        p.rename(tmp_path / x["image"])
    jsonl = tmp_path / "dup.jsonl"
    jsonl.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines), encoding="utf-8")
    base = ["retrieval", "--data", str(jsonl), "--checkpoint", str(ckpt), "--config", "tiny", "--no-progress"]
    official = main(base)
    assert (official["protocol"], official["duplicate_captions"], official["ties"]) == (
        "official", "image->text credits the last copy only", "numpy argsort order")
    ours = main([*base, "--protocol", "m2model", "--ties", "optimistic"])
    assert (ours["protocol"], ours["duplicate_captions"], ours["ties"]) == (
        "m2model", "every copy credited", "optimistic")
    # the official numbers: the transcribed official scoring of this model's embeddings
    tok = get_tokenizer("bert-base-chinese", context_length=model.cfg.max_text_len)
    texts, images, t2i_gt, i2t_gt = _official_get_data(lines)
    img = encode_images(model, [str(tmp_path / p) for p in images], progress=False)[0].double().numpy()
    txt = encode_texts(model, tok, texts, progress=False).double().numpy()
    want = _official_calu_recall(txt, img, t2i_gt, i2t_gt)
    got = [official[f"t2i_R@{k}"] for k in (1, 5, 10)] + [official[f"i2t_R@{k}"] for k in (1, 5, 10)]
    assert got == pytest.approx(want, abs=1e-9)
    with pytest.raises(SystemExit):
        main([*base, "--ties", "optimistic"])  # --ties belongs to the m2model protocol
    data = load_retrieval_jsonl(jsonl, tmp_path)
    with pytest.raises(ValueError, match="ties applies to the m2model protocol"):
        evaluate_retrieval(model, tok, data, ties="index", progress=False)


# --------------------------------------------------------------------------- checkpoints and tokenizers


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real trainer run with model_overrides (as the demo's config), 2 steps."""
    from m2model.synth import generate
    from m2model.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    generate(str(root / "synth"), num_train=32, num_val=6, size=24, seed=0, samples_per_shard=40)
    overrides = {"width": 32, "heads": 2, "ffn_dim": 64, "num_layers": 1, "num_shared_layers": 1,
                 "embed_dim": 16, "image_size": 24, "patch_size": 8, "max_text_len": 20}
    cfg = TrainConfig(model="tiny", model_overrides=overrides,
                      train_jsonl=str(root / "synth" / "train.jsonl"), batch_size=8, max_steps=2,
                      output_dir=str(root / "run"), progress=False, num_threads=1, data_threads=0,
                      context_length=16)
    train(cfg)
    return root


def test_trainer_checkpoints_load_with_their_saved_config(trained_run, capsys):
    from m2model.checkpoint import load_trained

    run, val = trained_run / "run", str(trained_run / "synth" / "val_en.jsonl")
    model, tok, _ = load_trained(str(run))
    assert model.cfg.image_size == 24 and model.cfg.width == 32 and tok.context_length == 16
    want = evaluate_retrieval(model, tok, load_retrieval_jsonl(val), progress=False)
    for ckpt in (str(run), str(run / "checkpoint-00000002.pt")):  # a run folder or a file; no --config
        got = main(["retrieval", "--data", val, "--checkpoint", ckpt, "--no-progress"])
        assert got == want


def test_a_contradicting_config_is_an_error(trained_run):
    run = trained_run / "run"
    val = str(trained_run / "synth" / "val_en.jsonl")
    with pytest.raises(ValueError, match=r"training config .*image_size: 24 saved, 32 given"):
        main(["retrieval", "--data", val, "--checkpoint", str(run), "--config", "tiny", "--no-progress"])


def test_files_that_are_not_checkpoints_are_named(tmp_path, tiny):
    _, ckpt = tiny
    paths = _write_images(tmp_path, 2)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": p.name, "caption": ["x"]}) for p in paths))
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint\n")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(Path(ckpt).read_bytes()[:5000])
    for bad, why in ((text, r"not a torch checkpoint \(it starts with b'hello, t'"),
                     (cut, "not a complete torch checkpoint"),
                     (tmp_path, r"no checkpoint-\*\.pt")):
        with pytest.raises(ValueError, match=f"{bad}.*{why}" if bad != tmp_path else why):
            main(["retrieval", "--data", str(jsonl), "--checkpoint", str(bad), "--config", "tiny",
                  "--no-progress"])


def test_classification_inputs_name_the_file_and_line(tmp_path, tiny):
    _, ckpt = tiny
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        _write_images(tmp_path / "val" / c, 1)
    (tmp_path / "classes.txt").write_text("cat\ndog\n", encoding="utf-8")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n\nno placeholder\n", encoding="utf-8")
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"image": "val/a/img0.jpg", "label": "cat"}\n'
                      '{"image": "val/b/img0.jpg", "label": "cow"}\n')
    base = ["--checkpoint", str(ckpt), "--config", "tiny", "--classes", str(tmp_path / "classes.txt"),
            "--no-progress"]
    with pytest.raises(ValueError, match=r"labels.jsonl:2: \"label\" 'cow' is not one of the 2 class names"):
        main(["classify", "--data", str(labels), *base])
    labels.write_text('{"image": "val/a/img0.jpg", "label": 0}\n{"image": "val/b/img0.jpg", "label": 2}\n')
    with pytest.raises(ValueError, match=r"labels.jsonl:2: \"label\" 2 is outside \[0, 2\)"):
        main(["classify", "--data", str(labels), *base])
    with pytest.raises(ValueError, match=r"templates.txt:3: template 'no placeholder'"):
        main(["classify", "--data", str(tmp_path / "val"), *base, "--templates",
              str(tmp_path / "templates.txt")])
    (tmp_path / "classes.txt").write_bytes(b"cat\n\xffdog\n")
    with pytest.raises(ValueError, match=r"classes.txt:2: not valid UTF-8"):
        main(["classify", "--data", str(tmp_path / "val"), *base])
    (tmp_path / "classes.txt").write_text("cat\ncat\n")
    with pytest.raises(ValueError, match=r"classes.txt:2: class name 'cat' repeats line 1"):
        main(["classify", "--data", str(tmp_path / "val"), *base])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    out = main(["classify", "--data", str(tmp_path / "val"), *base, "--templates", "simple-en"])
    assert out["classes"] == str(tmp_path / "classes.txt")
    assert out["templates"] == "simple-en (open_clip SIMPLE_IMAGENET_TEMPLATES, 7 templates)"


def test_the_tokenizer_must_match_the_model_vocabulary(tmp_path):
    from tests.test_convert import official_state_dict

    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a photo of a cat", "一只猫的照片", "two dogs on the grass"] * 20),
                      encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
                                   user_defined_symbols=["[CLS]", "<|endoftext|>", "[MASK]"])
    glm = get_tokenizer(tmp_path / "sp.model")
    cfg = get_config("tiny", vocab_size=glm.vocab_size, max_text_len=12)
    ckpt = tmp_path / "official.ckpt"
    # as a Lightning checkpoint of the official code: its saved config gives the head count
    hparams = {"config": {"encoder_attention_heads": cfg.heads, "max_text_len": cfg.max_text_len}}
    torch.save({"state_dict": official_state_dict(cfg), "hyper_parameters": hparams}, ckpt)
    paths = _write_images(tmp_path, 3)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": p.name, "caption": ["a cat"]}) for p in paths))
    base = ["retrieval", "--data", str(jsonl), "--checkpoint", str(ckpt), "--no-progress"]
    with pytest.raises(ValueError, match=r"official M2-Encoder checkpoint .*--tokenizer path/to/sp.model"):
        main(base)
    with pytest.raises(ValueError, match=rf"21,128 ids but the model of .*{glm.vocab_size}-entry vocabulary"):
        main([*base, "--tokenizer", "bert-base-chinese"])
    assert main([*base, "--tokenizer", str(tmp_path / "sp.model")])["num_images"] == 3
    # the library calls refuse it too: a released-size vocabulary with the bert tokenizer
    model = M2Encoder(get_config("tiny", vocab_size=115244)).eval()
    with pytest.raises(ValueError, match=r"115,244-entry vocabulary: it is the official GLM vocabulary"):
        encode_texts(model, get_tokenizer("bert-base-chinese"), ["a cat"], progress=False)
    with pytest.raises(ValueError, match="115,244-entry"):
        zero_shot_classifier(model, get_tokenizer("bert-base-chinese"), ["cat"], ["a {}"], progress=False)


def test_synthetic_evaluation_names_its_protocol(trained_run):
    from m2model.checkpoint import load_trained
    from m2model.eval_synth import evaluate_synth, format_table

    model, tok, _ = load_trained(str(trained_run / "run"))
    results = evaluate_synth(model, tok, str(trained_run / "synth"))
    assert results["en"]["retrieval"]["protocol"] == results["zh"]["retrieval"]["protocol"] == "m2model"
    table = format_table(results)
    assert "protocol m2model: every copy credited" in table and "ties pessimistic" in table
