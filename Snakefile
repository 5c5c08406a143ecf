# STEDM — Style-Extracting Diffusion Models as a reproducible workflow.
# Run the embedded demo: `snakemake --cores 2` (the local profile in profiles/default is applied
# automatically). Your own slides: `--configfile my.yaml` with cohort.source: manifest.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: f"{workflow.basedir}/workflow_config.yaml"


validate(config, "schemas/config.schema.yaml", set_default=True)


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/diffusion.smk"
include: "rules/synthesis.smk"
include: "rules/segmentation.smk"
include: "rules/report.smk"


rule all:
    input:
        TRACKING,
        SPLITS,
        expand(f"{R}/tiles/{{slide}}.zarr", slide=SLIDES),
        expand(f"{R}/tiles/{{slide}}.thumbnail.png", slide=SLIDES),
        expand(f"{R}/stedm/budget~{{budget}}/model", budget=BUDGETS),
        expand(f"{R}/synthesis/budget~{{budget}}/synthetic.zarr", budget=BUDGETS),
        expand(f"{R}/synthesis/budget~{{budget}}/preview.png", budget=BUDGETS),
        SEGMENTATION_METRICS,
        REPORT_OUTPUTS,
    default_target: True
