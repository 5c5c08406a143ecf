"""Synthesis: style-query table, CFG sampling, sharded generation + merge, user mode.

Everything runs on tiny stores (32 px tiles) with a randomly initialised tiny model and
autoencoder saved like `train-stedm` saves them: sampling is a deterministic function of the
weights, so exactness, guidance algebra and layout bookkeeping are testable without training.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import zarr
from diffusers import AutoencoderKL
from PIL import Image
from stores import write_store

from stedm.cli import main
from stedm.config import load_config
from stedm.data.tiff import write_pyramidal_tiff
from stedm.diffusion.data import layout_onehot
from stedm.errors import StedmError
from stedm.io import sha256_file
from stedm.models.presets import DenoiserConfig, StedmModelConfig
from stedm.models.stedm import StedmModel
from stedm.synthesis.generate import generate_shard, load_generator, shard_rows
from stedm.synthesis.merge import merge_shards, write_preview
from stedm.synthesis.sampling import (
    SamplingSettings,
    guide,
    make_sampler,
    predict_eps,
    rescale_guidance,
    sample_latents,
    synthesize,
)
from stedm.synthesis.select import (
    StyleQuery,
    augment_layout,
    check_queries,
    read_queries,
    select_styles,
    write_queries,
)

TILE, N_STYLE = 32, 2
SPLITS = {
    "seed": 0,
    "budgets": {"2": ["b0", "b1"], "3": ["b0", "b1", "b2"]},
    "train_pool": ["b0", "b1", "b2"],
    "val": ["v0"],
    "test": ["t0"],
    "style_pool": ["p0", "p1", "p2"],
}
TILING = {"mpp": 1.0, "tile_size": TILE, "thumbnail_mpp": 4.0, "min_tissue_fraction": 0.5}


def make_config(**synthesis):
    return load_config(
        {
            "tracking": {"enabled": False},
            "stedm": {"style_sampling": "multi_patch", "n_style": N_STYLE},
            "synthesis": {"n_samples": 10, "batch_size": 3, "n_shards": 1, "steps": 3, **synthesis},
        }
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared 2-core box OpenMP
    spin-waits make 2-thread runs up to 50x slower; restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tile stores of every role, splits, and a saved tiny model + autoencoder."""
    tmp = tmp_path_factory.mktemp("syn")
    tiles = tmp / "tiles"
    for k, sid in enumerate(["b0", "b1", "b2", "v0", "t0"]):
        write_store(tiles / f"{sid}.zarr", sid, n=8, tile=TILE, seed=k)
    for k, sid in enumerate(["p0", "p1", "p2"]):
        write_store(tiles / f"{sid}.zarr", sid, n=6 + k, tile=TILE, seed=10 + k, labels=False)
    ae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TILE,
        mid_block_add_attention=False,
    )
    ae.save_pretrained(tmp / "ae")
    torch.manual_seed(0)
    model = StedmModel(
        config=StedmModelConfig.from_preset(
            "tiny",
            latent_size=TILE // 4,
            n_style=N_STYLE,
            style_size=TILE,
            style_dim=32,
            cnn_channels=(8, 16),
            denoiser=DenoiserConfig(
                block_out_channels=(16, 32, 32), attention_heads=2, norm_num_groups=8
            ),
        )
    )
    model.save_pretrained(tmp / "model")
    config = make_config()
    run = {
        "autoencoder": {
            "path": str(tmp / "ae"),
            "sha256": sha256_file(next((tmp / "ae").glob("*.safetensors"))),
        },
        "config": {
            "labels": config.section("labels"),
            "tiling": TILING,
            "stedm": config.section("stedm"),
            "seed": 0,
        },
    }
    (tmp / "model" / "stedm_run.json").write_text(json.dumps(run))
    (tmp / "splits.json").write_text(json.dumps(SPLITS))
    return tmp


def n_tiles(setup, slide):
    return zarr.open_group(str(setup / "tiles" / f"{slide}.zarr"), mode="r")["images"].shape[0]


# --------------------------------------------------------------------------- style-query table
@pytest.mark.parametrize("strategy", ["nearby", "multi_patch"])
def test_style_table_uses_only_style_pool_and_budget_layouts(setup, strategy):
    config = make_config(style_sampling=strategy, n_samples=40)
    model = setup / "model" if strategy == "multi_patch" else None  # its linear aggregation takes 2
    rows = select_styles(config, 2, SPLITS, setup / "tiles", model)
    again = select_styles(config, 2, SPLITS, setup / "tiles", model)
    assert rows == again and len(rows) == 40 and [r.sample_id for r in rows] == list(range(40))
    assert {r.style_slide for r in rows} <= set(SPLITS["style_pool"])
    assert len({r.style_slide for r in rows}) == 3  # every pool slide gets used over 40 rows
    assert {r.layout_slide for r in rows} <= {"b0", "b1"}
    want = 1 if strategy == "nearby" else N_STYLE
    for r in rows:
        tiles = r.style_tile_list
        assert r.strategy == strategy and len(tiles) == want
        assert all(0 <= t < n_tiles(setup, r.style_slide) for t in tiles) and len(
            set(tiles)
        ) == len(tiles)
        labels = zarr.open_group(str(setup / "tiles" / f"{r.layout_slide}.zarr"), mode="r")[
            "labels"
        ][r.layout_tile]
        assert r.layout_has_fg == int((labels == 2).any())
    assert len({r.seed for r in rows}) == 40
    # row i does not depend on how many rows are drawn, and the table round-trips through CSV
    assert (
        select_styles(
            make_config(style_sampling=strategy, n_samples=5), 2, SPLITS, setup / "tiles"
        )[:5]
        == rows[:5]
    )
    write_queries(setup / f"q-{strategy}.csv", rows)
    assert read_queries(setup / f"q-{strategy}.csv") == rows
    # another seed or budget gives another table
    assert (
        select_styles(
            make_config(style_sampling=strategy, n_samples=40), 3, SPLITS, setup / "tiles"
        )
        != rows
    )


def test_style_table_check_rejects_seen_slides(setup):
    rows = select_styles(make_config(), 2, SPLITS, setup / "tiles")
    for field, slide in [("style_slide", "v0"), ("style_slide", "b2"), ("layout_slide", "b2")]:
        bad = rows[:3] + [dataclasses.replace(rows[3], **{field: slide})]
        with pytest.raises(StedmError, match=slide):
            check_queries(bad, SPLITS, 2)
    # the linear aggregation only takes the set size it was trained on
    with pytest.raises(StedmError, match="n=2"):
        select_styles(make_config(n_style=3), 2, SPLITS, setup / "tiles", setup / "model")
    none = select_styles(
        load_config({"stedm": {"style_sampling": "none"}, "synthesis": {"n_samples": 4}}),
        2,
        SPLITS,
        setup / "tiles",
    )
    assert all(r.strategy == "none" and r.style_slide == "" and r.style_tiles == "" for r in none)


def test_layout_augmentation_is_exact_relabelling():
    label = np.random.default_rng(0).integers(0, 3, (TILE, TILE)).astype(np.uint8)
    label[:4] = 255
    base = StyleQuery(0, "b0", 0, 1, 1, 1, 0, 1.0, 0.0, 0.0, 0.0, 0.0, "p0", "0", "nearby", 1)
    assert np.array_equal(augment_layout(label, base), np.rot90(label[:, ::-1], 1))
    rot = dataclasses.replace(base, rot90=0, flip=0, affine=1, affine_rotate=90.0)
    assert np.array_equal(
        augment_layout(label, rot), np.rot90(label, 3)
    )  # +90° in image coordinates
    warped = augment_layout(
        label, dataclasses.replace(rot, affine_scale=1.13, affine_shear=15.0, affine_tx=0.07)
    )
    assert warped.dtype == np.uint8 and set(np.unique(warped)) <= {
        0,
        1,
        2,
        255,
    }  # nearest: no new values
    assert not np.array_equal(warped, np.rot90(label, 3))


# --------------------------------------------------------------------------- guidance algebra
def test_rescale_follows_textbook_formula():
    g = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g) * 0.5
    s, phi = 2.5, 0.7
    cfg = eps_u + s * (eps_c - eps_u)
    std_c = eps_c.reshape(3, -1).std(1).view(3, 1, 1, 1)
    std_cfg = cfg.reshape(3, -1).std(1).view(3, 1, 1, 1)
    expected = phi * cfg * std_c / std_cfg + (1 - phi) * cfg
    assert torch.allclose(guide(eps_c, eps_u, s, phi), expected, atol=1e-6)
    assert torch.allclose(guide(eps_c, eps_u, s, 0.0), cfg)
    official = rescale_guidance(cfg, eps_c, phi, official=True)
    per_column = (
        phi * cfg * eps_c.std((1, 2), keepdim=True) / cfg.std((1, 2), keepdim=True)
        + (1 - phi) * eps_c
    )
    assert torch.allclose(official, per_column, atol=1e-6) and not torch.allclose(
        official, expected
    )
    assert torch.allclose(
        guide(eps_c, eps_u, 1.0, phi), eps_c, atol=1e-6
    )  # s = 1: rescale is a no-op


@pytest.fixture(scope="module")
def gen(setup):
    return load_generator(setup / "model", device="cpu")


def batch_inputs(gen, b=3):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (b, TILE, TILE), generator=g).numpy().astype(np.uint8)
    style = torch.rand(b, N_STYLE, 3, TILE, TILE, generator=g) * 2 - 1
    return gen.onehot(labels), style


def test_batched_cfg_equals_two_unet_calls_and_scale_one_is_conditional(gen):
    layout, style = batch_inputs(gen)
    model = gen.model
    cond = model.encode_style(style)
    null = model.null_cond(3, n_style=N_STYLE, style_size=TILE)
    z = torch.randn(3, 4, TILE // 4, TILE // 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    batched = SamplingSettings(guidance_scale=2.0, guidance_rescale=0.7)
    separate = dataclasses.replace(batched, batched_cfg=False)
    with torch.no_grad():
        a = predict_eps(model, z, t, layout, cond, null, batched)
        b = predict_eps(model, z, t, layout, cond, null, separate)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5) and not torch.allclose(
        a, model(z, t.expand(3), layout, cond=cond), atol=1e-3
    )
    lat_a = sample_latents(model, z, layout, cond, null, dataclasses.replace(batched, steps=4))
    lat_b = sample_latents(model, z, layout, cond, null, dataclasses.replace(separate, steps=4))
    torch.testing.assert_close(lat_a, lat_b, rtol=1e-4, atol=1e-4)

    # guidance scale 1 = plain conditional sampling: one conditional UNet call per step
    one = SamplingSettings(steps=4, guidance_scale=1.0, guidance_rescale=0.7)
    calls = []
    original = model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["cond"].shape[0])
        return original(*args, **kwargs)

    model.forward = spy
    try:
        got = sample_latents(model, z, layout, cond, null, one)
    finally:
        del model.forward
    assert calls == [3] * 4
    scheduler, x = make_sampler("dpm_solver++", 4), z.clone()
    with torch.no_grad():
        for step in scheduler.timesteps:
            x = scheduler.step(
                model(x, step.reshape(1).expand(3), layout, cond=cond), step, x
            ).prev_sample
    assert torch.equal(got, x)


def test_ddim_paper_schedule_and_dpm_solver_both_sample(gen):
    ddim = make_sampler("ddim", 128)
    assert (
        len(ddim.timesteps) == 143 and ddim.timesteps[0] == 995 and ddim.timesteps[-1] == 1
    )  # as LDM
    layout, style = batch_inputs(gen, 2)
    for settings in (SamplingSettings("ddim", 128), SamplingSettings("dpm_solver++", 20)):
        images = synthesize(gen.model, gen.ae, layout, style, [1, 2], settings)
        assert images.shape == (2, TILE, TILE, 3) and images.dtype == torch.uint8
        assert images.float().std() > 1 and not torch.equal(
            images[0], images[1]
        )  # not constant, per seed
    a = synthesize(gen.model, gen.ae, layout, style, [1, 2], SamplingSettings(steps=3))
    b = synthesize(gen.model, gen.ae, layout[:1], style[:1], [1], SamplingSettings(steps=3))
    assert torch.allclose(
        a[:1].float(), b.float(), atol=1
    )  # a sample's noise comes from its own seed


# --------------------------------------------------------------------------- generation + merge
def test_shards_merge_bitwise_to_unsharded_output(setup, monkeypatch):
    tmp = setup / "gen"
    config = make_config(affine=True)
    write_queries(tmp / "q.csv", select_styles(config, 2, SPLITS, setup / "tiles", setup / "model"))
    assert [len(shard_rows(10, 3, 3, k)) for k in range(3)] == [3, 3, 4]  # whole micro-batches of 3

    layouts = []
    original = StedmModel.forward

    def spy(self, latents, t, layout, *args, **kwargs):
        layouts.append(layout[: len(layout) // 2].clone())  # batched CFG: [cond | uncond]
        return original(self, latents, t, layout, *args, **kwargs)

    monkeypatch.setattr(StedmModel, "forward", spy)
    generate_shard(
        config, 2, tmp / "q.csv", setup / "tiles", setup / "model", tmp / "one" / "shard~0.zarr"
    )
    monkeypatch.undo()
    sharded = dataclasses.replace(
        config, synthesis=dataclasses.replace(config.synthesis, n_shards=3)
    )
    for k in range(3):
        generate_shard(
            sharded,
            2,
            tmp / "q.csv",
            setup / "tiles",
            setup / "model",
            tmp / "three" / f"shard~{k}.zarr",
            k,
        )
    merge_shards([tmp / "one" / "shard~0.zarr"], tmp / "one.zarr")
    assert (
        main(
            [
                "merge-synthetic",
                "--shards",
                *[str(tmp / "three" / f"shard~{k}.zarr") for k in (2, 0, 1)],
                "--tiles-dir",
                str(setup / "tiles"),
                "--out",
                str(tmp / "three.zarr"),
                "--preview",
                str(tmp / "preview.png"),
            ]
        )
        == 0
    )
    one, three = (
        zarr.open_group(str(tmp / "one.zarr"), mode="r"),
        zarr.open_group(str(tmp / "three.zarr"), mode="r"),
    )
    assert sorted(one.array_keys()) == sorted(three.array_keys())
    for name in one.array_keys():
        assert np.array_equal(one[name][:], three[name][:]), name
    assert dict(one.attrs) == dict(three.attrs) and "shard" not in one.attrs
    assert one["images"].shape == (10, TILE, TILE, 3) and one["images"][:].std() > 1
    assert list(one["style_slide"][:3]) == [r.style_slide for r in read_queries(tmp / "q.csv")[:3]]
    assert one.attrs["sampling"]["sampler"] == "dpm_solver++" and one.attrs["class_names"] == [
        "Background",
        "Stroma",
        "Tumor",
    ]

    # the saved label is the augmented layout, and exactly the one-hot the model was conditioned on
    rows = read_queries(tmp / "q.csv")
    assert any(r.affine for r in rows) and any(r.rot90 or r.flip for r in rows)
    labels = one["labels"][:]
    for r in rows:
        raw = zarr.open_group(str(setup / "tiles" / f"{r.layout_slide}.zarr"), mode="r")["labels"][
            r.layout_tile
        ]
        assert np.array_equal(labels[r.sample_id], augment_layout(raw, r))
    fed = torch.cat(layouts[:: config.synthesis.steps])  # first UNet call of each micro-batch
    expected = np.stack([layout_onehot(x, "binary", (2,), 3, 255) for x in labels])
    assert torch.equal(fed, torch.from_numpy(expected))

    # same seed, new process-level run: identical; a preview with one row per sample
    generate_shard(config, 2, tmp / "q.csv", setup / "tiles", setup / "model", tmp / "again.zarr")
    assert np.array_equal(
        zarr.open_group(str(tmp / "again.zarr"), mode="r")["images"][:], one["images"][:]
    )
    assert Image.open(tmp / "preview.png").size[1] > 8 * TILE
    with pytest.raises(StedmError, match="shards"):
        merge_shards(
            [tmp / "three" / "shard~0.zarr", tmp / "three" / "shard~1.zarr"], tmp / "bad.zarr"
        )
    assert not (tmp / "bad.zarr").exists()


def test_cli_select_and_generate_workflow_mode(setup, tmp_path):
    cfg = json.dumps(
        {
            "stedm": {"style_sampling": "nearby", "n_style": N_STYLE},
            "synthesis": {"n_samples": 2, "steps": 2},
        }
    )
    assert (
        main(
            [
                "select-styles",
                "--budget",
                "2",
                "--splits",
                str(setup / "splits.json"),
                "--tiles-dir",
                str(setup / "tiles"),
                "--config",
                cfg,
                "--out",
                str(tmp_path / "q.csv"),
            ]
        )
        == 0
    )
    assert all(len(r.style_tile_list) == 1 for r in read_queries(tmp_path / "q.csv"))
    # nearby sets (1 tile) cannot feed the model's linear aggregation over 2 tiles: named error
    assert (
        main(
            [
                "select-styles",
                "--budget",
                "2",
                "--splits",
                str(setup / "splits.json"),
                "--tiles-dir",
                str(setup / "tiles"),
                "--model",
                str(setup / "model"),
                "--config",
                cfg,
                "--out",
                str(tmp_path / "q2.csv"),
            ]
        )
        == 1
    )
    rows = select_styles(make_config(n_samples=2), 2, SPLITS, setup / "tiles")
    write_queries(tmp_path / "q3.csv", rows)
    for shard in (0, 1):  # 2 rows = 1 micro-batch of 16 over 2 shards: shard 0 is empty
        assert (
            main(
                [
                    "generate",
                    "--budget",
                    "2",
                    "--queries",
                    str(tmp_path / "q3.csv"),
                    "--tiles-dir",
                    str(setup / "tiles"),
                    "--model",
                    str(setup / "model"),
                    "--config",
                    cfg,
                    "--device",
                    "cpu",
                    "--shard",
                    str(shard),
                    "--out",
                    str(tmp_path / f"s{shard}.zarr"),
                ]
            )
            == 0
        )
    assert zarr.open_group(str(tmp_path / "s0.zarr"), mode="r")["images"].shape[0] == 0
    merge_shards([tmp_path / "s0.zarr", tmp_path / "s1.zarr"], tmp_path / "s.zarr")
    write_preview(tmp_path / "s.zarr", setup / "tiles", tmp_path / "p.png")
    merged = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert merged["images"].shape[0] == 2 and list(merged["sample_id"][:]) == [0, 1]


# --------------------------------------------------------------------------- user mode
def test_user_mode_layout_png_and_tiff_style_slide(setup, tmp_path):
    rng = np.random.default_rng(0)
    rgb = np.full((384, 384, 3), (242, 240, 243), np.uint8)
    rgb[32:352, 32:352] = np.clip(
        np.array([200, 110, 170]) + rng.integers(-40, 40, (320, 320, 3)), 0, 255
    )
    write_pyramidal_tiff(tmp_path / "style.tiff", rgb, 0.5, n_levels=2, tile=128)
    label = np.ones((24, 40), np.uint8)
    label[:, 20:] = 2
    Image.fromarray(label).save(tmp_path / "layout.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--model",
                str(setup / "model"),
                "--layout",
                str(tmp_path / "layout.png"),
                "--style-slide",
                str(tmp_path / "style.tiff"),
                "--n",
                "3",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    images = sorted(out.glob("image_*.png"))
    assert len(images) == 3 and all(Image.open(p).size == (40, 24) for p in images)
    assert np.array_equal(np.asarray(Image.open(out / "layout.png")), label)
    info = json.loads((out / "generation.json").read_text())
    assert info["strategy"] == "multi_patch" and all(
        len(s["style_tiles"]) == N_STYLE for s in info["samples"]
    )
    assert Image.open(out / "style_000.png").size == (N_STYLE * TILE, TILE)
    # an RGB picture is not a layout: named error, nothing written
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    assert (
        main(
            [
                "generate",
                "--model",
                str(setup / "model"),
                "--layout",
                str(tmp_path / "rgb.png"),
                "--style-slide",
                str(tmp_path / "style.tiff"),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 1
    )
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_samplers_recover_the_data_from_an_oracle_model(sampler, prediction):
    """With the exact ε / v of a known latent, both samplers land on it: the schedules, the
    timesteps and the prediction type agree between training and sampling."""
    from stedm.models.denoiser import make_noise_scheduler
    from stedm.synthesis.sampling import make_sampler

    ac = make_noise_scheduler("ddpm").alphas_cumprod
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    s = make_sampler(sampler, 50 if sampler == "ddim" else 20, prediction)
    x = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    for t in s.timesteps:
        a = ac[int(t)]
        eps = (x - a.sqrt() * z0) / (1 - a).sqrt()
        out = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0
        x = s.step(out, t, x).prev_sample
    # DDIM stops at alpha_bar[0] (LDM's set_alpha_to_one=False): a little noise is left
    assert (x - z0).abs().max() < (0.2 if sampler == "ddim" else 1e-4)
