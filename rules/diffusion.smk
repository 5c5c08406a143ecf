# Generator stages: first-stage autoencoder, then one STEDM model per annotation budget.


rule train_autoencoder:
    input:
        splits=SPLITS,
        tracking=TRACKING,
        tiles=all_tile_stores,
    output:
        directory(f"{R}/autoencoder/model"),
    params:
        cfg=cfg_json("results_dir", "seed", "tracking", "autoencoder"),
        tiles_dir=f"{R}/tiles",
        work_dir=f"{R}/autoencoder/work",
    log:
        f"{R}/logs/train_autoencoder.log",
    benchmark:
        f"{R}/benchmarks/train_autoencoder.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=600,
    shell:
        "python -m stedm train-autoencoder --splits {input.splits} --tiles-dir {params.tiles_dir}"
        " --work-dir {params.work_dir} --config {params.cfg} --out {output} > {log} 2>&1"


rule train_stedm:
    input:
        splits=SPLITS,
        tracking=TRACKING,
        autoencoder=f"{R}/autoencoder/model",
        tiles=all_tile_stores,
    output:
        directory(f"{R}/stedm/budget~{{budget}}/model"),
    params:
        cfg=cfg_json("results_dir", "seed", "tracking", "labels", "tiling", "stedm"),
        tiles_dir=f"{R}/tiles",
        work_dir=f"{R}/stedm/budget~{{budget}}/work",
    log:
        f"{R}/logs/train_stedm/budget~{{budget}}.log",
    benchmark:
        f"{R}/benchmarks/train_stedm/budget~{{budget}}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=2880,
    shell:
        "python -m stedm train-stedm --budget {wildcards.budget} --splits {input.splits}"
        " --tiles-dir {params.tiles_dir} --autoencoder {input.autoencoder}"
        " --work-dir {params.work_dir} --config {params.cfg} --out {output} > {log} 2>&1"
