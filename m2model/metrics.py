"""Retrieval and classification metrics (in percent, as the M2-Encoder paper reports them).

Retrieval: ``relevance[i, j]`` says whether text j describes image i (several captions per image; a caption
text that occurs for several images counts for each of them, as in the official evaluation). For a query,
the rank of the best relevant candidate decides recall: R@k is the fraction of queries whose best
relevant candidate is among the first k. MR is the mean of i2t R@1/5/10 and t2i R@1/5/10.

Ties between scores are broken by ``ties``:

* ``"pessimistic"`` (default): an irrelevant candidate with the same score as the best relevant one ranks
  before it. Degenerate embeddings (all equal) therefore score the chance level, never 100.
* ``"optimistic"``: relevant candidates win ties.
* ``"index"``: candidates with equal scores are ordered by index (a stable sort on descending score).
"""

from __future__ import annotations

import torch

__all__ = ["best_relevant_rank", "retrieval_metrics", "topk_accuracy", "TIE_MODES"]

TIE_MODES = ("pessimistic", "optimistic", "index")


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


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    relevance: torch.Tensor,
    ks=(1, 5, 10),
    ties: str = "pessimistic",
) -> dict[str, float]:
    """R@k for image->text and text->image and MR from embeddings [I, D], [T, D] and relevance [I, T]."""
    if image_embeds.dim() != 2 or text_embeds.dim() != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"embeddings must be [I, D] and [T, D], got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if tuple(relevance.shape) != (len(image_embeds), len(text_embeds)):
        raise ValueError(
            f"relevance must be [{len(image_embeds)}, {len(text_embeds)}], got {tuple(relevance.shape)}"
        )
    if len(image_embeds) == 0 or len(text_embeds) == 0:
        raise ValueError("retrieval needs at least one image and one text")
    sim = image_embeds.float() @ text_embeds.float().T
    i2t = best_relevant_rank(sim, relevance, ties)
    t2i = best_relevant_rank(sim.T, relevance.T, ties)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = 100.0 * (ranks < k).double().mean().item()
    out["MR"] = sum(out.values()) / len(out)
    out["num_images"], out["num_texts"] = len(image_embeds), len(text_embeds)
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
