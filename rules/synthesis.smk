# Synthesis stages: style-query table per budget, sharded generation on the GPU, merge + preview.

SYNTH_SHARDS = list(range(CFG.synthesis.n_shards))


def synthetic_shards(wildcards):
    """Every generation shard of one budget (`synthesis.n_shards` of them)."""
    return [f"{R}/synthesis/budget~{wildcards.budget}/shards/shard~{s}.zarr" for s in SYNTH_SHARDS]


rule select_style_queries:
    input:
        splits=SPLITS,
        model=f"{R}/stedm/budget~{{budget}}/model",
        tiles=all_tile_stores,
    output:
        f"{R}/synthesis/budget~{{budget}}/style_queries.csv",
    params:
        cfg=cfg_json("seed", "labels", "stedm", "synthesis"),
        tiles_dir=f"{R}/tiles",
    log:
        f"{R}/logs/select_style_queries/budget~{{budget}}.log",
    benchmark:
        f"{R}/benchmarks/select_style_queries/budget~{{budget}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stedm select-styles --budget {wildcards.budget} --splits {input.splits}"
        " --tiles-dir {params.tiles_dir} --model {input.model} --config {params.cfg}"
        " --out {output} > {log} 2>&1"


rule generate_synthetic:
    input:
        queries=f"{R}/synthesis/budget~{{budget}}/style_queries.csv",
        model=f"{R}/stedm/budget~{{budget}}/model",
        autoencoder=f"{R}/autoencoder/model",
        tiles=all_tile_stores,
    output:
        directory(f"{R}/synthesis/budget~{{budget}}/shards/shard~{{shard}}.zarr"),
    wildcard_constraints:
        shard=r"\d+",
    params:
        cfg=cfg_json("labels", "synthesis"),
        tiles_dir=f"{R}/tiles",
    log:
        f"{R}/logs/generate_synthetic/budget~{{budget}}/shard~{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/generate_synthetic/budget~{{budget}}/shard~{{shard}}.tsv"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=720,
    shell:
        "python -m stedm generate --budget {wildcards.budget} --queries {input.queries}"
        " --tiles-dir {params.tiles_dir} --model {input.model} --autoencoder {input.autoencoder}"
        " --shard {wildcards.shard} --config {params.cfg} --out {output} > {log} 2>&1"


rule merge_synthetic:
    input:
        shards=synthetic_shards,
        tiles=all_tile_stores,
    output:
        store=directory(f"{R}/synthesis/budget~{{budget}}/synthetic.zarr"),
        preview=f"{R}/synthesis/budget~{{budget}}/preview.png",
    params:
        tiles_dir=f"{R}/tiles",
    log:
        f"{R}/logs/merge_synthetic/budget~{{budget}}.log",
    benchmark:
        f"{R}/benchmarks/merge_synthetic/budget~{{budget}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stedm merge-synthetic --shards {input.shards} --tiles-dir {params.tiles_dir}"
        " --out {output.store} --preview {output.preview} > {log} 2>&1"
