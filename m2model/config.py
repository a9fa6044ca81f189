"""Model sizes of the lean M2-Encoder.

The released checkpoints (alipay/Ant-Multi-Modal-Framework, prj/M2_Encoder) are BEiT-3 style
multiway transformers: ``num_layers`` modality layers in which every sub-module has a vision and a
language expert, then ``num_shared_layers`` layers that both modalities go through with the same
weights, then a bias-free projection of the first token to ``embed_dim``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["M2Config", "get_config", "list_configs", "count_parameters", "OFFICIAL_VOCAB_SIZE"]

OFFICIAL_VOCAB_SIZE = 115244  # the GLM SentencePiece vocabulary of the released checkpoints
BERT_CHINESE_VOCAB_SIZE = 21128  # bert-base-chinese WordPiece vocabulary (bundled default tokenizer)


@dataclass
class M2Config:
    width: int = 768
    heads: int = 12
    ffn_dim: int = 3072
    num_layers: int = 9  # modality (multiway) layers
    num_shared_layers: int = 3  # shared top layers
    embed_dim: int = 768
    image_size: int = 224
    patch_size: int = 16
    vocab_size: int = OFFICIAL_VOCAB_SIZE
    max_text_len: int = 52
    layernorm_eps: float = 1e-5
    dropout: float = 0.0  # attention-probability and residual-branch dropout (training only)
    init_logit_scale: float = 2.6592600369262695  # log(1 / 0.07)
    max_logit_scale: float = 100.0  # clamp of the exponentiated scale in training mode (none in eval)
    grad_checkpointing: bool = False
    use_apex_layernorm: bool = True  # apex FusedLayerNorm where `import apex` succeeds
    check_inputs: bool = True  # validate inputs (shapes, dtypes, id range, empty texts); one host sync

    def __post_init__(self):
        for name in (
            "width",
            "heads",
            "ffn_dim",
            "embed_dim",
            "image_size",
            "patch_size",
            "vocab_size",
            "max_text_len",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"M2Config.{name} must be a positive int, got {v!r}")
        for name in ("num_layers", "num_shared_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"M2Config.{name} must be a non-negative int, got {v!r}")
        if self.num_layers + self.num_shared_layers == 0:
            raise ValueError("M2Config needs at least one layer")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


_SIZES = {
    # name: (width, heads, ffn, modality layers, shared layers, embed)
    "base": dict(width=768, heads=12, ffn_dim=3072, num_layers=9, num_shared_layers=3, embed_dim=768),
    "large": dict(width=1024, heads=16, ffn_dim=4096, num_layers=21, num_shared_layers=3, embed_dim=1024),
    "huge": dict(width=4096, heads=32, ffn_dim=16384, num_layers=21, num_shared_layers=3, embed_dim=1024),
    # small sizes for tests and CPU demos (bert-base-chinese vocabulary, small images)
    "tiny": dict(width=64, heads=4, ffn_dim=256, num_layers=2, num_shared_layers=1, embed_dim=32,
                 image_size=32, patch_size=8, vocab_size=BERT_CHINESE_VOCAB_SIZE),
    "small": dict(width=256, heads=4, ffn_dim=1024, num_layers=4, num_shared_layers=2, embed_dim=256,
                  image_size=64, patch_size=8, vocab_size=BERT_CHINESE_VOCAB_SIZE),
}
_ALIASES = {"0.4B": "base", "1B": "large", "10B": "huge"}


def list_configs() -> list[str]:
    return sorted(_SIZES) + sorted(_ALIASES)


def get_config(name: str = "base", **overrides) -> M2Config:
    """Config of a named size ("tiny", "small", "base"/"0.4B", "large"/"1B", "huge"/"10B"), with overrides."""
    key = _ALIASES.get(name, name)
    if key not in _SIZES:
        raise ValueError(f"unknown M2-Encoder size {name!r}; choose one of {list_configs()}")
    fields = {f.name for f in dataclasses.fields(M2Config)}
    bad = set(overrides) - fields
    if bad:
        raise ValueError(f"unknown M2Config fields {sorted(bad)}; valid fields: {sorted(fields)}")
    return M2Config(**{**_SIZES[key], **overrides})


def count_parameters(cfg: M2Config) -> dict[str, int]:
    """Parameter count of ``M2Encoder(cfg)`` by part, computed from the config alone.

    Includes both experts of every modality layer, the token embedding (``cfg.vocab_size`` rows), the
    position tables (``num_patches + 1`` image rows, ``max_text_len`` text rows), both projections and the
    logit scale. Keys: embeddings, modality_layers, shared_layers, heads, total.
    """
    d, f = cfg.width, cfg.ffn_dim
    ln = 2 * d
    expert = (
        4 * (d * d + d)  # q, k, v, out projections
        + ln  # Sub-LN inside attention
        + (d * f + f)
        + (f * d + d)
        + 2 * f  # fc1, fc2, Sub-LN inside the FFN
        + 2 * ln
    )  # pre-attention and pre-FFN LayerNorms
    embeddings = (
        3 * cfg.patch_size**2 * d
        + d  # patch convolution
        + d  # class token
        + (cfg.num_patches + 1) * d  # image positions
        + cfg.vocab_size * d  # token embedding
        + cfg.max_text_len * d
    )  # text positions
    modality = cfg.num_layers * 2 * expert + (2 * ln if cfg.num_layers else 0)
    shared = cfg.num_shared_layers * expert + (ln if cfg.num_shared_layers else 0)
    heads = 2 * d * cfg.embed_dim + 1
    return dict(
        embeddings=embeddings,
        modality_layers=modality,
        shared_layers=shared,
        heads=heads,
        total=embeddings + modality + shared + heads,
    )
