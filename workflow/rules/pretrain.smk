# CE pretraining per (dataset, arch, seed). Requeue-safe: `greg train` resumes from DIR/state.pt (not a
# declared output, so Snakemake never deletes it) and exits 0 at once when DIR/final.pt exists.


rule pretrain:
    input:
        data=lambda wc: [data_stamp(wc.dataset)],
        presets=config["pretrain"]["configs"],
    output:
        f"{RESULTS}/{{dataset}}/{{arch}}/pretrain/seed{{seed}}/final.pt",
    log:
        f"{RESULTS}/logs/train/{{dataset}}/{{arch}}/pretrain/seed{{seed}}.log",
    params:
        args=lambda wc: quote_args(R.train_args(config, wc.dataset, wc.arch, "pretrain", wc.seed)),
        out=lambda wc: run_dir(wc.dataset, wc.arch, "pretrain", wc.seed),
        device=config["device"],
    conda:
        ENV_GPU
    shell:
        "greg train {params.args} --out {params.out} --device {params.device} > {log} 2>&1"
