"""Patient-level splits: annotated training pool with nested budgets, validation, test, style pool.

Every role is assigned per *patient*, never per slide, so no patient's tissue leaks between
training, validation, test and the unannotated style pool. Patients fixed to a role by the
manifest's `split` column keep it; the rest are assigned at random (seeded), stratified by the
manifest's `group` column: roles are filled by drawing round-robin over groups, and the training
pool is kept in that interleaved order, so every budget (its first b slides) is stratified too and
smaller budgets are subsets of larger ones.
"""

from __future__ import annotations

import argparse
import itertools
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from stedm.config import Config, SplitsConfig, load_config
from stedm.data.manifest import SlideRecord, read_manifest
from stedm.errors import StedmError
from stedm.io import write_json

log = logging.getLogger(__name__)


def _patients(records: list[SlideRecord]) -> dict[str, list[SlideRecord]]:
    by_patient: dict[str, list[SlideRecord]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    return dict(by_patient)


def _fixed_role(patient: str, slides: list[SlideRecord]) -> str:
    roles = {r.split for r in slides if r.split}
    if len(roles) > 1:
        detail = ", ".join(f"{r.slide_id}→{r.split or 'auto'}" for r in slides)
        raise StedmError(
            f"patient '{patient}' is assigned to several roles in the manifest ({detail}); a patient "
            "must have one role — give all of its slides the same split (or leave them empty)"
        )
    return roles.pop() if roles else ""


def _round_robin(patients: list[str], groups: dict[str, str], rng: np.random.Generator) -> list[str]:
    """Shuffle patients within each group, then interleave the groups (largest first)."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for p in patients:
        by_group[groups[p]].append(p)
    queues = []
    for g in sorted(by_group):
        members = sorted(by_group[g])
        rng.shuffle(members)
        queues.append(members)
    queues.sort(key=len, reverse=True)
    order: list[str] = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def make_splits(records: list[SlideRecord], cfg: SplitsConfig) -> dict:
    """Assign every patient one role and derive nested budgets. See the module docstring.

    Raises:
        StedmError: a patient with several roles, a fixed train/val/test patient without
            annotations, or too few annotated patients for the requested budgets.
    """
    rng = np.random.default_rng(cfg.seed)
    slides_of = _patients(records)
    groups = {p: s[0].group or "" for p, s in slides_of.items()}
    annotated = {p: all(r.annotation_path is not None for r in s) for p, s in slides_of.items()}
    role: dict[str, str] = {}
    for patient, slides in sorted(slides_of.items()):
        fixed = _fixed_role(patient, slides)
        if fixed in {"train", "val", "test"} and not annotated[patient]:
            raise StedmError(
                f"patient '{patient}' is fixed to '{fixed}' in the manifest but has slides without "
                "an annotation_path; add the annotations or set its split to 'style'"
            )
        if fixed:
            role[patient] = fixed
    free = _round_robin([p for p in slides_of if p not in role and annotated[p]], groups, rng)
    for name, wanted in (("test", cfg.n_test), ("val", cfg.n_val)):
        have = sum(1 for r in role.values() if r == name)
        while have < wanted and free:
            role[free.pop(0)] = name
            have += 1
        if have < wanted:
            raise StedmError(
                f"not enough annotated patients for splits.n_{name} = {wanted} (got {have}); "
                "lower it or add annotated slides to the manifest"
            )
    need = max(cfg.budgets)
    fixed_train = [p for p in _round_robin([p for p, r in role.items() if r == "train"], groups, rng)]
    pool_patients = list(fixed_train)
    n_pool = sum(len(slides_of[p]) for p in pool_patients)
    while n_pool < need and free:
        patient = free.pop(0)
        role[patient] = "train"
        pool_patients.append(patient)
        n_pool += len(slides_of[patient])
    if n_pool < need:
        raise StedmError(
            f"the largest budget needs {need} annotated training slides but only {n_pool} are available "
            f"after reserving {cfg.n_val} validation and {cfg.n_test} test patients; lower splits.budgets "
            "or add annotated slides"
        )
    for patient in slides_of:
        role.setdefault(patient, "style")
    train_pool = [r.slide_id for p in pool_patients for r in sorted(slides_of[p], key=lambda r: r.slide_id)]
    train_pool = train_pool[:need] if len(train_pool) > need else train_pool
    # A budget never splits a patient: extend to the patient's last slide if needed.
    slide_patient = {r.slide_id: r.patient_id for r in records}
    budgets: dict[str, list[str]] = {}
    for b in sorted(set(cfg.budgets)):
        chosen = train_pool[:b]
        while len(chosen) < len(train_pool) and slide_patient[train_pool[len(chosen)]] == slide_patient[chosen[-1]]:
            chosen.append(train_pool[len(chosen)])
        budgets[str(b)] = chosen

    def of_role(name: str) -> list[str]:
        return sorted(r.slide_id for r in records if role[r.patient_id] == name)

    splits = {
        "seed": cfg.seed,
        "budgets": budgets,
        "train_pool": train_pool,
        "val": of_role("val"),
        "test": of_role("test"),
        "style_pool": of_role("style"),
        "patients": dict(sorted(role.items())),
        "slides": {
            r.slide_id: {"patient_id": r.patient_id, "role": role[r.patient_id], "group": r.group}
            for r in records
        },
    }
    # Slides of train patients beyond the largest budget (patients with many slides) stay unused.
    check_splits(splits)
    if not splits["style_pool"]:
        raise StedmError(
            "no patient is left for the unannotated style pool (STEDM draws unseen styles from it); "
            "add slides, lower the budgets, or fix patients to split 'style' in the manifest"
        )
    return splits


def check_splits(splits: dict) -> None:
    """Invariants: one role per patient, nested budgets, style pool disjoint from annotated roles."""
    patient_roles: dict[str, set[str]] = defaultdict(set)
    for slide in splits["slides"].values():
        patient_roles[slide["patient_id"]].add(slide["role"])
    leaking = {p: sorted(r) for p, r in patient_roles.items() if len(r) > 1}
    if leaking:
        raise StedmError(f"patients in several roles (leakage between splits): {leaking}")
    ordered = [splits["budgets"][k] for k in sorted(splits["budgets"], key=int)]
    for small, large in itertools.pairwise(ordered):
        if not set(small) <= set(large):
            raise StedmError("budgets are not nested: a smaller budget has slides the larger one lacks")
    annotated_roles = set(splits["train_pool"]) | set(splits["val"]) | set(splits["test"])
    if annotated_roles & set(splits["style_pool"]):
        raise StedmError("style-pool slides overlap annotated training/validation/test slides")


def budget_slides(splits: dict, budget: int) -> list[str]:
    """The annotated slides of one budget, or a StedmError naming the budgets that exist."""
    if str(budget) not in splits["budgets"]:
        raise StedmError(
            f"budget {budget} is not in splits.json (budgets: {sorted(splits['budgets'], key=int)}); "
            "add it to splits.budgets and rerun the split stage"
        )
    return splits["budgets"][str(budget)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, type=Path, help="cohort manifest CSV")
    parser.add_argument("--out", required=True, type=Path, help="splits.json to write")
    parser.add_argument("--config", default=None, help="config YAML/JSON file or inline JSON")


def run(args: argparse.Namespace) -> None:
    config: Config = load_config(args.config)
    records = read_manifest(args.manifest)
    splits = make_splits(records, config.splits)
    write_json(args.out, splits)
    log.info(
        "wrote %s: %d train-pool slides (budgets %s), %d val, %d test, %d style-pool slides",
        args.out, len(splits["train_pool"]), {k: len(v) for k, v in splits["budgets"].items()},
        len(splits["val"]), len(splits["test"]), len(splits["style_pool"]),
    )
