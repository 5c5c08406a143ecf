# Data stages: demo cohort, tracking database, tiling into zarr, patient-level splits.


if CFG.cohort.source == "demo":

    rule make_demo_cohort:
        output:
            manifest=MANIFEST,
            slides=expand(f"{R}/cohort/slides/{{slide}}.tiff", slide=SLIDES),
            annotations=expand(f"{R}/cohort/annotations/{{slide}}.geojson", slide=SLIDES),
        params:
            cfg=cfg_json("cohort", "labels"),
            out_dir=f"{R}/cohort",
        log:
            f"{R}/logs/make_demo_cohort.log",
        benchmark:
            f"{R}/benchmarks/make_demo_cohort.tsv"
        threads: 2
        resources:
            mem_mb=2000,
            runtime=30,
        shell:
            "python -m stedm make-demo-cohort --config {params.cfg} --out-dir {params.out_dir}"
            " --workers {threads} > {log} 2>&1"


rule init_tracking:
    output:
        TRACKING,
    params:
        cfg=cfg_json("results_dir", "tracking"),
    log:
        f"{R}/logs/init_tracking.log",
    benchmark:
        f"{R}/benchmarks/init_tracking.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stedm init-tracking --config {params.cfg} --out {output} > {log} 2>&1"


rule tile_slide:
    input:
        slide_inputs,
    output:
        store=directory(f"{R}/tiles/{{slide}}.zarr"),
        thumbnail=f"{R}/tiles/{{slide}}.thumbnail.png",
    params:
        cfg=cfg_json("labels", "tiling"),
        manifest=MANIFEST,
    log:
        f"{R}/logs/tile_slide/{{slide}}.log",
    benchmark:
        f"{R}/benchmarks/tile_slide/{{slide}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m stedm tile --manifest {params.manifest} --slide-id {wildcards.slide}"
        " --config {params.cfg} --out {output.store} --thumbnail {output.thumbnail} > {log} 2>&1"


rule make_splits:
    input:
        MANIFEST,
    output:
        SPLITS,
    params:
        cfg=cfg_json("splits"),
    log:
        f"{R}/logs/make_splits.log",
    benchmark:
        f"{R}/benchmarks/make_splits.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m stedm split --manifest {input} --config {params.cfg} --out {output} > {log} 2>&1"
