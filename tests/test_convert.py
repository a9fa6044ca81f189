"""The converter, checked against a synthetic checkpoint with the official key names and shapes and a
functional re-implementation of the official (torchscale BEiT3 + backbone_vl) inference path."""

import pytest
import torch
import torch.nn.functional as F

from m2model.checkpoint import load_model
from m2model.config import get_config
from m2model.convert import convert_official_state_dict, infer_config, load_official_checkpoint

CFG = get_config("tiny", num_layers=2, num_shared_layers=2, vocab_size=300, max_text_len=12)
MAX_SOURCE_POSITIONS = 1024  # torchscale default for the language position table


def official_state_dict(cfg, seed=0):
    """Tensors named and shaped as in the released checkpoints (VLMo module of prj/M2_Encoder)."""
    g = torch.Generator().manual_seed(seed)
    d, f, p, e = cfg.width, cfg.ffn_dim, cfg.patch_size, cfg.embed_dim
    sd = {}

    def w(name, *shape, ln=False):
        t = torch.randn(*shape, generator=g)
        sd[name] = (1 + 0.1 * t) if ln else 0.2 * t / max(1, shape[-1]) ** 0.5

    w("backbone.text_embed.weight", cfg.vocab_size, d)
    w("backbone.vision_embed.proj.weight", d, 3, p, p)
    w("backbone.vision_embed.proj.bias", d)
    w("backbone.vision_embed.mask_token", 1, 1, d)
    w("backbone.vision_embed.cls_token", 1, 1, d)
    w("backbone.encoder.embed_positions.A.weight", cfg.num_patches + 3, d)
    w("backbone.encoder.embed_positions.B.weight", MAX_SOURCE_POSITIONS, d)
    for stack, n in (("backbone.encoder", cfg.num_layers), ("backbone_vl", cfg.num_shared_layers)):
        for i in range(n):
            for x in "AB":
                pre = f"{stack}.layers.{i}"
                for proj in "qkv":
                    w(f"{pre}.self_attn.{proj}_proj.{x}.weight", d, d)
                    w(f"{pre}.self_attn.{proj}_proj.{x}.bias", d)
                w(f"{pre}.self_attn.out_proj.{x}.weight", d, d)
                w(f"{pre}.self_attn.out_proj.{x}.bias", d)
                for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                    w(f"{pre}.{ln}.{x}.weight", d, ln=True)
                    w(f"{pre}.{ln}.{x}.bias", d)
                w(f"{pre}.ffn.{x}.fc1.weight", f, d)
                w(f"{pre}.ffn.{x}.fc1.bias", f)
                w(f"{pre}.ffn.{x}.fc2.weight", d, f)
                w(f"{pre}.ffn.{x}.fc2.bias", d)
                w(f"{pre}.ffn.{x}.ffn_layernorm.weight", f, ln=True)
                w(f"{pre}.ffn.{x}.ffn_layernorm.bias", f)
        for x in "AB":
            w(f"{stack}.layer_norm.{x}.weight", d, ln=True)
            w(f"{stack}.layer_norm.{x}.bias", d)
    w("norm.weight", d, ln=True)
    w("norm.bias", d)
    w("pooler.dense.weight", d, d)
    w("pooler.dense.bias", d)
    for head in ("itc_text_proj", "itc_image_proj", "itc_vl_text_proj", "itc_vl_image_proj"):
        w(f"{head}.fc.weight", e, d)
    sd["logit_scale"] = torch.tensor(2.5)
    sd["logit_vl_scale"] = torch.tensor(3.0)
    return sd


def _official_layer(sd, pre, x, expert, heads, pad):
    def ln(name, t):
        return F.layer_norm(
            t, t.shape[-1:], sd[f"{pre}.{name}.{expert}.weight"], sd[f"{pre}.{name}.{expert}.bias"], 1e-5
        )

    def lin(name, t):
        return F.linear(t, sd[f"{pre}.{name}.{expert}.weight"], sd[f"{pre}.{name}.{expert}.bias"])

    b, n, d = x.shape
    h = ln("self_attn_layer_norm", x)
    q = (lin("self_attn.q_proj", h) * (d // heads) ** -0.5).view(b, n, heads, -1).transpose(1, 2)
    k = lin("self_attn.k_proj", h).view(b, n, heads, -1).transpose(1, 2)
    v = lin("self_attn.v_proj", h).view(b, n, heads, -1).transpose(1, 2)
    att = q @ k.transpose(-1, -2)
    if pad is not None:
        att = att.masked_fill(pad[:, None, None, :], float("-inf"))
    a = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + lin("self_attn.out_proj", ln("self_attn.inner_attn_ln", a))
    h = ln("final_layer_norm", x)
    ffn = f"{pre}.ffn.{expert}"
    h = F.gelu(F.linear(h, sd[f"{ffn}.fc1.weight"], sd[f"{ffn}.fc1.bias"]))
    h = F.layer_norm(
        h, h.shape[-1:], sd[f"{ffn}.ffn_layernorm.weight"], sd[f"{ffn}.ffn_layernorm.bias"], 1e-5
    )
    return x + F.linear(h, sd[f"{ffn}.fc2.weight"], sd[f"{ffn}.fc2.bias"])


def _official_stack(sd, stack, n, x, expert, heads, pad):
    if pad is not None:
        x = x * (1 - pad.unsqueeze(-1).to(x.dtype))
    for i in range(n):
        x = _official_layer(sd, f"{stack}.layers.{i}", x, expert, heads, pad)
    return F.layer_norm(
        x,
        x.shape[-1:],
        sd[f"{stack}.layer_norm.{expert}.weight"],
        sd[f"{stack}.layer_norm.{expert}.bias"],
        1e-5,
    )


def official_infer(sd, cfg, images=None, ids=None, mask=None):
    """cls_vlffn_feats of the official infer_image / infer_text."""
    if images is not None:
        x = (
            F.conv2d(
                images,
                sd["backbone.vision_embed.proj.weight"],
                sd["backbone.vision_embed.proj.bias"],
                stride=cfg.patch_size,
            )
            .flatten(2)
            .transpose(1, 2)
        )
        x = torch.cat([sd["backbone.vision_embed.cls_token"].expand(len(x), -1, -1), x], 1)
        pos = sd["backbone.encoder.embed_positions.A.weight"][2 : 2 + x.shape[1]]  # fairseq positions from 2
        x = _official_stack(sd, "backbone.encoder", cfg.num_layers, x + pos, "A", cfg.heads, None)
        x = _official_stack(sd, "backbone_vl", cfg.num_shared_layers, x, "A", cfg.heads, None)
        head = "itc_vl_image_proj"
    else:
        pad = mask == 0
        x = (
            sd["backbone.text_embed.weight"][ids]
            + sd["backbone.encoder.embed_positions.B.weight"][2 : 2 + ids.shape[1]]
        )
        x = _official_stack(sd, "backbone.encoder", cfg.num_layers, x, "B", cfg.heads, pad)
        x = _official_stack(sd, "backbone_vl", cfg.num_shared_layers, x, "A", cfg.heads, pad)  # split -1 -> A
        head = "itc_vl_text_proj"
    return F.normalize(F.linear(x[:, 0], sd[f"{head}.fc.weight"]), dim=-1)


def test_converted_model_reproduces_official_inference():
    sd = official_state_dict(CFG)
    model, report = load_official_checkpoint(sd, CFG)
    assert report.ok and not report.missing and not report.unexpected
    dropped = set(report.dropped)
    assert "logit_vl_scale" in dropped and "backbone.vision_embed.mask_token" in dropped
    assert "itc_text_proj.fc.weight" in dropped and "pooler.dense.weight" in dropped
    assert "backbone_vl.layers.1.ffn.B.fc1.weight" in dropped and "backbone_vl.layer_norm.B.weight" in dropped
    assert not any(k.startswith("backbone.encoder.layers") for k in dropped)
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    model.eval()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, CFG.image_size, CFG.image_size, generator=g) * 2 - 1
    ids = torch.randint(0, CFG.vocab_size, (3, CFG.max_text_len), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 9:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), official_infer(sd, CFG, images=images), atol=2e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            model.encode_text(ids, mask), official_infer(sd, CFG, ids=ids, mask=mask), atol=2e-5, rtol=1e-4
        )
        assert torch.isclose(model(images, ids, mask)[2], torch.tensor(2.5).exp())
    # the expert mapping, spot-checked: A = vision, B = language, backbone_vl A = shared
    torch.testing.assert_close(
        model.layers[1].q_proj.language.weight, sd["backbone.encoder.layers.1.self_attn.q_proj.B.weight"]
    )
    torch.testing.assert_close(
        model.layers[0].ffn.vision.ffn_layernorm.bias,
        sd["backbone.encoder.layers.0.ffn.A.ffn_layernorm.bias"],
    )
    torch.testing.assert_close(
        model.shared_layers[1].out_proj.shared.weight, sd["backbone_vl.layers.1.self_attn.out_proj.A.weight"]
    )


def test_wrapped_checkpoints_and_file_loading(tmp_path):
    sd = official_state_dict(CFG, seed=1)
    ref, _ = convert_official_state_dict(sd, CFG)
    wrapped = [
        {"state_dict": sd, "epoch": 3},
        {"module": {f"_forward_module.{k}": v for k, v in sd.items()}},
        {f"module.{k}": v for k, v in sd.items()},
    ]
    for ckpt in wrapped:
        out, report = convert_official_state_dict(ckpt, CFG)
        assert report.ok and out.keys() == ref.keys()
        assert all(torch.equal(out[k], ref[k]) for k in ref)
    path = tmp_path / "m2_encoder_tiny.ckpt"
    torch.save({"state_dict": sd}, path)
    model, report = load_official_checkpoint(path, CFG)
    assert report.ok
    torch.testing.assert_close(model.token_embed.weight, sd["backbone.text_embed.weight"])
    torch.testing.assert_close(model.image_pos_embed[0], sd["backbone.encoder.embed_positions.A.weight"][2:])
    torch.testing.assert_close(
        model.text_pos_embed[0], sd["backbone.encoder.embed_positions.B.weight"][2 : 2 + CFG.max_text_len]
    )
    # the size can be read from the tensors (the head count is given: width 64 is no released size)
    cfg = infer_config(sd, heads=CFG.heads, max_text_len=CFG.max_text_len)
    assert (
        cfg.width,
        cfg.ffn_dim,
        cfg.num_layers,
        cfg.num_shared_layers,
        cfg.embed_dim,
        cfg.vocab_size,
        cfg.image_size,
        cfg.patch_size,
    ) == (CFG.width, CFG.ffn_dim, 2, 2, CFG.embed_dim, 300, 32, 8)


def test_strict_reports_missing_unexpected_and_mismatched():
    sd = official_state_dict(CFG, seed=2)
    del sd["backbone.encoder.layers.1.self_attn.k_proj.B.bias"]
    sd["backbone.encoder.layers.0.self_attn.rel_pos.A.weight"] = torch.zeros(3)
    sd["some_new_head.weight"] = torch.zeros(3)
    sd["itc_vl_text_proj.fc.weight"] = torch.zeros(CFG.embed_dim + 1, CFG.width)
    _, report = convert_official_state_dict(sd, CFG)
    assert report.missing == ["layers.1.k_proj.language.bias", "text_proj.weight"]
    assert sorted(report.unexpected) == [
        "backbone.encoder.layers.0.self_attn.rel_pos.A.weight",
        "some_new_head.weight",
    ]
    assert len(report.mismatched) == 1 and "itc_vl_text_proj.fc.weight" in report.mismatched[0]
    assert not report.ok
    with pytest.raises(ValueError, match="missing") as err:
        load_official_checkpoint(sd, CFG)
    assert "some_new_head.weight" in str(err.value)
    model, report = load_official_checkpoint(
        sd, CFG, strict=False
    )  # loads what matches, keeps init elsewhere
    torch.testing.assert_close(
        model.layers[0].v_proj.vision.weight, sd["backbone.encoder.layers.0.self_attn.v_proj.A.weight"]
    )
    # a checkpoint for another image size
    with pytest.raises(ValueError, match="embed_positions.A.weight"):
        load_official_checkpoint(
            official_state_dict(CFG),
            get_config(
                "tiny", num_layers=2, num_shared_layers=2, vocab_size=300, max_text_len=12, image_size=64
            ),
        )
    with pytest.raises(ValueError, match="not an official M2-Encoder checkpoint"):
        infer_config({"foo": torch.zeros(1)})


def test_head_count_is_read_from_the_checkpoint_or_required():
    sd = official_state_dict(CFG, seed=3)  # width 64 with 4 heads: no tensor shape tells the heads
    with pytest.raises(ValueError, match=r"number of attention heads .*width 64.*heads="):
        infer_config(sd)
    with pytest.raises(ValueError, match="heads="):
        load_official_checkpoint(sd, None)
    # a Lightning checkpoint of the official code saves its config: the head count is read from it
    hparams = {"config": {"encoder_attention_heads": 4, "max_text_len": 12}}
    saved = {"state_dict": sd, "hyper_parameters": hparams}
    cfg = infer_config(saved)
    assert (cfg.heads, cfg.max_text_len) == (4, 12)
    model, report = load_official_checkpoint(saved, None)
    assert report.ok and model.cfg.heads == 4
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 4 heads, as the official forward pass: not a 1-head model
        want = official_infer(sd, CFG, ids=ids, mask=torch.ones_like(ids))
        torch.testing.assert_close(model.encode_text(ids), want, atol=2e-5, rtol=1e-4)
    assert infer_config({**saved, "hyper_parameters": {"config": {"beit_version": "large"}}}).heads == 16
    # the released sizes: the official configs' head counts
    with torch.device("meta"):
        base = official_state_dict(get_config("base", num_layers=1, num_shared_layers=1), seed=0)
    assert infer_config(base).heads == 12


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_sixteen_bit_checkpoints_load_into_float32_unless_asked(tmp_path, stored):
    sd = {k: v.to(stored) for k, v in official_state_dict(CFG, seed=4).items()}
    model, report = load_official_checkpoint(sd, CFG)
    assert report.ok and {p.dtype for p in model.parameters()} == {torch.float32}
    # the values are the stored ones, widened exactly
    assert torch.equal(model.token_embed.weight, sd["backbone.text_embed.weight"].float())
    kept, _ = load_official_checkpoint(sd, CFG, dtype="checkpoint")
    assert {p.dtype for p in kept.parameters()} == {stored}
    half, _ = load_official_checkpoint(sd, CFG, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype"):
        load_official_checkpoint(sd, CFG, dtype=torch.int8)
    # the evaluation loader too
    path = tmp_path / "half.ckpt"
    torch.save({"state_dict": sd}, path)
    assert {p.dtype for p in load_model(str(path), CFG).parameters()} == {torch.float32}
