"""The M2-Encoder: a BEiT-3 style multiway transformer with MAGNETO Sub-LN.

Layout (following the official release, alipay/Ant-Multi-Modal-Framework prj/M2_Encoder, which builds on
torchscale's BEiT3):

* image: 16x16 patch convolution, a class token, learned absolute positions;
  text: token embedding, learned absolute positions; padded positions are zeroed.
* ``num_layers`` modality layers. Every sub-module (LayerNorms, q/k/v/out projections, the Sub-LN inside
  attention, the FFN with its Sub-LN) exists twice: a vision expert (torchscale's ``A``) and a language
  expert (``B``). Images only ever run through ``vision`` experts, texts only through ``language`` ones.
  A final per-modality LayerNorm closes the stack.
* ``num_shared_layers`` layers that both modalities run through with the same weights (in the official
  code these are the ``A`` experts of ``backbone_vl``), then a final LayerNorm.
* The first token goes through a bias-free linear projection and is L2-normalised.

Each layer is pre-LN with MAGNETO's Sub-LN (an extra LayerNorm before the attention output projection and
before the second FFN linear):  x = x + W_o LN(Attn(LN(x)));  x = x + W_2 LN(GELU(W_1 LN(x))).
MAGNETO initialisation multiplies the weights and biases of the value, output, fc1 and fc2 linears by
gamma = sqrt(log(2 N)), N being the depth of the stack they belong to (torchscale's ``subln`` init).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import M2Config

__all__ = ["M2Encoder", "LayerNorm", "HAS_APEX"]

try:  # pragma: no cover - apex is not installed in CI
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm

    HAS_APEX = True
except ImportError:  # apex missing, or present but broken
    _ApexLayerNorm = None
    HAS_APEX = False

VISION, LANGUAGE = "vision", "language"


def LayerNorm(dim: int, eps: float, use_apex: bool = True) -> nn.Module:
    """apex FusedLayerNorm when apex imports (same parameters and outputs), torch LayerNorm otherwise."""
    if use_apex and HAS_APEX:
        return _ApexLayerNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)


class Multiway(nn.Module):
    """A vision and a language copy of one sub-module; ``forward(x, modality)`` picks one."""

    def __init__(self, make):
        super().__init__()
        self.vision = make()
        self.language = make()

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return getattr(self, modality)(x)


class Single(nn.Module):
    """One sub-module that ignores the modality (the shared layers)."""

    def __init__(self, make):
        super().__init__()
        self.shared = make()

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.shared(x)


class FeedForward(nn.Module):
    def __init__(self, cfg: M2Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_dim)
        self.ffn_layernorm = LayerNorm(cfg.ffn_dim, cfg.layernorm_eps, cfg.use_apex_layernorm)  # Sub-LN
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """One pre-LN Sub-LN transformer layer; ``multiway`` gives every sub-module two experts."""

    def __init__(self, cfg: M2Config, multiway: bool):
        super().__init__()
        wrap = Multiway if multiway else Single
        d, eps, apex = cfg.width, cfg.layernorm_eps, cfg.use_apex_layernorm
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.attn_norm = wrap(lambda: LayerNorm(d, eps, apex))
        self.q_proj = wrap(lambda: nn.Linear(d, d))
        self.k_proj = wrap(lambda: nn.Linear(d, d))
        self.v_proj = wrap(lambda: nn.Linear(d, d))
        self.inner_attn_ln = wrap(lambda: LayerNorm(d, eps, apex))  # Sub-LN
        self.out_proj = wrap(lambda: nn.Linear(d, d))
        self.ffn_norm = wrap(lambda: LayerNorm(d, eps, apex))
        self.ffn = wrap(lambda: FeedForward(cfg))

    def forward(self, x: torch.Tensor, modality: str, attn_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attn_norm(x, modality)
        q, k, v = (
            rearrange(p(h, modality), "n l (heads d) -> n heads l d", heads=self.heads)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        a = rearrange(a, "n heads l d -> n l (heads d)")
        x = x + F.dropout(
            self.out_proj(self.inner_attn_ln(a, modality), modality), self.dropout, self.training
        )
        h = self.ffn(self.ffn_norm(x, modality), modality)
        return x + F.dropout(h, self.dropout, self.training)


class M2Encoder(nn.Module):
    """Bilingual image-text dual encoder (M2-Encoder).

    ``encode_image(images)``: float [N, 3, S, S], normalised with mean = std = 0.5 -> [N, embed_dim].
    ``encode_text(input_ids, attention_mask)``: [N, L] ids, mask 1 = token, 0 = pad -> [N, embed_dim].
    Both embeddings have unit L2 norm.
    ``forward(images, input_ids, attention_mask)`` -> (image_embeds, text_embeds, logit_scale.exp()), the
    scale clamped to ``cfg.max_logit_scale`` (100) in training mode only.
    """

    def __init__(self, cfg: M2Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.grad_checkpointing = cfg.grad_checkpointing
        # embeddings
        self.patch_embed = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.image_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.token_embed = nn.Embedding(cfg.vocab_size, d)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, cfg.max_text_len, d))
        # transformer
        eps, apex = cfg.layernorm_eps, cfg.use_apex_layernorm
        self.layers = nn.ModuleList([Block(cfg, multiway=True) for _ in range(cfg.num_layers)])
        self.layers_norm = Multiway(lambda: LayerNorm(d, eps, apex)) if cfg.num_layers else None
        self.shared_layers = nn.ModuleList([Block(cfg, multiway=False) for _ in range(cfg.num_shared_layers)])
        self.shared_norm = LayerNorm(d, eps, apex) if cfg.num_shared_layers else None
        # heads
        self.image_proj = nn.Linear(d, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(d, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        d = self.cfg.width
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.image_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.text_pos_embed, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=d**-0.5)
        nn.init.normal_(self.image_proj.weight, std=0.02)
        nn.init.normal_(self.text_proj.weight, std=0.02)
        self.logit_scale.fill_(self.cfg.init_logit_scale)
        # Linears and LayerNorms keep torch's defaults; MAGNETO (Sub-LN) scaling per stack depth.
        for stack in (self.layers, self.shared_layers):
            if len(stack) == 0:
                continue
            for m in stack.modules():
                if isinstance(m, (nn.Linear, nn.LayerNorm)) or (HAS_APEX and isinstance(m, _ApexLayerNorm)):
                    m.reset_parameters()
            gamma = math.sqrt(math.log(2 * len(stack)))
            for name, p in stack.named_parameters():
                if any(k in name for k in ("fc1", "fc2", "out_proj", "v_proj")):
                    p.mul_(gamma)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    # ------------------------------------------------------------------ encoders
    def _run(self, x: torch.Tensor, modality: str, attn_mask: torch.Tensor | None) -> torch.Tensor:
        for blocks, norm in ((self.layers, self.layers_norm), (self.shared_layers, self.shared_norm)):
            for block in blocks:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, modality, attn_mask, use_reentrant=False)
                else:
                    x = block(x, modality, attn_mask)
            if norm is not None:
                x = norm(x, modality) if isinstance(norm, Multiway) else norm(x)
        return x

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Final hidden states of all image tokens [N, 1 + patches, width] (class token first)."""
        if self.cfg.check_inputs:
            self._check_images(images)
        patches = self.patch_embed(images.to(self.patch_embed.weight.dtype))
        x = rearrange(patches, "n d gh gw -> n (gh gw) d")  # patches in row-major order
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.image_pos_embed.to(x.dtype)
        return self._run(x, VISION, None)

    def text_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states of all text tokens [N, L, width]; padded positions carry no meaning."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.cfg.check_inputs:
            self._check_text(input_ids, attention_mask)
        keep = attention_mask.bool()
        x = self.token_embed(input_ids) + self.text_pos_embed[:, : input_ids.shape[1]]
        x = x * keep.unsqueeze(-1).to(x.dtype)
        # boolean SDPA mask: True = may attend; broadcast over heads and queries
        return self._run(x, LANGUAGE, keep[:, None, None, :])

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_proj(self.image_tokens(images)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        x = self.text_proj(self.text_tokens(input_ids, attention_mask)[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ):
        image_embeds = self.encode_image(images)
        text_embeds = self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale.exp()
        if self.training:  # the CLIP / open_clip bound on the temperature, a training-time measure
            scale = scale.clamp(max=self.cfg.max_logit_scale)
        # in eval mode unclamped, as the official inference (logit_scale.exp() * img @ txt.T)
        return image_embeds, text_embeds, scale

    # ------------------------------------------------------------------ input checks
    def _check_images(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor normalised with mean=std=0.5, got {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
            raise ValueError(f"images must have shape [N, 3, {s}, {s}], got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")
        if images.device != self.patch_embed.weight.device:
            raise ValueError(
                f"images are on {images.device} but the model is on {self.patch_embed.weight.device}"
            )

    def _check_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"input_ids must be an int64/int32 tensor, got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}"
            )
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [N, L] with N, L >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds max_text_len {self.cfg.max_text_len}")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(getattr(attention_mask, 'shape', ()))}"
            )
        if input_ids.device != self.token_embed.weight.device:
            raise ValueError(
                f"input_ids are on {input_ids.device} but the model is on {self.token_embed.weight.device}"
            )
        if attention_mask.device != input_ids.device:
            raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
        stats = torch.stack(
            [
                input_ids.min().long(),
                input_ids.max().long(),
                ((attention_mask != 0) & (attention_mask != 1)).any().long(),
                (attention_mask.sum(1) == 0).any().long(),
                (attention_mask[:, 0] == 0).any().long(),
            ]
        ).tolist()
        lo, hi, bad_mask, empty, no_first = stats
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.cfg.vocab_size}), got values in [{lo}, {hi}]")
        if bad_mask:
            raise ValueError("attention_mask must contain only 0 (pad) and 1 (token)")
        if empty:
            raise ValueError("a text in the batch has no tokens (attention_mask row is all zeros)")
        if no_first:
            raise ValueError("the first position of every text must be a token (the pooled [CLS] position)")
