# Segmentation stages: one model per (budget, arm, seed), evaluated on the test slides' whole slides.
import re

# Arm names may contain '+' (real+stedm): constrain {arm} to the configured names.
SEG_ARM_PATTERN = "|".join(re.escape(a) for a in sorted(CFG.segmentation.arms, key=len, reverse=True))
SEG_DIR = f"{R}/segmentation/budget~{{budget}}/arm~{{arm}}/seed~{{seed}}"

# (budget, arm, seed) of every segmentation job: arms that run for the budget x seeds.
SEGMENTATION_RUNS = [
    (b, arm, s)
    for b in BUDGETS
    for arm, arm_cfg in CFG.segmentation.arms.items()
    if arm_cfg.runs_for(b)
    for s in CFG.segmentation.seeds
]
SEGMENTATION_METRICS = [
    f"{R}/segmentation/budget~{b}/arm~{arm}/seed~{s}/metrics.json" for b, arm, s in SEGMENTATION_RUNS
]


SEG_EVAL_KEYS = ("eval_overlap", "eval_batch_size", "worst_k")


def seg_cfg(stage):
    """Params for one job: only its own arm, no seed list, and for training no evaluation keys,
    so adding an arm or a seed, or changing the evaluation, reruns exactly the affected jobs."""

    def params(wildcards):
        seg = {k: v for k, v in config["segmentation"].items() if k != "seeds"}
        if stage == "train":
            seg = {k: v for k, v in seg.items() if k not in SEG_EVAL_KEYS}
        seg["arms"] = {wildcards.arm: config["segmentation"]["arms"][wildcards.arm]}
        sections = {s: config[s] for s in ("results_dir", "tracking", "labels", "tiling")}
        return shlex.quote(json.dumps({**sections, "segmentation": seg}))

    return params


def segmentation_synthetic(wildcards):
    """The budget's synthetic store, only for arms that mix synthetic tiles into their batches."""
    if CFG.segmentation.arms[wildcards.arm].synthetic_fraction > 0:
        return [f"{R}/synthesis/budget~{wildcards.budget}/synthetic.zarr"]
    return []


rule train_segmentation:
    input:
        splits=SPLITS,
        tracking=TRACKING,
        tiles=all_tile_stores,
        synthetic=segmentation_synthetic,
    output:
        directory(f"{SEG_DIR}/model"),
    wildcard_constraints:
        budget=r"\d+",
        arm=SEG_ARM_PATTERN,
        seed=r"\d+",
    params:
        cfg=seg_cfg("train"),
        tiles_dir=f"{R}/tiles",
        work_dir=f"{SEG_DIR}/work",
    log:
        f"{R}/logs/train_segmentation/budget~{{budget}}/arm~{{arm}}/seed~{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/train_segmentation/budget~{{budget}}/arm~{{arm}}/seed~{{seed}}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    shell:
        "python -m stedm train-seg --budget {wildcards.budget} --arm {wildcards.arm:q} --seed {wildcards.seed}"
        " --splits {input.splits} --tiles-dir {params.tiles_dir} --synthetic {input.synthetic}"
        " --work-dir {params.work_dir} --config {params.cfg} --out {output} > {log} 2>&1"


rule evaluate_segmentation:
    input:
        model=f"{SEG_DIR}/model",
        splits=SPLITS,
        tracking=TRACKING,
        manifest=MANIFEST,
    output:
        metrics=f"{SEG_DIR}/metrics.json",
        overlays=directory(f"{SEG_DIR}/overlays"),
    wildcard_constraints:
        budget=r"\d+",
        arm=SEG_ARM_PATTERN,
        seed=r"\d+",
    params:
        cfg=seg_cfg("evaluate"),
    log:
        f"{R}/logs/evaluate_segmentation/budget~{{budget}}/arm~{{arm}}/seed~{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate_segmentation/budget~{{budget}}/arm~{{arm}}/seed~{{seed}}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    shell:
        "python -m stedm evaluate-seg --budget {wildcards.budget} --arm {wildcards.arm:q} --seed {wildcards.seed}"
        " --model {input.model} --splits {input.splits} --manifest {input.manifest}"
        " --config {params.cfg} --out {output.metrics} --overlays {output.overlays} > {log} 2>&1"
