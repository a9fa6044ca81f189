import math

import pytest
import torch
import torch.nn.functional as F

from m2model.config import M2Config, count_parameters, get_config
from m2model.modeling import M2Encoder


def _model(**kw):
    torch.manual_seed(0)
    return M2Encoder(get_config("tiny", **kw))


def _inputs(cfg, n=3, length=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    ids = torch.randint(0, cfg.vocab_size, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2 :] = 0
    return images, ids, mask


def test_sizes_and_parameter_counts():
    sizes = {
        "base": (768, 12, 3072, 9, 3, 768),
        "large": (1024, 16, 4096, 21, 3, 1024),
        "huge": (4096, 32, 16384, 21, 3, 1024),
    }
    for name, alias in (("base", "0.4B"), ("large", "1B"), ("huge", "10B")):
        c = get_config(alias)
        assert (c.width, c.heads, c.ffn_dim, c.num_layers, c.num_shared_layers, c.embed_dim) == sizes[name]
        assert (c.image_size, c.patch_size, c.max_text_len, c.vocab_size) == (224, 16, 52, 115244)
        assert get_config(name) == c
    for cfg in (
        get_config("tiny"),
        get_config("tiny", num_shared_layers=0, vocab_size=500),
        get_config("tiny", image_size=64, max_text_len=20),
    ):
        with torch.device("meta"):
            model = M2Encoder(cfg)
        assert count_parameters(cfg)["total"] == sum(p.numel() for p in model.parameters())
    with torch.device("meta"):  # the real base size, without allocating it
        base = M2Encoder(get_config("base"))
    assert count_parameters(get_config("base"))["total"] == sum(p.numel() for p in base.parameters())
    with pytest.raises(ValueError, match="unknown M2-Encoder size"):
        get_config("giant")
    with pytest.raises(ValueError, match="unknown M2Config fields"):
        get_config("tiny", widht=3)
    with pytest.raises(ValueError, match="divisible"):
        M2Config(width=100, heads=12)


def test_shapes_dtypes_norms_and_logit_scale():
    model = _model()
    cfg = model.cfg
    images, ids, mask = _inputs(cfg)
    img, txt, scale = model(images, ids, mask)
    assert img.shape == (3, cfg.embed_dim) and txt.shape == (3, cfg.embed_dim)
    assert img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert scale.ndim == 0 and math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)  # already exponentiated
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        # in training clamped to 100 (open_clip's bound); at inference the released scale as it is, as the
        # official code computes logit_scale.exp() * img @ txt.T
        assert model.train()(images, ids, mask)[2].item() == 100.0
        assert math.isclose(model.eval()(images, ids, mask)[2].item(), math.exp(10.0), rel_tol=1e-6)
    # encoders agree with forward, texts default to an all-ones mask
    torch.testing.assert_close(model.encode_text(ids[1:]), model.encode_text(ids[1:], mask[1:]))
    # different images/texts get different embeddings
    assert (img[0] - img[1]).abs().max() > 1e-3 and (txt[1] - txt[2]).abs().max() > 1e-3


def test_padding_does_not_change_text_embedding():
    model = _model().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7), generator=g)
    short = model.encode_text(ids, torch.ones_like(ids))
    for pad_len in (3, 20):
        pad = torch.randint(0, model.cfg.vocab_size, (2, pad_len), generator=g)  # pad values must not matter
        long_ids = torch.cat([ids, pad], 1)
        long_mask = torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)
        torch.testing.assert_close(model.encode_text(long_ids, long_mask), short, atol=2e-6, rtol=1e-5)
    # a text encodes the same alone and in a batch with others of other lengths
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    both = model.encode_text(ids, mask)
    torch.testing.assert_close(both[1:], model.encode_text(ids[1:, :4]), atol=2e-6, rtol=1e-5)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _nonzero(g):
    return g is not None and g.abs().sum().item() > 0


def test_image_path_never_touches_language_experts_and_vice_versa():
    model = _model()
    images, ids, mask = _inputs(model.cfg)
    model.encode_image(images).pow(2).sum().backward()
    grads = _grads(model)
    language_only = ("token_embed", "text_pos_embed", "text_proj")
    for name, g in grads.items():
        if ".language." in name or name.startswith(language_only):
            assert g is None or g.abs().sum() == 0, name
        elif ".vision." in name or ".shared." in name or name.startswith(("patch_embed", "image_proj")):
            assert _nonzero(g), name
    assert any(".vision." in n for n in grads) and any(".language." in n for n in grads)

    model.zero_grad(set_to_none=True)
    model.encode_text(ids, mask).pow(2).sum().backward()
    vision_only = ("patch_embed", "cls_token", "image_pos_embed", "image_proj")
    for name, g in _grads(model).items():
        if ".vision." in name or name.startswith(vision_only):
            assert g is None or g.abs().sum() == 0, name
        elif ".language." in name or ".shared." in name or name.startswith(("token_embed", "text_proj")):
            assert _nonzero(g), name


def test_magneto_init_scaling():
    cfg = get_config("tiny", width=128, heads=4, ffn_dim=512, num_layers=3, num_shared_layers=2)
    torch.manual_seed(0)
    model = M2Encoder(cfg)
    for stack, n in ((model.layers, 3), (model.shared_layers, 2)):
        gamma = math.sqrt(math.log(2 * n))
        expert = "vision" if stack is model.layers else "shared"
        blk = stack[0]
        q, v = getattr(blk.q_proj, expert).weight, getattr(blk.v_proj, expert).weight
        o, k = getattr(blk.out_proj, expert).weight, getattr(blk.k_proj, expert).weight
        assert abs(v.std() / q.std() - gamma) < 0.05 * gamma
        assert abs(o.std() / k.std() - gamma) < 0.05 * gamma
    # re-initialising does not compound the scaling
    std = model.layers[0].v_proj.vision.weight.std().item()
    model.reset_parameters()
    assert abs(model.layers[0].v_proj.vision.weight.std().item() - std) < 0.05 * std
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_grad_checkpointing_gives_same_gradients():
    images, ids, mask = _inputs(get_config("tiny"))
    results = []
    for ckpt in (False, True):
        model = _model(grad_checkpointing=ckpt)
        img, txt, s = model(images, ids, mask)
        (img @ txt.T * s).logsumexp(1).sum().backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model = _model()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    assert results[0].keys() == results[1].keys()
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_and_bf16_weights():
    model = _model().eval()
    images, ids, mask = _inputs(model.cfg)
    with torch.no_grad():
        ref = model(images, ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, ids, mask)
        for a, b in zip(out[:2], ref[:2]):
            assert torch.isfinite(a).all()
            assert (a.float() - b).abs().max() < 0.1
        model16 = _model().to(torch.bfloat16).eval()
        img16 = model16.encode_image(images)
        assert img16.dtype == torch.bfloat16 and (img16.float() - ref[0]).abs().max() < 0.1


def test_training_with_dropout_runs_and_is_stochastic():
    model = _model(dropout=0.2).train()
    images, ids, mask = _inputs(model.cfg)
    a = model.encode_image(images)
    b = model.encode_image(images)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.encode_image(images), model.encode_image(images))


def test_bad_inputs_raise_clear_errors():
    model = _model()
    cfg = model.cfg
    images, ids, mask = _inputs(cfg)
    with pytest.raises(ValueError, match=r"shape \[N, 3, 32, 32\]"):
        model.encode_image(torch.zeros(2, 3, 16, 16))
    with pytest.raises(TypeError, match="float"):
        model.encode_image(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="model is on cpu"):
        model.encode_image(images.to("meta"))
    with pytest.raises(ValueError, match="empty batch"):
        model.encode_image(torch.zeros(0, 3, 32, 32))
    with pytest.raises(TypeError, match="int64"):
        model.encode_text(ids.float(), mask)
    with pytest.raises(ValueError, match="shape of input_ids"):
        model.encode_text(ids, mask[:, :-1])
    with pytest.raises(ValueError, match=r"must lie in \[0, 21128\)"):
        model.encode_text(ids + cfg.vocab_size, mask)
    with pytest.raises(ValueError, match="exceeds max_text_len"):
        model.encode_text(torch.zeros(1, cfg.max_text_len + 1, dtype=torch.long))
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match="no tokens"):
        model.encode_text(ids, empty)
    with pytest.raises(ValueError, match="only 0"):
        model.encode_text(ids, mask * 2)


def _dense_clip_loss(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_forward_backward_with_dense_clip_loss():
    model = _model()
    images, ids, mask = _inputs(model.cfg, n=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = _dense_clip_loss(*model(images, ids, mask))
        opt.zero_grad()
        loss.backward()
        assert model.logit_scale.grad is not None and torch.isfinite(model.logit_scale.grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the model learns to match its 4 pairs


def test_forward_backward_with_m2kernels_cliploss():
    m2kernels = pytest.importorskip("m2kernels")
    if not hasattr(m2kernels, "ClipLoss"):
        pytest.skip("m2kernels.ClipLoss not available in this checkout")
    model = _model()
    images, ids, mask = _inputs(model.cfg, n=5)
    img, txt, scale = model(images, ids, mask)
    loss = m2kernels.ClipLoss()(img, txt, scale)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, _dense_clip_loss(img, txt, scale), atol=1e-5, rtol=1e-5)
    loss.backward()
    ref_model = _model()
    _dense_clip_loss(*ref_model(images, ids, mask)).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        if q.grad is None:
            assert p.grad is None or p.grad.abs().sum() == 0, n
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_apex_fused_layernorm_is_used_when_apex_imports(monkeypatch):
    """A stand-in `apex.normalization.FusedLayerNorm` is picked up; names and outputs stay identical."""
    import importlib.util
    import sys
    import types

    import m2model.modeling as plain

    class FusedLayerNorm(torch.nn.LayerNorm):
        pass

    apex = types.ModuleType("apex")
    apex.normalization = types.SimpleNamespace(FusedLayerNorm=FusedLayerNorm)
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.normalization", apex.normalization)
    spec = importlib.util.spec_from_file_location("m2model._modeling_with_apex", plain.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAS_APEX and not plain.HAS_APEX
    cfg = get_config("tiny")
    fused, ref = mod.M2Encoder(cfg), plain.M2Encoder(cfg)
    norms = [m for m in fused.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, FusedLayerNorm) for m in norms)
    off = mod.M2Encoder(get_config("tiny", use_apex_layernorm=False))
    assert not any(isinstance(m, FusedLayerNorm) for m in off.modules())
    fused.load_state_dict(ref.state_dict())  # same parameter names
    images, ids, mask = _inputs(cfg)
    for a, b in zip(fused(images, ids, mask), ref(images, ids, mask)):
        torch.testing.assert_close(a, b)
