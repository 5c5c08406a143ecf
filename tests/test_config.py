"""Config: defaults, the embedded demo file, and errors that name the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from stedm.config import Config, ConfigError, load_config, load_schema

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_embedded_demo_config():
    demo = load_config(ROOT / "workflow_config.yaml")
    assert demo == load_config(None)  # the demo file lists the schema defaults, nothing else


def test_dataclasses_mirror_schema():
    schema = load_schema()

    def check(cls, props):
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == set(props), cls.__name__
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
                sub = getattr(cls(), f.name)
                check(type(sub), props[f.name]["properties"])

    check(Config, schema["properties"])


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"tiling": {"mpp": -1}}, "tiling.mpp"),
        ({"tiling": {"bogus": 1}}, "tiling"),
        ({"stedm": {"aggregation": "sum"}}, "stedm.aggregation"),
        ({"labels": {"foreground": ["Necrosis"]}}, "labels.foreground"),
        ({"cohort": {"source": "manifest"}}, "cohort.manifest"),
        ({"splits": {"budgets": []}}, "splits.budgets"),
        ({"labels": {"ignore_index": 2}}, "labels.ignore_index"),
        ({"labels": {"classes": ["Tumor", "Normal"], "foreground": ["Tumor"]}}, "labels.foreground"),
    ],
)
def test_invalid_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(raw)


def test_types_are_frozen_and_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tiling": {"mpp": 2}, "splits": {"budgets": [2, 4]}}))
    cfg = load_config(path)
    assert cfg.tiling.mpp == 2.0 and isinstance(cfg.tiling.mpp, float)
    assert cfg.splits.budgets == (2, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tiling.mpp = 3  # type: ignore[misc]


def test_missing_file_and_inline_json():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")
    assert load_config('{"seed": 3}').seed == 3


def test_class_index_aliases_and_case():
    cfg = load_config({"labels": {"aliases": {"Tumour": "Tumor"}}})
    assert cfg.labels.class_index("tumor") == 2
    assert cfg.labels.class_index("Tumour") == 2
    assert cfg.labels.class_index("Necrosis") is None
    assert cfg.labels.foreground_indices == (2,)
