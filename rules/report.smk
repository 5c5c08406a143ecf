# Report stages: generation metrics per budget, then tables + figures + report.md from everything.
# Every table and figure is a `report()` output: `snakemake --report report.html` shows them all.

REPORT_SEEDS = list(CFG.segmentation.seeds)
REPORT_ARMS = list(CFG.segmentation.arms)
# (budget, arm, seed) of every segmentation run the config asks for
REPORT_SEG_RUNS = [
    (b, a, s)
    for b in BUDGETS
    for a, arm in CFG.segmentation.arms.items()
    if arm.runs_for(b)
    for s in REPORT_SEEDS
]
# layout fidelity uses the real-arm model of the largest budget (first seed), when there is one
REPORT_LAYOUT_MODEL = (
    [f"{R}/segmentation/budget~{BUDGETS[-1]}/arm~real/seed~{REPORT_SEEDS[0]}/model"]
    if "real" in CFG.segmentation.arms and CFG.segmentation.arms["real"].runs_for(BUDGETS[-1])
    else []
)
REPORT_SECTIONS = ["results_dir", "seed", "tracking", "cohort", "labels", "tiling", "splits",
                   "stedm", "synthesis", "segmentation", "report"]


def generation_cfg():
    """The generation metrics' params: not the segmentation training/evaluation keys or the
    report's figure settings, so changing those does not recompute FID/IS for every budget."""
    sections = {s: config[s] for s in ("results_dir", "seed", "tracking", "labels", "tiling",
                                       "stedm", "synthesis")}
    sections["segmentation"] = {k: config["segmentation"][k] for k in ("target", "seeds")}
    sections["report"] = {k: v for k, v in config["report"].items() if k != "n_overlays"}
    return shlex.quote(json.dumps(sections))


REPORT_DIR = f"{R}/report"
CAPTIONS = "../report/captions"


rule evaluate_generation:
    input:
        synthetic=f"{R}/synthesis/budget~{{budget}}/synthetic.zarr",
        preview=f"{R}/synthesis/budget~{{budget}}/preview.png",
        splits=SPLITS,
        tracking=TRACKING,
        tiles=all_tile_stores,
        seg_model=REPORT_LAYOUT_MODEL,
    output:
        json=f"{R}/metrics/generation/budget~{{budget}}.json",
        figure=report(
            f"{R}/metrics/generation/budget~{{budget}}.png",
            caption=f"{CAPTIONS}/generation_figure.rst",
            category="Generation",
            labels={"budget": "{budget}", "figure": "style and layout fidelity"},
        ),
    params:
        cfg=generation_cfg(),
        tiles_dir=f"{R}/tiles",
        seg_model=" ".join(f"--seg-model {m}" for m in REPORT_LAYOUT_MODEL),
    log:
        f"{R}/logs/evaluate_generation/budget~{{budget}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate_generation/budget~{{budget}}.tsv"
    threads: 2
    resources:
        gpu=1,  # Inception for FID/IS: ~10 images/s on a CPU core, hundreds per second on a GPU
        mem_mb=8000,
        runtime=120,
    shell:
        "python -m stedm evaluate-generation --budget {wildcards.budget} --synthetic {input.synthetic}"
        " --preview {input.preview} --splits {input.splits} --tiles-dir {params.tiles_dir}"
        " {params.seg_model} --config {params.cfg} --out {output.json} --figure {output.figure}"
        " > {log} 2>&1"


rule make_report:
    input:
        generation=expand(f"{R}/metrics/generation/budget~{{budget}}.json", budget=BUDGETS),
        segmentation=[
            f"{R}/segmentation/budget~{b}/arm~{a}/seed~{s}/metrics.json" for b, a, s in REPORT_SEG_RUNS
        ],
        seg_models=[f"{R}/segmentation/budget~{b}/arm~{a}/seed~{s}/model" for b, a, s in REPORT_SEG_RUNS],
        stedm=expand(f"{R}/stedm/budget~{{budget}}/model", budget=BUDGETS),
        autoencoder=f"{R}/autoencoder/model",
        previews=expand(f"{R}/synthesis/budget~{{budget}}/preview.png", budget=BUDGETS),
        tracking=TRACKING,
    output:
        summary=report(f"{R}/report.md", caption=f"{CAPTIONS}/summary.rst", category="Summary"),
        generation=report(
            f"{REPORT_DIR}/tables/generation.csv",
            caption=f"{CAPTIONS}/table_generation.rst",
            category="Tables",
            labels={"table": "generation quality"},
        ),
        segmentation=report(
            f"{REPORT_DIR}/tables/segmentation.csv",
            caption=f"{CAPTIONS}/table_segmentation.rst",
            category="Tables",
            labels={"table": "segmentation per budget and arm"},
        ),
        headline=report(
            f"{REPORT_DIR}/tables/headline.csv",
            caption=f"{CAPTIONS}/table_headline.rst",
            category="Tables",
            labels={"table": "headline: gap closed"},
        ),
        per_patient=report(
            f"{REPORT_DIR}/tables/per_patient.csv",
            caption=f"{CAPTIONS}/table_per_patient.rst",
            category="Tables",
            labels={"table": "Dice per test patient"},
        ),
        markdown=expand(
            f"{REPORT_DIR}/tables/{{table}}.md",
            table=["generation", "segmentation", "headline", "per_patient"],
        ),
        per_patient_dice=report(
            f"{REPORT_DIR}/figures/per_patient_dice.png",
            caption=f"{CAPTIONS}/per_patient_dice.rst",
            category="Segmentation",
            labels={"figure": "per-patient Dice"},
        ),
        overlays=[
            report(
                f"{REPORT_DIR}/figures/overlays_budget~{b}.png",
                caption=f"{CAPTIONS}/overlays.rst",
                category="Segmentation",
                labels={"figure": "test predictions", "budget": str(b)},
            )
            for b in BUDGETS
        ],
        samples=[
            report(
                f"{REPORT_DIR}/figures/samples_budget~{b}.png",
                caption=f"{CAPTIONS}/samples.rst",
                category="Generation",
                labels={"figure": "synthetic samples", "budget": str(b)},
            )
            for b in BUDGETS
        ],
        training=report(
            f"{REPORT_DIR}/figures/training_curves.png",
            caption=f"{CAPTIONS}/training_curves.rst",
            category="Training",
            labels={"figure": "training curves"},
        ),
    params:
        cfg=cfg_json(*REPORT_SECTIONS),
        results=R,
        out_dir=REPORT_DIR,
    log:
        f"{R}/logs/make_report.log",
    benchmark:
        f"{R}/benchmarks/make_report.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m stedm report --results-dir {params.results} --config {params.cfg}"
        " --out-dir {params.out_dir} --summary {output.summary} > {log} 2>&1"


REPORT_OUTPUTS = [f"{R}/report.md"] + expand(
    f"{R}/metrics/generation/budget~{{budget}}.json", budget=BUDGETS
)
