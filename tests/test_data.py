"""Data: the record index (jsonl, shards), counted skips, DALI vs Pillow on the same shards (same samples,
crops and counts), every Pillow image mode, sharding, exact resume, shard writing."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from m2model.data import (
    DataStats,
    ImageTextLoader,
    build_index,
    dali_available,
    decode_transform,
    eval_batches,
    probe_image,
    random_resized_crop_params,
    read_jsonl,
    scan_shards,
)
from m2model.data.make_shards import main as make_shards_main
from m2model.data.make_shards import shards_from_jsonl
from m2model.data.records import Problems

BACKENDS = ["pillow"] + (["dali"] if dali_available() else [])
# The documented agreement of the two paths (grey levels of 255): the same libjpeg-turbo decode, then
# bicubic antialiased resamplers of the cropped image. torch's kernel (the DALI path on the CPU) follows
# Pillow's filter and differs only in rounding: measured at most 2 levels, 0.13 on average (0.003 but
# for EXIF-rotated JPEGs). DALI's own resize (the GPU pipeline) has another cubic kernel: at most 17
# levels, 0.23 on average, when scaling up.
# A wrong crop, flip or conversion, or a region-of-interest resize on one path only, gives tens.
TOL_MEAN, TOL_MAX = 0.25 / 127.5, 4 / 127.5 + 1e-6
TOL_DALI_RESIZE = {"torch-resize": (TOL_MEAN, TOL_MAX), "dali-resize": (0.5 / 127.5, 24 / 127.5 + 1e-6)}
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not installed")


@pytest.fixture(params=["torch-resize", "dali-resize"])
def dali_resize(request, monkeypatch):
    """Where the DALI path resizes on the CPU: torch's kernel after the pipeline (the CPU default), or
    DALI's own slice and resize in the pipeline (what runs on the GPU)."""
    from m2model.data.dali_reader import DaliReader

    monkeypatch.setitem(DaliReader.RESIZE_IN_PIPELINE, "cpu", request.param == "dali-resize")
    return TOL_DALI_RESIZE[request.param]


def _smooth_image(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    arr = np.stack([(base[c] + 90 * np.sin(xx / (4 + c) + yy / 7.0 + seed)) % 256 for c in range(3)], -1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _encode(im, fmt="JPEG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, quality=92, **kw) if fmt == "JPEG" else im.save(buf, fmt, **kw)
    return buf.getvalue()


def _tokenizer(captions):
    n = len(captions)
    return torch.arange(n).view(n, 1), torch.ones(n, 1, dtype=torch.long)


def _damaged_png(seed):
    """A PNG whose header and IEND are intact but whose pixel data is not: only a full decode finds it."""
    data = bytearray(_encode(_smooth_image(seed), "PNG"))
    start = data.index(b"IDAT") + 20
    data[start: start + 40] = bytes(range(40))
    return bytes(data)


@pytest.fixture
def bad_dataset(tmp_path):
    """A jsonl with 6 good samples and one of every kind of bad input, all made here."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    rows = []

    def add(name, data, caption="a caption"):
        if data is not None:
            (img_dir / name).write_bytes(data)
        rows.append({"image": f"img/{name}", "caption": [caption] if caption is not None else []})

    good = _encode(_smooth_image(0))
    for i in range(6):
        add(f"good{i}.jpg", _encode(_smooth_image(i + 1)))
    add("truncated.jpg", good[: len(good) // 2])
    add("garbage.jpg", b"this is not an image at all" * 10)
    add("badheader.jpg", good[:20] + bytes(300) + good[320:])
    add("cmyk.jpg", _encode(_smooth_image(10).convert("CMYK")))
    add("gray.jpg", _encode(_smooth_image(11).convert("L")))
    add("rgba.png", _encode(_smooth_image(12).convert("RGBA"), "PNG"))
    add("damaged.png", _damaged_png(13))  # found only when decoded
    add("missing.jpg", None)
    add("empty_caption.jpg", good, caption="   ")
    add("no_caption.jpg", good, caption=None)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _shards_with_bad_images(tmp_path, jsonl, per_shard=4):
    """The bad dataset as shards: bad image bytes included (write_shards keeps bytes unchanged)."""
    paths, stats = shards_from_jsonl(str(jsonl), str(tmp_path / "shards"), prefix="t",
                                     samples_per_shard=per_shard)
    return paths, stats


def test_index_counts_bad_samples_once(bad_dataset):
    index = build_index(str(bad_dataset))
    names = sorted(os.path.basename(r.path) for r in index.records)
    assert names == sorted([f"good{i}.jpg" for i in range(6)] + ["cmyk.jpg", "gray.jpg", "rgba.png",
                                                                  "damaged.png"])
    s = index.stats
    assert s["missing"] == 1 and s["empty_caption"] == 2
    assert s["truncated"] == 1 and s["corrupt"] == 2  # the cut JPEG; garbage and a broken header
    assert s["cmyk"] == 1 and s["grayscale"] == 1 and s["alpha"] == 1
    assert {r.width for r in index.records} == {48}  # the header sizes are in the index
    assert any("missing.jpg" in p for p in index.problems)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_samples_are_skipped_and_counted(tmp_path, bad_dataset, backend):
    """Through shards, so that both paths read the same bytes; the damaged PNG fails only when decoded
    and is replaced by the next sample, on both paths, with the same counts."""
    paths, written = _shards_with_bad_images(tmp_path, bad_dataset)
    assert written["written"] == 13 and written["missing"] == 1 and written["empty_caption"] == 2
    index = build_index(shards=str(tmp_path / "shards" / "t-*.tar"))
    assert len(index.records) == 10  # after indexing: 6 good, cmyk, gray, rgba, damaged
    loader = ImageTextLoader(index, _tokenizer, 16, batch_size=5, train=True, seed=1, backend=backend,
                             workers=0)
    assert len(loader) == 2
    seen = []
    for batch in loader:
        assert batch.images.shape == (5, 3, 16, 16)
        assert torch.isfinite(batch.images).all()
        assert batch.images.min() >= -1.0001 and batch.images.max() <= 1.0001
        seen.extend(batch.indices.tolist())
    damaged = next(i for i, r in enumerate(index.records) if r.format == "PNG" and r.mode == "RGB")
    # every decodable sample once, the damaged one never; its place refilled by wrapping around
    assert damaged not in seen and set(seen) == set(range(10)) - {damaged} and len(seen) == 10
    assert loader.stats["corrupt"] == 1 and loader.counts()["corrupt"] == 3  # 2 at index time, 1 decoding
    assert loader.counts()["truncated"] == 1 and loader.counts()["cmyk"] == 1


@needs_dali
@pytest.mark.parametrize("size", [24, 96])  # crops of ~40 px sources scaled down, and up
def test_dali_and_pillow_read_the_same_samples_with_the_same_crops(tmp_path, size, dali_resize):
    """Two ranks, several shards, two epochs: the same record order, captions and crops on both paths
    (images equal to the resamplers' rounding); the ranks are disjoint."""
    rows = []
    (tmp_path / "img").mkdir()
    for i in range(40):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_encode(_smooth_image(i, (40 + i % 7, 36))))
        rows.append(json.dumps({"image": f"img/{i}.jpg", "caption": [f"c{i}", f"d{i}"]}))
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    shards_from_jsonl(str(tmp_path / "d.jsonl"), str(tmp_path / "s"), prefix="x", samples_per_shard=9)
    index = build_index(shards=str(tmp_path / "s" / "x-{000000..000004}.tar"))
    out = {}
    for backend in ("pillow", "dali"):
        for rank in (0, 1):
            loader = ImageTextLoader(index, _tokenizer, size, 4, seed=7, shard_id=rank, num_shards=2,
                                     backend=backend, workers=1)
            out[backend, rank] = list(loader) + list(loader)
            loader.close()
    for rank in (0, 1):
        a, b = out["pillow", rank], out["dali", rank]
        assert len(a) == len(b) == 10
        for x, y in zip(a, b):
            assert torch.equal(x.indices, y.indices) and x.captions == y.captions
            diff = (x.images - y.images).abs()
            assert diff.mean().item() <= dali_resize[0] and diff.max().item() <= dali_resize[1]
    first = [set(torch.cat([b.indices for b in out["pillow", r][:5]]).tolist()) for r in (0, 1)]
    assert first[0].isdisjoint(first[1]) and len(first[0] | first[1]) == 40
    # a second epoch is another order
    assert not torch.equal(torch.cat([b.indices for b in out["pillow", 0][:5]]),
                           torch.cat([b.indices for b in out["pillow", 0][5:]]))


def _mode_image(mode):
    h, w = 40, 56
    yy, xx = np.mgrid[0:h, 0:w]
    g8 = ((xx * 4 + yy * 3) % 256).astype(np.uint8)
    rgb = np.stack([g8, 255 - g8, g8 // 2], -1)
    if mode == "I;16":
        return Image.fromarray(g8.astype(np.uint16) * 257), "PNG", {}
    if mode == "I":
        return Image.fromarray(g8.astype(np.int32) * 257), "TIFF", {}
    if mode == "F":
        return Image.fromarray(g8.astype(np.float32) / 255), "TIFF", {}
    if mode == "1":
        return Image.fromarray(g8 > 128).convert("1"), "PNG", {}
    if mode == "1-tiff":
        return Image.fromarray(g8 > 128).convert("1"), "TIFF", {}
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(g8), Image.fromarray(255 - g8)]), "PNG", {}
    if mode == "P":
        palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64)
        return palette, "PNG", {"transparency": 3}
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK"), "JPEG", {}
    if mode == "GIF":
        return Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=64), "GIF", {}
    if mode == "exif-rotated":
        ex = Image.Exif()
        ex[0x0112] = 6
        return Image.fromarray(rgb), "JPEG", {"exif": ex.tobytes()}
    return Image.fromarray(rgb).convert(mode), "PNG", {}


MODES = ["I;16", "I", "F", "LA", "P", "CMYK", "1", "1-tiff", "L", "RGBA", "GIF", "exif-rotated"]


def test_sixteen_bit_grey_is_scaled_not_clipped():
    """Pillow's convert("RGB") clips I;16 to 255 (almost white); the sample path scales to 8 bits."""
    g8 = (np.arange(256, dtype=np.uint16).reshape(16, 16))
    data = _encode(Image.fromarray(g8 * 257), "PNG")
    out = decode_transform(data, 16, (0, 0, 16, 16), False)
    np.testing.assert_array_equal(out[..., 0], g8.astype(np.uint8))
    data = _encode(Image.fromarray(g8.astype(np.float32) / 255), "TIFF")  # F: [0, 1] -> 0..255
    np.testing.assert_array_equal(decode_transform(data, 16, (0, 0, 16, 16), False)[..., 1], g8)


@needs_dali
def test_every_pillow_mode_decodes_alike_on_both_paths(tmp_path, dali_resize):
    """Each mode as a shard sample, through the whole training transform (crop, resize, flip) on both
    paths: within the documented tolerance. 1-bit and 32-bit TIFFs, LA TIFFs and GIFs go through Pillow on
    the DALI path too (DALI rejects or reads them differently)."""
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    rows = []
    for i, mode in enumerate(MODES * 2):
        im, fmt, kw = _mode_image(mode)
        name = f"{i:02d}.{fmt.lower()}"
        (img_dir / name).write_bytes(_encode(im, fmt, **kw))
        rows.append(json.dumps({"image": f"img/{name}", "caption": [mode]}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    shards_from_jsonl(str(tmp_path / "m.jsonl"), str(tmp_path / "s"), prefix="m", samples_per_shard=100)
    index = build_index(shards=str(tmp_path / "s" / "m-000000.tar"))
    assert len(index.records) == len(rows) and not index.stats.skipped
    rotated = [r for r in index.records if r.key.endswith(("011", "023"))]
    assert len(rotated) == 2
    assert all((r.width, r.height) == (40, 56) for r in rotated)  # EXIF orientation 6: upright size
    got = {}
    for backend in ("pillow", "dali"):
        loader = ImageTextLoader(index, _tokenizer, 32, 4, seed=3, backend=backend, workers=0)
        got[backend] = list(loader)
        loader.close()
    for x, y in zip(got["pillow"], got["dali"]):
        assert torch.equal(x.indices, y.indices)
        for row, mode in enumerate(x.captions):
            diff = (x.images[row] - y.images[row]).abs()
            assert diff.mean().item() <= dali_resize[0], (mode, diff.mean().item() * 127.5)
            assert diff.max().item() <= dali_resize[1], (mode, diff.max().item() * 127.5)
            assert x.images[row].std() > 0.1, mode  # an image, not a flat (clipped) field


@needs_dali
def test_dali_failure_is_recovered_with_pillow(tmp_path, monkeypatch):
    """A batch DALI cannot decode (GIFs made to look DALI-decodable) kills the pipeline: the culprits are
    found, decoded with Pillow from then on, and the stream is the same as on the Pillow path."""
    import m2model.data.dali_reader as dali_reader

    monkeypatch.setattr(dali_reader, "dali_decodes", lambda fmt, mode: True)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(12):
        fmt = "GIF" if i in (3, 8) else "JPEG"
        name = f"{i}.{fmt.lower()}"
        (tmp_path / "img" / name).write_bytes(_encode(_smooth_image(i).convert("RGB"), fmt))
        rows.append(json.dumps({"image": f"img/{name}", "caption": [f"c{i}"]}))
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    shards_from_jsonl(str(tmp_path / "d.jsonl"), str(tmp_path / "s"), prefix="g", samples_per_shard=5)
    index = build_index(shards=str(tmp_path / "s" / "g-*.tar"))
    ref = list(ImageTextLoader(index, _tokenizer, 16, 4, seed=0, backend="pillow", workers=0))
    loader = ImageTextLoader(index, _tokenizer, 16, 4, seed=0, backend="dali")
    got = list(loader)
    assert len(loader.reader.failed_in_dali) == 2
    assert loader.state_dict()["reader"]["failed_in_dali"] == sorted(loader.reader.failed_in_dali)
    for x, y in zip(ref, got):
        assert torch.equal(x.indices, y.indices)
        assert (x.images - y.images).abs().max() <= TOL_MAX
    assert len(list(loader)) == 3  # the next epoch decodes the culprits with Pillow at once


def test_no_usable_sample_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(_damaged_png(1))
    (tmp_path / "d.jsonl").write_text('{"image": "x.png", "caption": ["c"]}\n' * 4)
    loader = ImageTextLoader(build_index(str(tmp_path / "d.jsonl")), _tokenizer, 8, 2, backend="pillow",
                             workers=0)
    with pytest.raises(ValueError, match="no decodable sample"):
        next(iter(loader))
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"no usable sample among 4 \(corrupt=4\).*x.png"):
        build_index(str(tmp_path / "d.jsonl"))


def test_jsonl_errors_and_non_utf8_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = (b'{"image": "a.jpg", "caption": "one"}\n{"caption": ["no image"]}\n'
             b'{"image": "b.jpg", "caption": "caf\xe9"}\n{not json\n'
             b'{"image": "c.jpg", "caption": ["ok"]}\n')
    p.write_bytes(lines)
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected an object"):
        read_jsonl(str(p))
    p.write_bytes(b'{"image": "b.jpg", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: not valid UTF-8 \(byte 0xe9 at column 35\)"):
        read_jsonl(str(p))  # evaluation: fail, naming the file and line
    p.write_bytes(lines)
    stats, problems = DataStats(), Problems()
    records = read_jsonl(str(p), strict=False, stats=stats, problems=problems)  # training: skip and count
    assert [r.key for r in records] == ["a.jpg", "c.jpg"] and records[0].captions == ("one",)
    assert stats["bad_line"] == 3
    assert problems[1].endswith("d.jsonl:3: not valid UTF-8 (byte 0xe9 at column 35)")
    assert "d.jsonl:4: not valid JSON" in problems[2]


def test_shard_patterns_that_give_nothing_name_the_pattern_and_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"train_shards '.*/none-\*\.tar' matches no file"):
        build_index(shards=str(tmp_path / "none-*.tar"))
    with pytest.raises(ValueError, match=r"none of its 2 shard\(s\) holds a sample \(missing_shard=2\)"):
        build_index(shards=str(tmp_path / "gone-{0..1}.tar"))
    (tmp_path / "bad-0.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=r"bad-0.tar: not an uncompressed tar archive"):
        build_index(shards=str(tmp_path / "bad-*.tar"))


def test_shards_roundtrip_truncation_and_webdataset(tmp_path, bad_dataset):
    paths, stats = _shards_with_bad_images(tmp_path, bad_dataset)
    assert [os.path.basename(p) for p in paths] == ["t-000000.tar", "t-000001.tar", "t-000002.tar",
                                                    "t-000003.tar"]
    index = scan_shards(paths)
    assert len(index.records) == 13 and not index.stats
    import webdataset as wds

    samples = list(wds.WebDataset(str(paths[0]), shardshuffle=False))
    assert len(samples) == 4 and {"jpg", "txt", "json"} <= set(samples[0])
    assert json.loads(samples[0]["json"])["caption"] == ["a caption"]
    assert index.records[0].read_bytes() == samples[0]["jpg"]  # byte ranges point at the right bytes
    # the same input gives the same bytes (reproducible shards)
    again, _ = shards_from_jsonl(str(bad_dataset), str(tmp_path / "again"), prefix="t", samples_per_shard=4)
    assert all(open(a, "rb").read() == open(b, "rb").read() for a, b in zip(paths, again))

    with tarfile.open(paths[1]) as tf:
        members = tf.getmembers()
    # shard 1: cut inside its third sample's image -> 2 samples kept, 1 incomplete
    with open(paths[1], "r+b") as f:
        f.truncate(members[7].offset_data + members[7].size // 2)
    # shard 2: cut inside the header of its third sample's first member (tarfile takes it for the end)
    with tarfile.open(paths[2]) as tf:
        header = tf.getmembers()[6].offset
    with open(paths[2], "r+b") as f:
        f.truncate(header + 100)
    index = scan_shards([*paths, str(tmp_path / "absent.tar")])
    assert index.stats["truncated_shard"] == 2
    assert index.stats["incomplete_sample"] == 1
    assert index.stats["missing_shard"] == 1
    assert len(index.records) == 4 + 2 + 2 + 1
    assert any("t-000002.tar" in p and "member header" in p for p in index.problems)


def test_make_shards_cli(tmp_path, bad_dataset, capsys):
    make_shards_main(["--jsonl", str(bad_dataset), "--out", str(tmp_path / "o"),
                      "--samples-per-shard", "100"])
    assert "wrote 13 samples into 1 shards" in capsys.readouterr().out
    assert os.listdir(tmp_path / "o") == ["shard-000000.tar"]  # no temporary file left


def test_random_resized_crop_params():
    rng = np.random.default_rng(0)
    for w, h in [(64, 64), (100, 30), (7, 300), (1, 1)]:
        for _ in range(50):
            x, y, cw, ch = random_resized_crop_params(w, h, rng, scale=(0.8, 1.0))
            assert 0 <= x and 0 <= y and cw >= 1 and ch >= 1 and x + cw <= w and y + ch <= h
    areas = [np.prod(random_resized_crop_params(200, 200, rng)[2:]) / 40000 for _ in range(200)]
    assert 0.78 <= min(areas) and max(areas) <= 1.0


def full_iter(loader):
    while True:
        yield from loader


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_position_is_exact(tmp_path, backend):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(24):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(_encode(_smooth_image(i, (20, 20))))
        rows.append(json.dumps({"image": f"img/{i}.jpg", "caption": [f"c{i}", f"d{i}"]}))
    (tmp_path / "d.jsonl").write_text("\n".join(rows))
    shards_from_jsonl(str(tmp_path / "d.jsonl"), str(tmp_path / "s"), prefix="r", samples_per_shard=7)
    index = build_index(shards=str(tmp_path / "s" / "r-*.tar"))

    def make():
        return ImageTextLoader(index, _tokenizer, 8, 3, seed=5, shard_id=1, num_shards=2, backend=backend,
                               workers=0)

    ref = [x for _, x in zip(range(7), full_iter(make()))]
    part = make()
    it = full_iter(part)
    for _ in range(3):
        next(it)
    state = part.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [x for _, x in zip(range(4), full_iter(resumed))]  # crosses into the next epoch
    for x, y in zip(ref[3:], rest):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.images, y.images)
        assert x.captions == y.captions
    with pytest.raises(ValueError, match="loader state"):
        ImageTextLoader(index.records[:12], _tokenizer, 8, 3, shard_id=0, num_shards=2,
                        backend=backend).load_state_dict(state)


def test_worker_processes_give_the_same_batches(bad_dataset):
    index = build_index(str(bad_dataset))
    inline = list(ImageTextLoader(index, _tokenizer, 16, 3, seed=2, backend="pillow", workers=0))
    workers = ImageTextLoader(index, _tokenizer, 16, 3, seed=2, backend="pillow", workers=2)
    pooled = list(workers)
    assert len(inline) == len(pooled) == 3
    for x, y in zip(inline, pooled):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.images, y.images)
    assert workers.stats["corrupt"] == 1


def test_eval_batches_raise_or_skip(bad_dataset):
    records = read_jsonl(str(bad_dataset))
    with pytest.raises(ValueError, match="truncated.jpg"):
        list(eval_batches(records, 16))
    stats = DataStats()
    batches = list(eval_batches(records, 16, batch_size=4, skip_bad=True, stats=stats))
    kept = [i for _, idx in batches for i in idx]
    assert [os.path.basename(records[i].path) for i in kept] == [
        f"good{i}.jpg" for i in range(6)] + ["cmyk.jpg", "gray.jpg", "rgba.png", "empty_caption.jpg",
                                             "no_caption.jpg"]
    assert stats["corrupt"] == 3 and stats["missing"] == 1 and stats["truncated"] == 1
    assert sum(len(x) for x, _ in batches) == 11
    with pytest.raises(ValueError, match="damaged.png: cannot decode"):
        list(eval_batches([r for r in records if r.key.endswith("damaged.png")], 16))


def test_loader_argument_errors(bad_dataset):
    index = build_index(str(bad_dataset))
    with pytest.raises(ValueError, match="batch_size"):
        ImageTextLoader(index, _tokenizer, 16, 0)
    with pytest.raises(ValueError, match="shard_id"):
        ImageTextLoader(index, _tokenizer, 16, 2, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ImageTextLoader(index, _tokenizer, 16, 100)
    with pytest.raises(ValueError, match="backend"):
        ImageTextLoader(index, _tokenizer, 16, 2, backend="opencv")
    with pytest.raises(ValueError, match="no usable records"):
        ImageTextLoader([], _tokenizer, 16, 2)
    if dali_available():
        with pytest.raises(ValueError, match="webdataset shards only"):
            ImageTextLoader(index, _tokenizer, 16, 2, backend="dali")


def test_backend_falls_back_to_pillow_without_dali(monkeypatch, bad_dataset):
    import m2model.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "dali_available", lambda: False)
    assert loader_mod.resolve_backend("auto") == "pillow"
    with pytest.raises(ValueError, match="cannot be imported"):
        loader_mod.resolve_backend("dali")
    monkeypatch.setattr(loader_mod, "dali_available", lambda: True)
    assert loader_mod.resolve_backend("auto", build_index(str(bad_dataset)).records) == "pillow"  # jsonl


def test_probe_reads_only_the_header_and_end_marker():
    data = _encode(_smooth_image(0, (30, 20)))
    assert probe_image(data) == ("JPEG", "RGB", 30, 20)
    with pytest.raises(Exception, match="truncated"):
        probe_image(data[:-10])
