"""Models: autoencoder, style encoder/aggregation, denoiser, the combined STEDM model (tiny, CPU)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from stedm.config import StedmConfig
from stedm.errors import StedmError
from stedm.models import (
    DenoiserConfig,
    StedmModel,
    StedmModelConfig,
    StyleEncoder,
    build_aggregation,
    build_autoencoder,
    compute_scaling_factor,
    decode,
    diffusion_loss,
    encode,
    get_scaling_factor,
    layout_to_onehot,
    load_autoencoder,
    make_noise_scheduler,
    resize_layout,
    set_scaling_factor,
)
from stedm.models.autoencoder import autoencoder_loss

torch.set_num_threads(2)

# A denoiser small enough for many tests: two levels, 16 x 16 latents, 32 px style tiles.
TEST_DENOISER = DenoiserConfig(
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_heads=2,
    cross_attention_levels=(1,),
    norm_num_groups=8,
)
B, N, LAT, STYLE_PX = 2, 3, 16, 32


def make_config(
    aggregation: str = "linear", injection: str = "embedding", **kw
) -> StedmModelConfig:
    return StedmModelConfig.from_preset(
        "tiny",
        aggregation=aggregation,
        style_injection=injection,
        latent_size=LAT,
        n_style=N,
        style_size=STYLE_PX,
        style_dim=32,
        cnn_channels=(8, 16),
        denoiser=TEST_DENOISER,
        **kw,
    )


def make_model(*args, seed: int = 0, **kw) -> StedmModel:
    torch.manual_seed(seed)
    return StedmModel(config=make_config(*args, **kw))


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, LAT, LAT, generator=g)
    t = torch.tensor([10, 700])
    layout = torch.zeros(B, 2, LAT, LAT)
    layout[:, 0, :, : LAT // 2] = 1
    layout[:, 1, :, LAT // 2 :] = 1
    style = torch.rand(B, N, 3, STYLE_PX, STYLE_PX, generator=g) * 2 - 1
    return z, t, layout, style


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], p) for k, p in module.named_parameters())


# ---- training updates every part -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("aggregation", "injection"),
    [("linear", "embedding"), ("attention", "embedding"), ("linear", "cross_attention")],
)
def test_adamw_step_updates_denoiser_encoder_and_aggregation(aggregation, injection):
    model = make_model(aggregation, injection)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters()}
    parts = {"denoiser": model.denoiser, "encoder": model.style_encoder, "agg": model.aggregation}
    before = {name: snapshot(m) for name, m in parts.items()}
    z, _, layout, style = inputs()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    loss = diffusion_loss(
        model, make_noise_scheduler(), z, layout, style, generator=torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.style_encoder.parameters()
    )
    opt.step()
    assert {name: changed(before[name], m) for name, m in parts.items()} == {
        "denoiser": True,
        "encoder": True,
        "agg": True,
    }


def test_freeze_style_keeps_encoder_and_aggregation_fixed():
    model = make_model("linear", freeze_style=True)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.denoiser.parameters()}
    before_enc, before_agg = snapshot(model.style_encoder), snapshot(model.aggregation)
    before_den = snapshot(model.denoiser)
    z, _, layout, style = inputs()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    diffusion_loss(model, make_noise_scheduler(), z, layout, style).backward()
    opt.step()
    assert not changed(before_enc, model.style_encoder)
    assert not changed(before_agg, model.aggregation)
    assert changed(before_den, model.denoiser)


# ---- the style matters, the null style is distinct ----------------------------------------------
@pytest.mark.parametrize("injection", ["embedding", "cross_attention"])
def test_style_changes_output_and_backward_runs(injection):
    model = make_model("mean", injection)
    z, t, layout, style = inputs(0)
    other = inputs(1)[3] * 0.5 - 0.3  # different tiles and a different colour balance
    out_a = model(z, t, layout, style)
    out_b = model(z, t, layout, other)
    assert out_a.shape == z.shape
    assert (out_a - out_b).abs().max() > 1e-4
    out_a.square().mean().backward()
    assert model.style_encoder.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("null_style", ["constant_image", "learned"])
@pytest.mark.parametrize("injection", ["embedding", "cross_attention"])
def test_null_style_is_distinct_and_drop_mask_selects_it(null_style, injection):
    model = make_model("linear", injection, null_style=null_style)
    _, _, _, style = inputs()
    real = model.encode_style(style)
    null = model.null_cond(B)
    assert null.shape == real.shape
    assert (real - null).flatten(1).abs().amax(dim=1).min() > 1e-4  # differs for every sample
    mixed = model.encode_style(style, drop_mask=torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], null[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], real[1], atol=1e-5, rtol=1e-5)


def test_constant_image_null_is_encoder_output_for_minus_two():
    model = make_model("mean")
    images = torch.full((B, N, 3, STYLE_PX, STYLE_PX), -2.0)
    torch.testing.assert_close(model.null_cond(B), model.aggregation(model.style_encoder(images)))


def test_forward_without_style_uses_null():
    model = make_model("attention")
    z, t, layout, _ = inputs()
    torch.testing.assert_close(model(z, t, layout), model(z, t, layout, cond=model.null_cond(B)))


# ---- aggregation: order invariance -------------------------------------------------------------
@pytest.mark.parametrize(
    ("aggregation", "invariant"),
    [("mean", True), ("max", True), ("attention", True), ("linear", False)],
)
def test_aggregation_order_invariance(aggregation, invariant):
    model = make_model(aggregation)
    _, _, _, style = inputs()
    perm = torch.tensor([2, 0, 1])
    a, b = model.encode_style(style), model.encode_style(style[:, perm])
    assert torch.allclose(a, b, atol=1e-5) is invariant


def test_cross_attention_output_is_order_invariant_for_mean():
    model = make_model("mean", "cross_attention")
    z, t, layout, style = inputs()
    out = model(z, t, layout, style)
    out_perm = model(z, t, layout, style[:, torch.tensor([1, 2, 0])])
    torch.testing.assert_close(out, out_perm, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("injection", ["embedding", "cross_attention"])
def test_none_aggregation_ignores_style(injection):
    model = make_model("none", injection)
    assert model.style_encoder is None
    z, t, layout, style = inputs()
    out = model(z, t, layout, style)
    assert torch.equal(out, model(z, t, layout, -style))
    assert torch.equal(out, model(z, t, layout))
    assert model.encode_style(style).abs().sum() == 0


def test_aggregation_blocks_shapes_and_linear_needs_fixed_n():
    vectors = torch.randn(2, 5, 8)
    for name in ("none", "mean", "max", "linear", "attention"):
        assert build_aggregation(name, 8, 5, heads=2)(vectors).shape == (2, 8)
    torch.testing.assert_close(build_aggregation("max", 8, 5)(vectors), vectors.amax(1))
    assert build_aggregation("none", 8, 5)(vectors).abs().sum() == 0
    with pytest.raises(StedmError, match="n=5"):
        build_aggregation("linear", 8, 5)(vectors[:, :3])
    assert build_aggregation("attention", 8, 5, heads=2)(vectors[:, :3]).shape == (2, 8)


# ---- save / load -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("injection", "null_style"), [("embedding", "constant_image"), ("cross_attention", "learned")]
)
def test_save_load_roundtrip_is_bitwise(tmp_path, injection, null_style):
    model = make_model("attention", injection, null_style=null_style).eval()
    z, t, layout, style = inputs()
    model.save_pretrained(tmp_path / "m")
    loaded = StedmModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model(z, t, layout, style), loaded(z, t, layout, style))
        assert torch.equal(model.null_cond(B), loaded.null_cond(B))


def test_loading_into_a_different_config_fails_loudly(tmp_path):
    model = make_model("linear")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(StedmError, match=r"aggregation: 'linear' vs 'mean'"):
        StedmModel.from_pretrained(tmp_path / "m", config=make_config("mean"))
    with pytest.raises(StedmError, match=r"unexpected keys \[aggregation\.mlp"):
        make_model("mean").load_weights(tmp_path / "m")


def test_tampered_config_json_fails(tmp_path):
    make_model("linear").save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    original = json.loads(cfg_file.read_text())
    for change, pattern in [
        ({"style_dim": 64}, r"shape mismatches.*aggregation\.mlp\.1\.weight"),
        ({"aggregation": "max"}, r"unexpected keys \[aggregation\.mlp"),
        ({"aggregation": "sum"}, r"aggregation='sum'; allowed"),
        ({"extra_key": 1}, r"unknown keys \['extra_key'\]"),
    ]:
        cfg_file.write_text(json.dumps({**original, **change}))
        with pytest.raises(StedmError, match=pattern):
            StedmModel.from_pretrained(tmp_path / "m")


def test_missing_weight_fails(tmp_path):
    make_model("mean").save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = load_file(weights)
    key = "denoiser.unet.conv_in.weight"
    del state[key]
    save_file(state, weights)
    with pytest.raises(StedmError, match=rf"missing keys \[{key}\]"):
        StedmModel.from_pretrained(tmp_path / "m")
    with pytest.raises(StedmError, match="no config.json"):
        StedmModel.from_pretrained(tmp_path / "absent")


def test_config_json_roundtrip_and_workflow_mapping():
    cfg = make_config("attention", "cross_attention", null_style="learned")
    assert StedmModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    wf = StedmModelConfig.from_workflow(
        StedmConfig(), latent_channels=4, latent_size=32, n_layout_channels=2
    )
    assert (wf.aggregation, wf.style_encoder, wf.n_style, wf.style_dim) == ("linear", "cnn", 4, 128)
    none = StedmModelConfig.from_workflow(
        {**StedmConfig().__dict__, "style_sampling": "none"},
        latent_channels=4,
        latent_size=32,
        n_layout_channels=2,
    )
    assert none.aggregation == "none"
    with pytest.raises(StedmError, match="n_layout_channels=2"):
        make_config(n_layout_channels=3)


# ---- style encoder backbones -------------------------------------------------------------------
def test_torchvision_style_encoder_loads_local_weights_strictly(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(reference.state_dict(), path)  # includes the 1000-class fc, which is dropped
    enc = StyleEncoder(backbone="resnet18", dim=16, weights_path=path)
    assert torch.equal(enc.backbone.conv1.weight, reference.conv1.weight)
    assert enc(torch.zeros(1, 2, 3, 32, 32)).shape == (1, 2, 16)
    state = reference.state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(
        StedmError, match=r"missing \['layer1\.0\.conv1\.weight'\].*unexpected \['extra\.weight'\]"
    ):
        StyleEncoder(backbone="resnet18", dim=16, weights_path=path)
    with pytest.raises(StedmError, match="not found"):
        StyleEncoder(backbone="resnet18", dim=16, weights_path=tmp_path / "absent.pt")


def test_cnn_encoder_responds_to_colour():
    torch.manual_seed(0)
    enc = StyleEncoder(backbone="cnn", dim=8, cnn_channels=(8, 16))
    pink = torch.zeros(1, 1, 3, 32, 32) + torch.tensor([0.8, 0.2, 0.6]).view(1, 1, 3, 1, 1)
    blue = torch.zeros(1, 1, 3, 32, 32) + torch.tensor([0.2, 0.3, 0.8]).view(1, 1, 3, 1, 1)
    assert (enc(pink) - enc(blue)).abs().max() > 1e-3


# ---- layout ------------------------------------------------------------------------------------
def test_layout_to_onehot_binary_classes_and_ignore():
    labels = torch.tensor([[[0, 1, 2, 255]]], dtype=torch.uint8)  # (1, 1, 4)
    binary = layout_to_onehot(labels, mode="binary", foreground_indices=(2,), n_classes=3)
    assert binary.dtype == torch.float32
    assert binary[0, :, 0].T.tolist() == [[1, 0], [1, 0], [0, 1], [0, 0]]
    classes = layout_to_onehot(labels, mode="classes", foreground_indices=(2,), n_classes=3)
    assert classes[0, :, 0].T.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(StedmError, match=r"label values \[7\]"):
        layout_to_onehot(
            torch.tensor([[[7]]]), mode="classes", foreground_indices=(2,), n_classes=3
        )
    fine = torch.zeros(1, 2, 8, 8)
    fine[:, 1, :, :2] = 1  # a 2 px wide foreground strip
    fine[:, 0, :, 2:] = 1
    coarse = resize_layout(fine, (2, 2))
    assert coarse[0, 1].tolist() == [[0.5, 0.0], [0.5, 0.0]]
    assert resize_layout(fine, (2, 2), mode="nearest").sum(1).eq(1).all()


def test_model_resizes_image_resolution_layout():
    model = make_model("mean")
    z, t, layout, style = inputs()
    full = layout.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    torch.testing.assert_close(model(z, t, full, style), model(z, t, layout, style))


# ---- autoencoder -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_tiny_autoencoder_shapes_scaling_and_roundtrip(tmp_path, kind):
    torch.manual_seed(0)
    ae = build_autoencoder(kind, "tiny").eval()
    assert 0.5e6 < sum(p.numel() for p in ae.parameters()) < 1.5e6
    images = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        raw = encode(ae, images, scaled=False)
        assert raw.shape == (1, 4, 32, 32)
        factor = compute_scaling_factor(raw)
        assert factor == pytest.approx(1.0 / raw.std().item(), rel=1e-6)
        set_scaling_factor(ae, factor)
        scaled = encode(ae, images)
        torch.testing.assert_close(scaled, raw * factor)
        assert scaled.std().item() == pytest.approx(1.0, rel=1e-4)
        recon = decode(ae, scaled)
        assert recon.shape == (1, 3, 128, 128) and recon.abs().max() <= 1.0
        torch.testing.assert_close(recon, decode(ae, raw, scaled=False))
    ae.save_pretrained(tmp_path / "ae")
    loaded = load_autoencoder(tmp_path / "ae")
    assert get_scaling_factor(loaded) == pytest.approx(factor)
    with torch.no_grad():
        assert torch.equal(encode(loaded, images), scaled)
    ae.train()
    loss, parts = autoencoder_loss(ae, images, kl_weight=1e-6)
    loss.backward()
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert set(parts) == {"loss", "rec_l1", "kl" if kind == "kl" else "commit"}


def test_load_autoencoder_errors(tmp_path):
    with pytest.raises(StedmError, match="not found"):
        load_autoencoder(tmp_path / "absent")
    ae = build_autoencoder("kl", "tiny")
    ae.save_pretrained(tmp_path / "ae")
    cfg_file = tmp_path / "ae" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "block_out_channels": [32, 64, 64, 64]}))
    with pytest.raises(StedmError, match="f=8"):
        load_autoencoder(tmp_path / "ae")
    cfg_file.write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(StedmError, match="UNet2DModel"):
        load_autoencoder(tmp_path / "ae")


# ---- noise schedule ----------------------------------------------------------------------------
def test_noise_schedule_is_ldm_linear():
    expected = np.linspace(np.sqrt(0.0015), np.sqrt(0.0205), 1000) ** 2
    for kind in ("ddpm", "ddim"):
        sched = make_noise_scheduler(kind)
        assert sched.config.prediction_type == "epsilon"
        np.testing.assert_allclose(sched.betas.double().numpy(), expected, rtol=1e-5, atol=1e-9)
    alphas_cumprod = np.cumprod(1 - expected)
    np.testing.assert_allclose(
        make_noise_scheduler().alphas_cumprod.double().numpy(), alphas_cumprod, rtol=1e-4
    )


def test_deepcopy_for_ema():
    model = make_model("linear")
    ema = copy.deepcopy(model)
    z, t, layout, style = inputs()
    assert torch.equal(model(z, t, layout, style), ema(z, t, layout, style))
