"""Zero-shot evaluation of a trained checkpoint on the held-out split of ``m2model.synth``, in English and
Chinese: image-text retrieval (R@1/5/10 both ways, MR) and colour x shape classification.

    python -m m2model.eval_synth --data DIR --checkpoint RUN_DIR_OR_CKPT [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from m2model.checkpoint import load_trained
from m2model.evaluate import (
    describe_protocol,
    encode_images,
    encode_texts,
    load_retrieval_jsonl,
    zero_shot_classifier,
)
from m2model.metrics import retrieval_metrics, topk_accuracy

PROTOCOL, TIES = "m2model", "pessimistic"


@torch.no_grad()
def evaluate_synth(model, tokenizer, data_dir: str, batch_size: int = 128, progress: bool = False) -> dict:
    with open(os.path.join(data_dir, "classes.json"), encoding="utf-8") as f:
        classes = json.load(f)
    results, image_embeds = {}, None
    for lang in ("en", "zh"):
        # every copy of a caption credited: the synthetic captions repeat across many images (one per
        # colour x shape x size x background), where crediting only the last copy would score nonsense
        data = load_retrieval_jsonl(os.path.join(data_dir, f"val_{lang}.jsonl"), protocol=PROTOCOL)
        if image_embeds is None:  # both languages describe the same held-out images: encode them once
            image_embeds, ok = encode_images(model, data.records, batch_size, progress=progress)
        keep_text = ok[torch.tensor(data.text_image)]
        texts = [t for t, k in zip(data.texts, keep_text.tolist()) if k]
        rel = data.relevance()[ok][:, keep_text]
        text_embeds = encode_texts(model, tokenizer, texts, progress=progress)
        retrieval = retrieval_metrics(image_embeds, text_embeds, rel, ties=TIES)
        retrieval["skipped_images"] = int((~ok).sum())
        retrieval.update(describe_protocol(PROTOCOL, TIES))
        classifier = zero_shot_classifier(model, tokenizer, classes[lang]["classnames"],
                                          classes[lang]["templates"], progress=progress)
        labels = torch.tensor([r.label for r in data.records])[ok]
        acc = topk_accuracy(image_embeds @ classifier, labels, (1, 5))
        acc["num_images"] = len(labels)
        # R@1 of random scores: a query's chance to rank one of its relevant candidates first (captions
        # with the same text as an image's caption count as relevant to it, as in the official evaluation)
        rel = rel.float()
        chance = {"i2t": 100.0 * (rel.sum(1) / rel.shape[1]).mean().item(),
                  "t2i": 100.0 * (rel.sum(0) / rel.shape[0]).mean().item()}
        results[lang] = {"classification": acc, "retrieval": retrieval,
                         "num_classes": len(classes[lang]["classnames"]),
                         "chance_top1": 100.0 / len(classes[lang]["classnames"]),
                         "chance_R@1": max(chance.values()), "chance_i2t_R@1": chance["i2t"],
                         "chance_t2i_R@1": chance["t2i"]}
    return results


def format_table(results: dict) -> str:
    head = (f"| {'language':8} | {'top-1':>6} | {'top-5':>6} | {'I2T R@1':>7} | {'R@5':>5} | {'R@10':>5} | "
            f"{'T2I R@1':>7} | {'R@5':>5} | {'R@10':>5} | {'MR':>5} | {'chance R@1':>10} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for lang, r in results.items():
        c, t = r["classification"], r["retrieval"]
        lines.append(f"| {lang:8} | {c['top1']:6.1f} | {c.get('top5', float('nan')):6.1f} | "
                     f"{t['i2t_R@1']:7.1f} | {t['i2t_R@5']:5.1f} | {t['i2t_R@10']:5.1f} | "
                     f"{t['t2i_R@1']:7.1f} | {t['t2i_R@5']:5.1f} | {t['t2i_R@10']:5.1f} | {t['MR']:5.1f} | "
                     f"{r['chance_R@1']:10.2f} |")
    t = next(iter(results.values()))["retrieval"]
    lines.append(f"retrieval scored by protocol {t['protocol']}: {t['duplicate_captions']} (a caption "
                 f"text shared by several images counts for each), ties {t['ties']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m m2model.eval_synth", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder written by python -m m2model.synth")
    ap.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--min-top1", type=float, default=None, help="exit 1 when a language's top-1 is lower")
    ap.add_argument("--min-r1-over-chance", type=float, default=None,
                    help="exit 1 when a retrieval R@1 (either direction) is below this multiple of chance")
    args = ap.parse_args(argv)
    model, tokenizer, _ = load_trained(args.checkpoint)
    results = evaluate_synth(model, tokenizer, args.data)
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    ok = True
    for lang, r in results.items():
        if args.min_top1 is not None and r["classification"]["top1"] < args.min_top1:
            print(f"FAIL {lang}: top-1 {r['classification']['top1']:.1f} < {args.min_top1}", file=sys.stderr)
            ok = False
        if args.min_r1_over_chance is not None:
            for d in ("i2t", "t2i"):
                if r["retrieval"][f"{d}_R@1"] < args.min_r1_over_chance * r[f"chance_{d}_R@1"]:
                    print(f"FAIL {lang}: {d} R@1 {r['retrieval'][f'{d}_R@1']:.1f} < "
                          f"{args.min_r1_over_chance} x chance", file=sys.stderr)
                    ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
