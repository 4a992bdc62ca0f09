# The rehearsal (config/rehearsal.yaml, docs/WORKFLOW.md "Rehearsal") and `repro_quick`.
#
# Rehearsal: `snakemake rehearsal --configfile config/rehearsal.yaml --cores 2`. With the config key
# `rehearsal: {fakes: DIR}` set, Snakemake writes format-faithful fakes of every dataset into DIR at start
# (`greg data fake`), serves DIR/serve on 127.0.0.1 (a free port, bound at parse time, served from onstart)
# and the workflow's own `download` jobs fetch, verify and extract from it: $GREG_DATA_URL_BASE and
# $GREG_DATA_CHECKSUMS (the fakes' checksum file) are set in this process, so the jobs inherit them and no
# rule's shell text changes. $GREG_REHEARSAL_DIR makes workflow/scripts/job.py run every GPU job under
# workflow/scripts/rehearse.py (peak RSS, seconds per step, one preemption + resume per training).
# Without the key (every other config) nothing here runs but the definitions of the targets.

# The fakes, their server and the onstart hook are in common.smk (functions there, rules here).

# --- repro_quick: the config's `repro_quick` cells, first seed; the paper tables cut to them
QUICK_SEED = SEEDS[0]
QUICK_CELLS = [(c["dataset"], c["arch"], r) for c in config["repro_quick"] for r in c["runs"]]
QUICK_DIR = f"{RESULTS}/repro_quick"
QUICK_TABLES = {
    name: t
    for name in PAPER_TABLES
    if (
        t := P.quick_table(
            P.resolve_table(name, TABLES[name], {**config, "seeds": [QUICK_SEED]}, UNAVAILABLE, ASSUMPTIONS),
            QUICK_CELLS,
        )
    )
}


rule repro_quick_table:
    input:
        lambda wc: P.table_inputs(QUICK_TABLES[wc.table]),
        template=TABLE_TEMPLATE,
        paper=PAPER_RESULTS,
    output:
        tex=f"{QUICK_DIR}/tables/{{table}}.tex",
        csv=f"{QUICK_DIR}/tables/{{table}}.csv",
        vs_paper=f"{QUICK_DIR}/tables/{{table}}_vs_paper.tex",
    log:
        f"{RESULTS}/logs/repro_quick/{{table}}.log",
    wildcard_constraints:
        table="|".join(sorted(QUICK_TABLES)) or "no-tables",
    params:
        spec=lambda wc: json.dumps(QUICK_TABLES[wc.table], sort_keys=True),
        aliases=json.dumps(config.get("aliases") or {}, sort_keys=True),
    conda:
        ENV_CPU
    shell:
        "greg report table --spec-json {params.spec:q} --template {input.template:q}"
        " --tex {output.tex:q} --csv {output.csv:q} --paper {input.paper:q} --aliases-json {params.aliases:q}"
        " --vs-paper-tex {output.vs_paper:q} > {log:q} 2>&1"


rule repro_quick:
    """Table 1/2's DenseNet-100 post-hoc rows (released checkpoints) and GReg on CIFAR-10, one seed, vs the paper."""
    input:
        [f"{QUICK_DIR}/tables/{name}.csv" for name in QUICK_TABLES],
    output:
        md=f"{QUICK_DIR}/tables/reproduction.md",
        csv=f"{QUICK_DIR}/tables/reproduction.csv",
    log:
        f"{RESULTS}/logs/repro_quick/reproduction.log",
    params:
        # '--aliased' or '' (common.smk), a fixed flag with no config text, so it needs no quoting
        aliased=NOT_PAPER_DATA,
    conda:
        ENV_CPU
    shell:
        "greg report reproduction {input:q} --md {output.md:q} --csv {output.csv:q} {params.aliased}"
        " > {log:q} 2>&1"


# --- the rehearsal's targets
rule rehearsal_resources:
    """One row per rehearsed job: peak RSS, wall seconds, seconds per optimizer step at the real batch size."""
    input:
        rules_inputs_all_tables(),
        f"{RESULTS}/tables/reproduction.md",
        rules_inputs_all_figures(),
        f"{QUICK_DIR}/tables/reproduction.md",
    output:
        f"{REHEARSAL_DIR}/resources.csv",
    log:
        f"{RESULTS}/logs/rehearsal/resources.log",
    params:
        script=os.path.join(workflow.basedir, "workflow", "scripts", "rehearse.py"),
        jobs=lambda wc, output: os.path.join(os.path.dirname(output[0]), "resources"),
    conda:
        ENV_CPU
    shell:
        "python {params.script:q} --jobs {params.jobs:q} --summarize {output:q} > {log:q} 2>&1"


rule rehearsal:
    """Every table, reproduction.md, the figures and repro_quick on the fakes, and the resources table."""
    input:
        rules_inputs_all_tables(),
        f"{RESULTS}/tables/reproduction.md",
        rules_inputs_all_figures(),
        f"{QUICK_DIR}/tables/reproduction.md",
        f"{REHEARSAL_DIR}/resources.csv",


localrules:
    repro_quick_table,
    repro_quick,
    rehearsal_resources,
