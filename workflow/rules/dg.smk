# Hessian alignment for domain generalization (docs/DG.md): one `greg dg run` per (dataset, algorithm) of the
# `dg` config section, then one `greg dg table` over all of them (<results>/tables/table_dg.tex + .csv).
# `greg dg run` resumes at the next restart when rerun (results.csv is not a declared output, so Snakemake
# never deletes it); a changed steps/seed/hparams is refused: delete <results>/dg/<dataset>/<algorithm> first.


# MNIST cannot be fetched from compute nodes without internet: the download runs where Snakemake runs.
# For colored_digits (scikit-learn's bundled digits) it only checks that the data loads.
rule dg_download:
    output:
        # under the results like the OOD sets' stamps (data_stamp): data_root is runtime-only, so moving the
        # data reruns nothing
        touch(data_stamp("dg-{dg_dataset}")),
    log:
        f"{RESULTS}/logs/dg/download/{{dg_dataset}}.log",
    conda:
        ENV_CPU
    shell:
        "greg dg download --dataset {wildcards.dg_dataset:q} --data-root {config[data_root]:q} > {log:q} 2>&1"


localrules:
    dg_download,
    table_dg,


rule dg_run:
    input:
        ancient(data_stamp("dg-{dg_dataset}")),
    output:
        f"{RESULTS}/dg/{{dg_dataset}}/{{algorithm}}/summary.json",
    log:
        f"{RESULTS}/logs/dg/{{dg_dataset}}/{{algorithm}}.log",
    benchmark:
        benchmark_file("dg_run", "{dg_dataset}", "{algorithm}")
    params:
        args=lambda wc: quote_args(P.dg_run_args(config, wc.dg_dataset, wc.algorithm)),
        out=lambda wc: dg_dir(wc.dg_dataset, wc.algorithm),
        device=config["device"],
    # small MLPs, full batch, on the CPU: 10 restarts of 501 steps (docs/DG.md)
    threads: 4
    resources:
        runtime=minutes(240),
        mem_mb=8000,
    conda:
        ENV_CPU
    shell:
        "greg dg run {params.args} --out {params.out:q} --device {params.device:q} > {log:q} 2>&1"


rule table_dg:
    """Colored Digits / Colored MNIST: ERM, IRM, V-REx, Fishr, CORAL, HGP, Hutchinson, grayscale oracle."""
    input:
        dg_summaries(),
    output:
        tex=report(
            f"{RESULTS}/tables/table_dg.tex",
            caption="../report/table_dg.rst",
            category="Tables",
            labels={"table": "table_dg", "format": "LaTeX"},
        ),
        csv=report(
            f"{RESULTS}/tables/table_dg.csv",
            caption="../report/table_dg.rst",
            category="Tables",
            labels={"table": "table_dg", "format": "CSV"},
        ),
    log:
        f"{RESULTS}/logs/report/table_dg.log",
    params:
        dirs=lambda wc, input: quote_args([os.path.dirname(f) for f in input]),
        caption=quote_args([dg_caption()]),
    conda:
        ENV_CPU
    shell:
        "greg dg table --inputs {params.dirs} --caption {params.caption} --out {output.tex:q} > {log:q} 2>&1"
