"""Load the released M2-Encoder checkpoints (``m2_encoder_{0.4B,1B,10B}.ckpt``) into :class:`M2Encoder`.

The official model (``VLMo`` in alipay/Ant-Multi-Modal-Framework, prj/M2_Encoder) stores a torchscale BEiT3
``backbone`` (multiway experts ``.A.`` = vision, ``.B.`` = language), a second torchscale encoder
``backbone_vl`` for the shared layers, ITC projections and logit scales. Its inference path
(``infer_image`` / ``infer_text`` -> ``cls_vlffn_feats``, similarity scaled by ``logit_scale.exp()``) uses:

======================================================  =================================================
official key                                            ours
======================================================  =================================================
backbone.vision_embed.proj.{weight,bias}                patch_embed.{weight,bias}
backbone.vision_embed.cls_token                         cls_token
backbone.text_embed.weight                              token_embed.weight
backbone.encoder.embed_positions.A.weight [P+3, D]      image_pos_embed [1, P+1, D] (rows 2.., fairseq)
backbone.encoder.embed_positions.B.weight [1024, D]     text_pos_embed [1, L, D] (rows 2 .. 2+L)
backbone.encoder.layers.i.self_attn_layer_norm.A|B      layers.i.attn_norm.vision|language
backbone.encoder.layers.i.self_attn.{q,k,v,out}_proj.A|B  layers.i.{q,k,v,out}_proj.vision|language
backbone.encoder.layers.i.self_attn.inner_attn_ln.A|B   layers.i.inner_attn_ln.vision|language
backbone.encoder.layers.i.final_layer_norm.A|B          layers.i.ffn_norm.vision|language
backbone.encoder.layers.i.ffn.A|B.{fc1,fc2,ffn_layernorm}  layers.i.ffn.vision|language.*
backbone.encoder.layer_norm.A|B                         layers_norm.vision|language
backbone_vl.layers.i.<same>.A                           shared_layers.i.<same>.shared
backbone_vl.layer_norm.A                                shared_norm
itc_vl_image_proj.fc.weight / itc_vl_text_proj.fc.weight  image_proj.weight / text_proj.weight
logit_scale                                             logit_scale
======================================================  =================================================

Keys the official inference never reads are dropped and listed in the report: the ``.B`` experts of
``backbone_vl`` (it runs with ``multiway_split_position=-1``, i.e. expert A for both modalities), the
pre-shared-layer heads ``itc_image_proj`` / ``itc_text_proj``, ``logit_vl_scale``, ``pooler``, ``norm``,
``vision_embed.mask_token``, ``visual_tokenizer.*`` and ``itc_teacher*``. Anything else is *unexpected*.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .config import M2Config, get_config
from .modeling import M2Encoder

__all__ = ["ConversionReport", "convert_official_state_dict", "load_official_checkpoint", "unwrap_checkpoint"]

_SUB = {  # official sub-module path inside a layer -> ours
    "self_attn_layer_norm": "attn_norm",
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.out_proj": "out_proj",
    "self_attn.inner_attn_ln": "inner_attn_ln",
    "final_layer_norm": "ffn_norm",
    "ffn": "ffn",
}
_EXPERT = {"A": "vision", "B": "language"}
_LAYER_RE = re.compile(r"^(backbone\.encoder|backbone_vl)\.layers\.(\d+)\.(.+)\.(A|B)\.(.+)$")
_NORM_RE = re.compile(r"^(backbone\.encoder|backbone_vl)\.layer_norm\.(A|B)\.(weight|bias)$")
_DROPPED = re.compile(
    r"^(visual_tokenizer\.|itc_teacher|pooler\.|norm\.|itc_image_proj\.|itc_text_proj\.|"
    r"logit_vl_scale$|backbone\.vision_embed\.mask_token$)"
)


@dataclass
class ConversionReport:
    missing: list[str] = field(default_factory=list)  # our keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys we do not understand
    mismatched: list[str] = field(default_factory=list)  # shape mismatches, "key: got X, expected Y"
    dropped: list[str] = field(default_factory=list)  # known keys the official inference does not use
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def block(name, items, limit=20):
            more = f" ... (+{len(items) - limit})" if len(items) > limit else ""
            return f"{name} ({len(items)}): {items[:limit]}{more}"

        return "\n".join(
            [
                block("missing", self.missing),
                block("unexpected", self.unexpected),
                block("mismatched", self.mismatched),
                block("dropped (unused)", self.dropped),
                *self.notes,
            ]
        )


def unwrap_checkpoint(ckpt: dict) -> dict[str, torch.Tensor]:
    """The tensor dict inside a Lightning (``state_dict``), DeepSpeed (``module``, ``_forward_module.``)
    or DDP (``module.``) checkpoint, or the dict itself."""
    if not isinstance(ckpt, dict):
        raise TypeError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    for key in ("state_dict", "module", "model"):
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    out = {}
    for k, v in ckpt.items():
        for prefix in ("_forward_module.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _map_key(key: str) -> tuple[str | None, bool]:
    """(our key or None, dropped?) for one official key; (None, False) means unexpected."""
    simple = {
        "backbone.vision_embed.proj.weight": "patch_embed.weight",
        "backbone.vision_embed.proj.bias": "patch_embed.bias",
        "backbone.vision_embed.cls_token": "cls_token",
        "backbone.text_embed.weight": "token_embed.weight",
        "backbone.encoder.embed_positions.A.weight": "image_pos_embed",
        "backbone.encoder.embed_positions.B.weight": "text_pos_embed",
        "itc_vl_image_proj.fc.weight": "image_proj.weight",
        "itc_vl_text_proj.fc.weight": "text_proj.weight",
        "logit_scale": "logit_scale",
    }
    if key in simple:
        return simple[key], False
    if _DROPPED.match(key):
        return None, True
    m = _LAYER_RE.match(key)
    if m:
        stack, idx, sub, expert, rest = m.groups()
        if sub not in _SUB:
            return None, False
        if stack == "backbone_vl":
            if expert == "B":
                return None, True
            return f"shared_layers.{idx}.{_SUB[sub]}.shared.{rest}", False
        return f"layers.{idx}.{_SUB[sub]}.{_EXPERT[expert]}.{rest}", False
    m = _NORM_RE.match(key)
    if m:
        stack, expert, param = m.groups()
        if stack == "backbone_vl":
            return (None, True) if expert == "B" else (f"shared_norm.{param}", False)
        return f"layers_norm.{_EXPERT[expert]}.{param}", False
    return None, False


def convert_official_state_dict(
    state_dict: dict, cfg: M2Config, target: dict[str, torch.Tensor] | None = None
):
    """Official (possibly wrapped) state dict -> (our state dict, :class:`ConversionReport`).

    ``target`` is our model's state dict (for shapes); built from ``cfg`` on the meta device when omitted.
    """
    sd = unwrap_checkpoint(state_dict)
    if target is None:
        with torch.device("meta"):
            target = M2Encoder(cfg).state_dict()
    report = ConversionReport()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        ours, dropped = _map_key(key)
        if dropped:
            report.dropped.append(key)
            continue
        if ours is None or ours not in target:
            report.unexpected.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            report.unexpected.append(f"{key} (not a tensor: {type(value).__name__})")
            continue
        if ours == "image_pos_embed":
            rows = cfg.num_patches + 3
            if value.dim() != 2 or value.shape[0] != rows:
                report.mismatched.append(
                    f"{key}: got {tuple(value.shape)}, expected ({rows}, {cfg.width}) "
                    f"for {cfg.image_size}px images with {cfg.patch_size}px patches"
                )
                continue
            value = value[2:].unsqueeze(0).clone()
            report.notes.append(f"{key}: dropped the 2 fairseq offset rows")
        elif ours == "text_pos_embed":
            if value.dim() != 2 or value.shape[0] < cfg.max_text_len + 2:
                report.mismatched.append(
                    f"{key}: got {tuple(value.shape)}, need at least "
                    f"{cfg.max_text_len + 2} rows for max_text_len={cfg.max_text_len}"
                )
                continue
            report.notes.append(
                f"{key}: kept rows 2..{cfg.max_text_len + 1} of {value.shape[0]} "
                f"(fairseq offset 2, max_text_len {cfg.max_text_len})"
            )
            value = value[2 : 2 + cfg.max_text_len].unsqueeze(0).clone()
        elif ours == "logit_scale":
            value = value.reshape(())
        if tuple(value.shape) != tuple(target[ours].shape):
            report.mismatched.append(
                f"{key} -> {ours}: got {tuple(value.shape)}, expected {tuple(target[ours].shape)}"
            )
            continue
        out[ours] = value
    report.missing = [k for k in target if k not in out]
    return out, report


# The head counts of the official sizes (``_get_{base,large,huge}_config`` of prj/M2_Encoder, which the
# released 0.4B / 1B / 10B checkpoints use): keyed by (width, FFN width), since no tensor shape reveals
# the number of heads.
_OFFICIAL_HEADS = {"base": 12, "large": 16, "huge": 32}
_RELEASED_HEADS = {(768, 3072): 12, (1024, 4096): 16, (4096, 16384): 32}


def _official_hparams(ckpt) -> dict:
    """The training config a Lightning checkpoint of the official code saved (``hyper_parameters`` ->
    ``config``), or {}."""
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if isinstance(hp, dict) and isinstance(hp.get("config"), dict):
        return hp["config"]
    return hp if isinstance(hp, dict) else {}


def infer_config(state_dict: dict, **overrides) -> M2Config:
    """Size of an official checkpoint from its tensors (width, layers, vocabulary, embedding, image size)
    and the head count from its saved hyper-parameters (``encoder_attention_heads``, else the official
    size ``beit_version``), else from the released sizes (width 768 / 1024 / 4096 -> 12 / 16 / 32 heads).
    Any other checkpoint needs ``heads=`` (ValueError otherwise): a guess would silently build another
    model."""
    hparams = _official_hparams(state_dict)
    sd = unwrap_checkpoint(state_dict)
    try:
        vocab, width = sd["backbone.text_embed.weight"].shape
        embed = sd["itc_vl_text_proj.fc.weight"].shape[0]
        ffn = sd["backbone.encoder.layers.0.ffn.A.fc1.weight"].shape[0]
        patch = sd["backbone.vision_embed.proj.weight"].shape[-1]
        rows = sd["backbone.encoder.embed_positions.A.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an official M2-Encoder checkpoint: {e} is missing") from e
    n_layers = 1 + max(
        int(m.group(1)) for k in sd if (m := re.match(r"backbone\.encoder\.layers\.(\d+)\.", k))
    )
    n_shared = len({m.group(1) for k in sd if (m := re.match(r"backbone_vl\.layers\.(\d+)\.", k))})
    side = int(round((rows - 3) ** 0.5))
    fields = dict(
        width=width,
        ffn_dim=ffn,
        num_layers=n_layers,
        num_shared_layers=n_shared,
        embed_dim=embed,
        vocab_size=vocab,
        patch_size=patch,
        image_size=side * patch,
    )
    if isinstance(hparams.get("max_text_len"), int):
        fields["max_text_len"] = hparams["max_text_len"]
    if "heads" not in overrides:
        if isinstance(hparams.get("encoder_attention_heads"), int):
            fields["heads"] = hparams["encoder_attention_heads"]
        elif hparams.get("beit_version") in _OFFICIAL_HEADS:
            fields["heads"] = _OFFICIAL_HEADS[hparams["beit_version"]]
        elif (width, ffn) in _RELEASED_HEADS:
            fields["heads"] = _RELEASED_HEADS[(width, ffn)]
        else:
            raise ValueError(
                f"cannot tell the number of attention heads of this checkpoint (width {width}, FFN {ffn}: "
                f"not a released size, and no saved hyper-parameters): pass heads=... or a config"
            )
    fields.update(overrides)
    return get_config("base", **fields)


def _cast(value: torch.Tensor, dtype) -> torch.Tensor:
    return value if dtype == "checkpoint" or not value.is_floating_point() else value.to(dtype)


def load_official_checkpoint(
    path_or_state_dict, cfg: M2Config | str | None = None, strict: bool = True, map_location="cpu",
    dtype: torch.dtype | str | None = None,
):
    """Build an :class:`M2Encoder` and load an official checkpoint into it. Returns (model, report).

    ``cfg``: an :class:`M2Config`, a size name ("0.4B", "1B", "10B", ...), or None to infer the size from the
    checkpoint (:func:`infer_config`). With ``strict`` any missing, unexpected or mis-shaped key raises
    ValueError with the report. ``dtype``: of the parameters; None is the model's (torch's default dtype,
    float32), as the official loader, which copies the stored tensors into a float32 model; ``"checkpoint"``
    keeps the stored dtype (half the memory for a 16-bit file).
    """
    floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    if dtype is not None and dtype != "checkpoint" and not floating:
        raise ValueError(f"dtype must be None, 'checkpoint' or a floating torch.dtype, got {dtype!r}")
    if dtype is None:
        dtype = torch.get_default_dtype()
    if isinstance(path_or_state_dict, dict):
        sd = path_or_state_dict
    else:
        sd = torch.load(path_or_state_dict, map_location=map_location, weights_only=False)
    if cfg is None:
        cfg = infer_config(sd)
    elif isinstance(cfg, str):
        cfg = get_config(cfg)
    with torch.device("meta"):  # no memory for weights that the checkpoint replaces anyway
        model = M2Encoder(cfg)
    new_sd, report = convert_official_state_dict(sd, cfg, target=model.state_dict())
    if strict and not report.ok:
        raise ValueError(f"official checkpoint does not match M2Encoder({cfg}):\n{report}")
    new_sd = {k: _cast(v, dtype) for k, v in new_sd.items()}
    if report.missing or report.mismatched:
        model = M2Encoder(cfg)  # freshly initialised weights where the checkpoint has none
        if dtype != "checkpoint":
            model.to(dtype)
        model.load_state_dict(new_sd, strict=False)
    else:
        # assign: the converted tensors become the parameters (no second copy of a 10B model); they were
        # cast above, so the model has the requested dtype, not whatever the file stored
        model.load_state_dict(new_sd, strict=True, assign=True)
    return model, report
