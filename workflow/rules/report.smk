# Tables (LaTeX + CSV, one rule per table: `snakemake table2`) and figures (PDF + PNG), all made by
# `greg report`. Table cells whose method/detector/model/dataset is not implemented are n/a (not built).
# Every paper table also carries the paper's printed numbers (config/paper_results.yaml): `paper` / `delta` in
# its CSV, `<table>_vs_paper.tex`, and `reproduction` summarizes them (docs/PAPER_TABLES.md).

OTHER_TABLES = [name for name in TABLES if name not in PAPER_TABLES]
TABLE_TEMPLATE = os.path.join(workflow.basedir, "greg", "templates", "table.tex.j2")  # not the working dir


rule table:
    """A table the paper does not print: LaTeX + CSV."""
    input:
        lambda wc: P.table_inputs(RESOLVED[wc.table]),
        template=TABLE_TEMPLATE,
    output:
        tex=table_report("LaTeX"),
        csv=table_report("CSV"),
    log:
        f"{RESULTS}/logs/report/{{table}}.log",
    wildcard_constraints:
        table="|".join(sorted(OTHER_TABLES)) or "no-tables",
    params:
        spec=lambda wc: json.dumps(RESOLVED[wc.table], sort_keys=True),
        caption=lambda wc: RESOLVED[wc.table]["caption"],  # workflow/report/table.rst
    conda:
        ENV_CPU
    shell:
        "greg report table --spec-json {params.spec:q} --template {input.template:q}"
        " --tex {output.tex:q} --csv {output.csv:q} > {log:q} 2>&1"


rule paper_table:
    """A paper table: LaTeX + CSV with the paper's value and delta per cell, and the table vs the paper."""
    input:
        lambda wc: P.table_inputs(RESOLVED[wc.table]),
        template=TABLE_TEMPLATE,
        paper=PAPER_RESULTS,
    output:
        tex=table_report("LaTeX"),
        csv=table_report("CSV"),
        vs_paper=f"{RESULTS}/tables/{{table}}_vs_paper.tex",
    log:
        f"{RESULTS}/logs/report/{{table}}.log",
    wildcard_constraints:
        table="|".join(sorted(PAPER_TABLES)) or "no-tables",
    params:
        spec=lambda wc: json.dumps(RESOLVED[wc.table], sort_keys=True),
        caption=lambda wc: RESOLVED[wc.table]["caption"],  # workflow/report/table.rst
        aliases=json.dumps(config.get("aliases") or {}, sort_keys=True),
    conda:
        ENV_CPU
    shell:
        "greg report table --spec-json {params.spec:q} --template {input.template:q}"
        " --tex {output.tex:q} --csv {output.csv:q} --paper {input.paper:q} --aliases-json {params.aliases:q}"
        " --vs-paper-tex {output.vs_paper:q} > {log:q} 2>&1"


rule reproduction:
    """Per paper table: cells within tolerance of the paper's numbers, the worst cells, the missing runs."""
    input:
        [f"{RESULTS}/tables/{name}.csv" for name in PAPER_TABLES],
    output:
        md=f"{RESULTS}/tables/reproduction.md",
        csv=f"{RESULTS}/tables/reproduction.csv",
    log:
        f"{RESULTS}/logs/report/reproduction.log",
    params:
        # '--aliased' or '' (common.smk), a fixed flag with no config text, so it needs no quoting
        aliased=NOT_PAPER_DATA,
    conda:
        ENV_CPU
    shell:
        "greg report reproduction {input:q} --md {output.md:q} --csv {output.csv:q} {params.aliased}"
        " > {log:q} 2>&1"


for _name in TABLES:

    rule:
        name:
            _name
        input:
            table_outputs(_name),
        default_target: False


rule fig3:
    """Energy loss and mean input-gradient norm of the score during training, with and without GReg."""
    input:
        lambda wc: [
            f"{run_dir(d, ar, run, s)}/final.pt" for _, d, ar, run in figure_runs("fig3") for s in SEEDS
        ],
    output:
        pdf=report(
            f"{RESULTS}/figures/fig3.pdf",
            caption="../report/fig3.rst",
            category="Figures",
            labels={"figure": "fig3", "format": "PDF"},
        ),
        png=report(
            f"{RESULTS}/figures/fig3.png",
            caption="../report/fig3.rst",
            category="Figures",
            labels={"figure": "fig3", "format": "PNG"},
        ),
    log:
        f"{RESULTS}/logs/report/fig3.log",
    params:
        runs=fig3_args,
        # runs and smooth are shell-quoted here (quote_args): lists of arguments cannot take {x:q}
        smooth=lambda wc: (
            ""
            if config["figures"]["fig3"].get("smooth") is None
            else quote_args(["--smooth", str(config["figures"]["fig3"]["smooth"])])
        ),
    conda:
        ENV_CPU
    shell:
        "greg report fig3 {params.runs} {params.smooth} --out {output.pdf:q} > {log:q} 2>&1"


rule fig4:
    """Energy-score distributions of the pretrained, Energy-loss and GReg models, ID vs one OOD set."""
    input:
        lambda wc: [f"{p}/metrics.csv" for dirs in fig4_dirs(wc).values() for p in dirs],
    output:
        pdf=report(
            f"{RESULTS}/figures/fig4.pdf",
            caption="../report/fig4.rst",
            category="Figures",
            labels={"figure": "fig4", "format": "PDF"},
        ),
        png=report(
            f"{RESULTS}/figures/fig4.png",
            caption="../report/fig4.rst",
            category="Figures",
            labels={"figure": "fig4", "format": "PNG"},
        ),
    log:
        f"{RESULTS}/logs/report/fig4.log",
    params:
        args=fig4_args,  # shell-quoted by quote_args
    conda:
        ENV_CPU
    shell:
        "greg report fig4 {params.args} --out {output.pdf:q} > {log:q} 2>&1"


rule fig_sam:
    """SAM appendix: head-gradient norm, max logit and energy distributions, ID vs each OOD set, per model."""
    input:
        ckpts=lambda wc: list(fig_sam_ckpts(wc).values()),
        data=lambda wc: [data_stamp(d) for d in [fig_sam_sets()[0], *fig_sam_sets()[1]]],
    output:
        pdf=report(
            f"{RESULTS}/figures/fig_sam.pdf",
            caption="../report/fig_sam.rst",
            category="Figures",
            labels={"figure": "fig_sam", "format": "PDF"},
        ),
        png=report(
            f"{RESULTS}/figures/fig_sam.png",
            caption="../report/fig_sam.rst",
            category="Figures",
            labels={"figure": "fig_sam", "format": "PNG"},
        ),
        npz=f"{RESULTS}/figures/fig_sam.npz",
    log:
        f"{RESULTS}/logs/report/fig_sam.log",
    benchmark:
        benchmark_file("fig_sam", "fig_sam")
    params:
        args=fig_sam_args,
        root=config["data_root"],
        device=config["device"],
    threads: GPU_THREADS
    resources:
        gpu=GPUS,
        runtime=minutes(60),
        mem_mb=32000,
        attempt=attempt,
    retries: GPU_RETRIES
    conda:
        ENV_GPU
    shell:
        "python {JOB:q} --log {log:q} --attempt {resources.attempt} --"
        " greg report fig-sam {params.args} --root {params.root:q} --device {params.device:q}"
        " --out {output.pdf:q} --npz {output.npz:q}"


# Seconds of CPU work on files already on the shared filesystem: never worth a queue wait.
localrules:
    table,
    reproduction,
    fig3,
    fig4,


rule all_tables:
    input:
        rules_inputs_all_tables(),
        rules_inputs_reproduction(),


rule all_figures:
    input:
        rules_inputs_all_figures(),


rule all_runs:
    input:
        rules_inputs_all_runs(),
