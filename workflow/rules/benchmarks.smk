# Measured cost of a run: every GPU rule has a `benchmark:` file (<results>/benchmarks/<rule>/...tsv);
# `snakemake benchmarks` sums them into <results>/benchmarks.csv (jobs, wall hours, GPU-hours, CPU hours, peak
# RSS per rule kind). The inputs are the benchmark files that exist when Snakemake starts, so the summary is
# redone whenever more jobs have finished.

import glob


rule benchmarks:
    input:
        sorted(glob.glob(os.path.join(glob.escape(RESULTS), "benchmarks", "**", "*.tsv"), recursive=True)),
    output:
        f"{RESULTS}/benchmarks.csv",
    log:
        f"{RESULTS}/logs/benchmarks.log",
    params:
        script=os.path.join(workflow.basedir, "workflow", "scripts", "gpu_hours.py"),
        root=lambda wc, output: os.path.join(os.path.dirname(output[0]), "benchmarks"),
        gpus=",".join(f"{r}={GPUS}" for r in ("pretrain", "train", "evaluate", "fig_sam")),
    conda:
        ENV_CPU
    shell:
        "python {params.script:q} {params.root:q} --gpus {params.gpus:q} --out {output:q} > {log:q} 2>&1"


localrules:
    benchmarks,
