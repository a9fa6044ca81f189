"""The synthetic bilingual shapes dataset."""

import hashlib
import json
import os

from m2model.data import build_index
from m2model.synth import class_names, generate, main


def _digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_generate_is_seeded_and_complete(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(str(a), num_train=24, num_val=8, size=48, seed=3, samples_per_shard=10)
    generate(str(b), num_train=24, num_val=8, size=48, seed=3, samples_per_shard=10)
    generate(str(c), num_train=24, num_val=8, size=48, seed=4, samples_per_shard=10)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    rows = [json.loads(line) for line in (a / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 24
    en_names, zh_names = class_names()
    for r in rows:
        en, zh, short_en, short_zh = r["caption"]
        assert short_en in en or len(short_en) < len(en) + 8
        assert r["caption_en"] == en and r["caption_zh"] == zh
        # the caption names the labelled class in both languages
        colour_en, shape_en = en_names[r["label"]].split()
        assert colour_en in en and shape_en in en
        zh_colour = zh_names[r["label"]][:2]
        assert zh_colour in zh and zh_names[r["label"]][2:] in zh
        assert os.path.getsize(a / r["image"]) > 100
    val = [json.loads(line) for line in (a / "val_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(val) == 8 and all(len(r["caption"]) == 1 for r in val)
    classes = json.loads((a / "classes.json").read_text(encoding="utf-8"))
    assert len(classes["en"]["classnames"]) == len(classes["zh"]["classnames"]) == 20
    assert all("{}" in t for t in classes["en"]["templates"] + classes["zh"]["templates"])
    # the shards hold the same samples
    index = build_index(shards=str(a / "shards" / "train-*.tar"))
    records = index.records
    assert len(records) == 24 and not index.stats
    assert sorted(r.captions for r in records) == sorted(tuple(r["caption"]) for r in rows)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path / "d"), "--train", "4", "--val", "2", "--size", "32"])
    info = json.loads(capsys.readouterr().out)
    assert info["train"] == 4 and info["classes"] == 20
    assert (tmp_path / "d" / "shards" / "val-000000.tar").exists()
