# GReg / GReg+ reproduction: download -> CE pretraining -> post-hoc evaluation -> fine-tuning and from-scratch
# methods -> evaluation on every OOD set -> tables (LaTeX + CSV) and figures. See docs/WORKFLOW.md.
#
#   snakemake --profile greg-slurm all_tables         # the paper's tables on SLURM (profiles/slurm-example)
#   snakemake demo --configfile config/demo.yaml -c2  # the CPU demo: a table and figures (README "The CPU demo")
#   snakemake all --configfile config/smoke.yaml -c2  # the same DAG on the tiny benchmark, CPU, minutes
#   snakemake rehearsal --configfile config/rehearsal.yaml -c2  # the paper's grid at real shapes on fake data
#   snakemake --profile greg-slurm repro_quick        # one GPU: Table 1/2 DenseNet post-hoc rows + GReg, 1 seed

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


rule all:
    """Every table (with reproduction.md), every figure and every run of the grid."""
    input:
        rules_inputs_all_tables(),
        rules_inputs_reproduction(),
        rules_inputs_all_figures(),
        rules_inputs_all_runs(),
    default_target: True


include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/dg.smk"
include: "workflow/rules/benchmarks.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/rehearsal.smk"


onstart:
    check_slurm()
    planned_gpu_hours()
    rehearsal_onstart()
