import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m2model.config import get_config
from m2model.evaluate import (
    encode_texts,
    evaluate_retrieval,
    imagenet_classnames,
    imagenet_templates,
    load_image,
    load_retrieval_jsonl,
    main,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from m2model.metrics import best_relevant_rank, retrieval_metrics, topk_accuracy
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
    # the parser of training: captions stripped, blank ones dropped
    bad.write_text('{"image": "a.jpg", "caption": ["  Two  Words ", " "]}\n')
    assert load_retrieval_jsonl(bad).texts == ["two  words"]


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
