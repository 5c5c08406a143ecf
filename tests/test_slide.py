"""`stedm.data.slide`: µm/px reads from generated pyramidal TIFFs, checked against the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stedm.data.slide import open_slide
from stedm.data.tiff import build_pyramid, write_pyramidal_tiff
from stedm.errors import StedmError

W, H, MPP = 1536, 1024, 0.25


def _image(seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: every pixel distinct enough to catch offsets."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 200 // W, yy * 200 // H, (xx + yy) % 256], axis=-1)
    return np.clip(rgb + rng.integers(0, 50, (H, W, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("slide") / "gradient.tiff"
    rgb = _image()
    write_pyramidal_tiff(path, rgb, MPP, n_levels=3, compression="zlib")
    return path, rgb


def test_metadata(slide_file):
    path, _ = slide_file
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(MPP)
        assert slide.dimensions == (W, H)
        assert slide.path == path
        assert slide.size_at(1.0) == (384, 256)
    with open_slide(path, mpp_override=0.3) as slide:
        assert slide.mpp == 0.3


def test_level_choice_never_upsamples(slide_file):
    path, _ = slide_file
    with open_slide(path) as slide:  # levels at 0.25, 0.5, 1.0 µm/px
        assert slide.best_level(0.25) == 0
        assert slide.best_level(0.2) == 0
        assert slide.best_level(0.5) == 1
        assert slide.best_level(0.7) == 1
        assert slide.best_level(0.9999) == 2  # within 0.1 %: an exact match, no resampling
        assert slide.best_level(16.0) == 2


@pytest.mark.parametrize("mpp, level", [(0.25, 0), (0.5, 1), (1.0, 2)])
def test_exact_level_match_copies_pixels(slide_file, mpp, level):
    path, rgb = slide_file
    expected_level = build_pyramid(rgb, 3)[level]
    ds = 2**level
    with open_slide(path) as slide:
        tile = slide.read_region_mpp(256, 128, (96, 64), mpp)
    assert tile.shape == (64, 96, 3) and tile.dtype == np.uint8
    y, x = 128 // ds, 256 // ds
    np.testing.assert_array_equal(tile, expected_level[y : y + 64, x : x + 96])


def test_non_integer_downsample_is_area_average_from_the_finer_level(slide_file):
    path, rgb = slide_file
    level1 = build_pyramid(rgb, 3)[1]  # 0.5 µm/px: the coarsest level finer than 0.7
    x0, y0, size, mpp = 300, 200, 64, 0.7
    with open_slide(path) as slide:
        tile = slide.read_region_mpp(x0, y0, size, mpp)
    factor = mpp / 0.5
    lx, ly = x0 / 2, y0 / 2
    box = (lx, ly, lx + size * factor, ly + size * factor)
    expected = np.asarray(
        Image.fromarray(level1).resize((size, size), Image.Resampling.BOX, box=box)
    )
    np.testing.assert_array_equal(tile, expected)
    # and physically right: ~ the mean of the level-0 pixels under each output pixel
    step = mpp / MPP
    cy, cx = 10, 20
    ref = rgb[
        round(y0 + cy * step) : round(y0 + (cy + 1) * step),
        round(x0 + cx * step) : round(x0 + (cx + 1) * step),
    ]
    assert np.abs(tile[cy, cx].astype(float) - ref.reshape(-1, 3).mean(0)).max() < 20


def test_finer_than_level_0_is_bilinear_upsampling(slide_file):
    path, rgb = slide_file
    with open_slide(path) as slide:
        tile = slide.read_region_mpp(100, 50, (40, 30), 0.125)  # 2x finer than level 0
    box = (1.0, 1.0, 21.0, 16.0)  # window starts one pixel early (bilinear margin)
    window = Image.fromarray(np.ascontiguousarray(rgb[49:67, 99:122]))
    expected = np.asarray(window.resize((40, 30), Image.Resampling.BILINEAR, box=box))
    np.testing.assert_array_equal(tile, expected)


def test_outside_the_slide_is_white(slide_file):
    path, _ = slide_file
    with open_slide(path) as slide:
        tile = slide.read_region_mpp(W - 32, H - 32, 64, MPP)
    assert (tile[32:, :] == 255).all() and (tile[:, 32:] == 255).all()
    assert not (tile[:32, :32] == 255).all()


def test_thumbnail_is_the_whole_slide_block_averaged(slide_file):
    path, rgb = slide_file
    with open_slide(path) as slide:
        thumb = slide.thumbnail_mpp(4.0)
    assert thumb.shape == (H // 16, W // 16, 3)
    blocks = rgb.reshape(H // 16, 16, W // 16, 16, 3).mean(axis=(1, 3))
    assert np.abs(thumb.astype(float) - blocks).max() <= 2.0  # pyramid + box rounding only


def test_missing_mpp_needs_an_override(tmp_path):
    path = tmp_path / "no_mpp.tiff"
    write_pyramidal_tiff(path, _image()[:256, :256], None, n_levels=1)
    with pytest.raises(StedmError, match="records no µm/px") as err:
        open_slide(path)
    assert str(path) in str(err.value) and "mpp" in str(err.value)
    with open_slide(path, mpp_override=0.5) as slide:
        assert slide.mpp == 0.5


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.svs"
    with pytest.raises(StedmError, match="not found") as err:
        open_slide(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("kind", ["text", "png"])
def test_non_slide_file(tmp_path, kind):
    if kind == "text":
        path = tmp_path / "notes.svs"
        path.write_text("this is not a slide\n")
    else:
        path = tmp_path / "photo.png"
        Image.fromarray(_image()[:64, :64]).save(path)
    with pytest.raises(StedmError, match="cannot open .* as a whole-slide image") as err:
        open_slide(path)
    assert str(path) in str(err.value) and "supported formats" in str(err.value)
