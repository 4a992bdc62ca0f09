# Every training variant (fine-tuning from the CE model of the same seed, or from scratch). Same resume
# contract as pretrain.smk: only final.pt is declared, state.pt and metrics.jsonl survive a requeue.


rule train:
    input:
        unpack(train_inputs),
    output:
        protected(f"{RESULTS}/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/final.pt"),
    log:
        f"{RESULTS}/logs/train/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}.log",
    benchmark:
        benchmark_file("train", "{dataset}", "{arch}", "{run}", "seed{seed}")
    wildcard_constraints:
        run="|".join(VARIANTS),
    params:
        args=lambda wc: quote_args(P.train_args(config, wc.dataset, wc.arch, wc.run, wc.seed)),
        out=lambda wc: run_dir(wc.dataset, wc.arch, wc.run, wc.seed),
    group:
        MODEL_GROUP
    threads: GPU_THREADS
    resources:
        gpu=GPUS,
        runtime=TRAIN_MINUTES,
        mem_mb=32000,
        attempt=attempt,
    retries: GPU_RETRIES
    conda:
        ENV_GPU
    shell:
        "python {JOB:q} --log {log:q} --attempt {resources.attempt} --"
        " greg train {params.args} --out {params.out:q} --workers {threads} {TRAIN_RUNTIME}"
        " --device {config[device]:q} $([ {resources.gpu} -gt 0 ] && echo --require-cuda)"
