"""Retrieval and classification metrics (in percent, as the M2-Encoder paper reports them).

Retrieval: ``relevance[i, j]`` says whether text j is a right answer for image i (and, unless a separate
text->image relevance is given, image i for text j). For a query, the rank of the best relevant candidate
decides recall: R@k is the fraction of queries whose best relevant candidate is among the first k. MR is
the mean of i2t R@1/5/10 and t2i R@1/5/10. Two protocols decide what is relevant and how ties rank
(``m2model.evaluate`` builds the relevance):

* ``official`` (:func:`official_retrieval_metrics`): the official ``eval_retrieval.py`` exactly. Its
  relevance credits, for image->text, only the last copy of a caption that occurs more than once in the
  file (the others count as wrong answers, with the same score), and ranks by numpy's ``argsort`` of the
  float64 similarities, so tied scores are ordered as numpy's (unstable) sort leaves them.
* ``m2model`` (:func:`retrieval_metrics`): every copy of a caption is a right answer for every image it
  describes, and ties follow ``ties``:

* ``"pessimistic"`` (default): an irrelevant candidate with the same score as the best relevant one ranks
  before it. Degenerate embeddings (all equal) therefore score the chance level, never 100.
* ``"optimistic"``: relevant candidates win ties.
* ``"index"``: candidates with equal scores are ordered by index (a stable sort on descending score).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["best_relevant_rank", "retrieval_metrics", "official_retrieval_metrics", "topk_accuracy",
           "TIE_MODES", "PROTOCOLS"]

TIE_MODES = ("pessimistic", "optimistic", "index")
PROTOCOLS = ("official", "m2model")


def best_relevant_rank(
    scores: torch.Tensor, relevant: torch.Tensor, ties: str = "pessimistic", chunk: int = 1024
) -> torch.Tensor:
    """0-based rank of the best relevant candidate in each row of ``scores`` [Q, C] (higher = better)."""
    if ties not in TIE_MODES:
        raise ValueError(f"ties must be one of {TIE_MODES}, got {ties!r}")
    if scores.dim() != 2 or scores.shape != relevant.shape:
        raise ValueError(
            f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must be equal 2-D shapes"
        )
    if scores.numel() and torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    relevant = relevant.to(torch.bool)
    none = ~relevant.any(1)
    if none.any():
        raise ValueError(
            f"{int(none.sum())} queries have no relevant candidate (first: row {int(none.nonzero()[0])})"
        )
    out = []
    arange = torch.arange(scores.shape[1], device=scores.device)
    for s, r in zip(scores.split(chunk), relevant.split(chunk)):
        best = s.masked_fill(~r, float("-inf")).amax(1, keepdim=True)
        rank = (s > best).sum(1)
        tied_irrelevant = (s == best) & ~r
        if ties == "pessimistic":
            rank = rank + tied_irrelevant.sum(1)
        elif ties == "index":
            first = (
                ((s == best) & r).to(torch.int8).argmax(1, keepdim=True)
            )  # lowest index among best relevant
            rank = rank + (tied_irrelevant & (arange < first)).sum(1)
        out.append(rank)
    return torch.cat(out)


def _check_retrieval_inputs(image_embeds, text_embeds, relevance, relevance_t2i):
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"embeddings must be [I, D] and [T, D], got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if tuple(relevance.shape) != (len(image_embeds), len(text_embeds)):
        raise ValueError(
            f"relevance must be [{len(image_embeds)}, {len(text_embeds)}], got {tuple(relevance.shape)}"
        )
    if relevance_t2i is not None and tuple(relevance_t2i.shape) != (len(text_embeds), len(image_embeds)):
        raise ValueError(f"relevance_t2i must be [{len(text_embeds)}, {len(image_embeds)}], got "
                         f"{tuple(relevance_t2i.shape)}")
    if len(image_embeds) == 0 or len(text_embeds) == 0:
        raise ValueError("retrieval needs at least one image and one text")


def _recalls(i2t: torch.Tensor, t2i: torch.Tensor, ks, num_images: int, num_texts: int) -> dict:
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * (ranks < k).double().mean().item()
    out["MR"] = sum(out.values()) / len(out)
    out["num_images"], out["num_texts"] = num_images, num_texts
    return out


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    relevance: torch.Tensor,
    ks=(1, 5, 10),
    ties: str = "pessimistic",
    relevance_t2i: torch.Tensor | None = None,
) -> dict[str, float]:
    """R@k for image->text and text->image and MR from embeddings [I, D], [T, D] and relevance [I, T]
    (text->image: ``relevance_t2i`` [T, I], by default ``relevance.T``); ties broken by ``ties``."""
    _check_retrieval_inputs(image_embeds, text_embeds, relevance, relevance_t2i)
    sim = image_embeds.float() @ text_embeds.float().T
    i2t = best_relevant_rank(sim, relevance, ties)
    t2i = best_relevant_rank(sim.T, relevance.T if relevance_t2i is None else relevance_t2i, ties)
    return _recalls(i2t, t2i, ks, len(image_embeds), len(text_embeds))


def _argsort_ranks(queries: np.ndarray, candidates: np.ndarray, relevant: np.ndarray, chunk: int):
    """Rank of the first relevant candidate in ``np.argsort(-(queries @ candidates.T))``, row by row, as
    the official calu_recall finds its hits; also how many queries' rank depends on the order of tied
    scores (a relevant and an irrelevant candidate with the same score as the best relevant one)."""
    ranks, tie_dependent = [], 0
    for start in range(0, len(queries), chunk):
        sim = queries[start:start + chunk] @ candidates.T
        rel = relevant[start:start + chunk]
        order = np.argsort(-sim, axis=1)
        hit = np.take_along_axis(rel, order, axis=1)
        ranks.append(hit.argmax(1))
        best = np.where(rel, sim, -np.inf).max(1, keepdims=True)
        tie_dependent += int(((sim == best) & ~rel).any(1).sum())
    return torch.from_numpy(np.concatenate(ranks)), tie_dependent


def official_retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    relevance_i2t: torch.Tensor,
    relevance_t2i: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """R@k and MR by the official ``calu_recall``: float64 similarities (the embeddings converted, as
    its numpy arrays are), ``np.argsort`` of the negated scores per query, the first relevant candidate's
    position. ``relevance_i2t`` [I, T] and ``relevance_t2i`` [T, I] as its ``img2txt_gt`` / ``txt2img_gt``.
    Also returns ``i2t_tie_dependent`` / ``t2i_tie_dependent``: queries whose result numpy's tie order
    decides (repeated captions have equal scores; numpy's default sort is not stable)."""
    _check_retrieval_inputs(image_embeds, text_embeds, relevance_i2t, relevance_t2i)
    img = image_embeds.detach().cpu().double().numpy()
    txt = text_embeds.detach().cpu().double().numpy()
    rel_i2t = relevance_i2t.cpu().numpy().astype(bool)
    rel_t2i = relevance_t2i.cpu().numpy().astype(bool)
    for name, rel in (("image", rel_i2t), ("text", rel_t2i)):
        none = ~rel.any(1)
        if none.any():
            raise ValueError(f"{int(none.sum())} {name} queries have no relevant candidate (first: row "
                             f"{int(none.nonzero()[0][0])})")
    i2t, i2t_ties = _argsort_ranks(img, txt, rel_i2t, chunk)
    t2i, t2i_ties = _argsort_ranks(txt, img, rel_t2i, chunk)
    out = _recalls(i2t, t2i, ks, len(img), len(txt))
    out["i2t_tie_dependent"], out["t2i_tie_dependent"] = i2t_ties, t2i_ties
    return out


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent; ties broken pessimistically (a tied wrong class ranks first)."""
    if logits.dim() != 2 or labels.shape != (len(logits),):
        raise ValueError(
            f"logits [N, C] and labels [N] expected, got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("no samples")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    relevant = torch.zeros_like(logits, dtype=torch.bool)
    relevant[torch.arange(len(labels)), labels] = True
    ranks = best_relevant_rank(logits.float(), relevant, "pessimistic")
    return {f"top{k}": 100.0 * (ranks < k).double().mean().item() for k in ks}
