# Every training variant (fine-tuning from the CE model of the same seed, or from scratch). Same resume
# contract as pretrain.smk: only final.pt is declared, state.pt and metrics.jsonl survive a requeue.


rule train:
    input:
        unpack(train_inputs),
    output:
        f"{RESULTS}/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/final.pt",
    log:
        f"{RESULTS}/logs/train/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}.log",
    wildcard_constraints:
        run="|".join(VARIANTS),
    params:
        args=lambda wc: quote_args(P.train_args(config, wc.dataset, wc.arch, wc.run, wc.seed)),
        out=lambda wc: run_dir(wc.dataset, wc.arch, wc.run, wc.seed),
        device=config["device"],
    conda:
        ENV_GPU
    shell:
        "greg train {params.args} --out {params.out} --device {params.device} > {log} 2>&1"
