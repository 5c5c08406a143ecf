"""Workflow configuration: one JSON schema, parsed once into frozen dataclasses.

The schema (`schemas/config.schema.yaml`) is the single source of truth for keys, allowed values
and defaults; Snakemake validates against it, and stage CLIs call `load_config`, which fills the
same defaults, validates, and returns a typed `Config`. Errors name the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from stedm.errors import StedmError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
if not SCHEMA_PATH.exists():  # installed without the repository: schema shipped as package data
    SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"


class ConfigError(StedmError, ValueError):
    """An invalid configuration; the message names the key and the allowed values."""


@dataclass(frozen=True)
class DemoCohortConfig:
    n_slides: int = 48
    n_two_slide_patients: int = 3
    size_px: int = 2048
    mpp: float = 0.5
    n_centres: int = 4
    seed: int = 0


@dataclass(frozen=True)
class CohortConfig:
    source: str = "demo"
    manifest: str | None = None
    demo: DemoCohortConfig = field(default_factory=DemoCohortConfig)


@dataclass(frozen=True)
class LabelsConfig:
    classes: tuple[str, ...] = ("Background", "Stroma", "Tumor")
    aliases: dict[str, str] = field(default_factory=dict)
    foreground: tuple[str, ...] = ("Tumor",)
    unannotated: str = "ignore"
    outside_tissue: str = "background"
    ignore_index: int = 255

    def class_index(self, name: str) -> int | None:
        """Label value of an annotation class name (aliases and case-insensitive), or None."""
        name = self.aliases.get(name, name)
        lowered = [c.lower() for c in self.classes]
        return lowered.index(name.lower()) if name.lower() in lowered else None

    @property
    def foreground_indices(self) -> tuple[int, ...]:
        return tuple(self.classes.index(c) for c in self.foreground)


@dataclass(frozen=True)
class TilingConfig:
    mpp: float = 1.0
    tile_size: int = 128
    thumbnail_mpp: float = 16.0
    tissue_threshold: str | float = "otsu"
    min_tissue_fraction: float = 0.5
    chunk_tiles: int = 16


@dataclass(frozen=True)
class SplitsConfig:
    budgets: tuple[int, ...] = (6, 24)
    n_val: int = 4
    n_test: int = 6
    seed: int = 0


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None
    experiment: str = "stedm"


@dataclass(frozen=True)
class AutoencoderConfig:
    source: str = "train"
    pretrained_path: str | None = None
    preset: str = "tiny"
    kind: str = "kl"
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-3
    train_crop: int | None = 64
    kl_weight: float = 1e-6
    mixed_precision: str = "no"


@dataclass(frozen=True)
class StedmConfig:
    preset: str = "tiny"
    layout: str = "binary"
    style_injection: str = "embedding"
    aggregation: str = "linear"
    style_encoder: str = "cnn"
    style_encoder_weights: str | None = None
    freeze_style: bool = False
    null_style: str = "constant_image"
    style_sampling: str = "multi_patch"
    n_style: int = 4
    nearby_distance_um: float = 256.0
    style_dropout: float = 0.25
    loss: str = "l1"
    prediction: str = "v_prediction"
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    mixed_precision: str = "no"


@dataclass(frozen=True)
class SynthesisConfig:
    n_samples: int = 480
    style_sampling: str | None = None
    n_style: int | None = None
    affine: bool = False
    sampler: str = "dpm_solver++"
    steps: int = 20
    guidance_scale: float = 1.5
    guidance_rescale: float = 0.7
    n_shards: int = 2
    batch_size: int = 16


@dataclass(frozen=True)
class ArmConfig:
    synthetic_fraction: float = 0.0
    stain_augmentation: bool = False
    budgets: tuple[int, ...] | None = None

    def runs_for(self, budget: int) -> bool:
        return self.budgets is None or budget in self.budgets


def _default_arms() -> dict[str, ArmConfig]:
    return {
        "real": ArmConfig(),
        "real+stedm": ArmConfig(synthetic_fraction=0.8),
        "real+stainaug": ArmConfig(stain_augmentation=True),
    }


@dataclass(frozen=True)
class SegmentationConfig:
    preset: str = "demo"
    encoder: str | None = None
    encoder_weights: str | None = None
    target: str = "binary"
    arms: dict[str, ArmConfig] = field(default_factory=_default_arms)
    seeds: tuple[int, ...] = (0,)
    steps: int = 400
    batch_size: int = 10
    lr: float = 1e-3
    ce_weight: float = 0.1
    dice_weight: float = 0.9
    val_every: int = 100
    mixed_precision: str = "no"
    eval_overlap: float = 0.25
    eval_batch_size: int = 16
    worst_k: int = 2


@dataclass(frozen=True)
class ReportConfig:
    inception_weights: str | None = None
    fid_max_images: int = 500
    fid_batch_size: int = 32
    style_max_images: int = 1000
    style_tiles_per_slide: int = 64
    layout_max_images: int = 1000
    n_overlays: int = 6


@dataclass(frozen=True)
class Config:
    results_dir: str = "results"
    seed: int = 0
    cohort: CohortConfig = field(default_factory=CohortConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    stedm: StedmConfig = field(default_factory=StedmConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict (what rules pass to a stage as `params`)."""
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _with_defaults(validator_class: type) -> type:
    """A validator that fills `default` values of missing properties before validating them."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = json.loads(json.dumps(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _with_defaults(jsonschema.Draft202012Validator)


def _key_of(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _error_message(error: jsonschema.ValidationError) -> str:
    key = _key_of(error)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"config key '{key}': {error.message}; allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"config key '{key}': {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "oneOf":
        return f"config key '{key}': {error.instance!r} is not valid ({error.schema.get('description', error.message)})"
    return f"config key '{key}': {error.message}"


def validate_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults into a copy of `raw` and validate it; raise ConfigError naming the key."""
    data = json.loads(json.dumps(raw or {}))
    errors = sorted(_DefaultFillingValidator(load_schema()).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_error_message(e) for e in errors))
    _check_semantics(data)
    return data


def _check_semantics(data: dict[str, Any]) -> None:
    """Cross-key checks the schema cannot express."""
    labels = data["labels"]
    unknown = [c for c in labels["foreground"] if c not in labels["classes"]]
    if unknown:
        raise ConfigError(
            f"config key 'labels.foreground': {unknown} not in labels.classes {labels['classes']}"
        )
    if labels["ignore_index"] < len(labels["classes"]):
        raise ConfigError(
            f"config key 'labels.ignore_index': {labels['ignore_index']} is a class index "
            f"(labels.classes has {len(labels['classes'])} classes); use a value >= {len(labels['classes'])}, e.g. 255"
        )
    if labels["classes"][0] in labels["foreground"]:
        raise ConfigError(
            f"config key 'labels.foreground': the first class '{labels['classes'][0]}' is the background "
            "(label 0: glass and unannotated pixels set to background); list the background class first"
        )
    bad_alias = {k: v for k, v in labels["aliases"].items() if v not in labels["classes"]}
    if bad_alias:
        raise ConfigError(f"config key 'labels.aliases': targets {bad_alias} not in labels.classes")
    if data["cohort"]["source"] == "manifest" and not data["cohort"]["manifest"]:
        raise ConfigError("config key 'cohort.manifest': required when cohort.source is 'manifest'")
    if data["autoencoder"]["source"] == "pretrained" and not data["autoencoder"]["pretrained_path"]:
        raise ConfigError(
            "config key 'autoencoder.pretrained_path': required when autoencoder.source is 'pretrained'"
        )


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Instantiate a (nested) frozen dataclass from a validated dict; lists become tuples."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _build(hint, value)
        elif f.name == "arms":
            value = {name: _build(ArmConfig, arm) for name, arm in value.items()}
        elif isinstance(value, list) and (typing.get_origin(hint) is tuple or tuple in typing.get_args(hint)
                                          or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))):
            value = tuple(value)
        elif isinstance(value, int) and not isinstance(value, bool) and hint is float:
            value = float(value)
        elif isinstance(hint, types.UnionType) and float in typing.get_args(hint):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        kwargs[f.name] = value
    return cls(**kwargs)


def load_config(source: str | Path | dict[str, Any] | None = None) -> Config:
    """Parse a config from a YAML/JSON file path, an inline JSON string, a dict, or None (defaults).

    Raises:
        ConfigError: the file is missing or unreadable, or a key or value is invalid.
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, dict):
        raw = source
    else:
        text = str(source)
        if text.lstrip().startswith("{"):
            raw = json.loads(text)
        else:
            path = Path(text)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("configuration must be a mapping of keys to values")
    return _build(Config, validate_dict(raw))
