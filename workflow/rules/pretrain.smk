# CE pretraining per (dataset, arch, seed). Requeue-safe: `greg train` resumes from DIR/state.pt (not a
# declared output, so Snakemake never deletes it) and exits 0 at once when DIR/final.pt exists.
# Pairs listed in `pretrain.import` (the released DenseNet-100 CIFAR checkpoints) are not trained: the same
# `greg train` call with train.epochs 0 imports the file as final.pt (the file is an input, so a missing one
# fails before any job and a replaced one reruns the job).


rule pretrain:
    input:
        data=lambda wc: [ancient(data_stamp(wc.dataset))],
        presets=config["pretrain"]["configs"],
        # ancient: a re-download (same checksum, new mtime) must not retrain every seed
        imported=lambda wc: [
            ancient(data_stamp(n)) for n in [P.pretrain_import(config, wc.dataset, wc.arch)] if n
        ],
    output:
        protected(f"{RESULTS}/{{dataset}}/{{arch}}/pretrain/seed{{seed}}/final.pt"),
    log:
        f"{RESULTS}/logs/train/{{dataset}}/{{arch}}/pretrain/seed{{seed}}.log",
    benchmark:
        benchmark_file("pretrain", "{dataset}", "{arch}", "seed{seed}")
    params:
        args=lambda wc: quote_args(P.train_args(config, wc.dataset, wc.arch, "pretrain", wc.seed)),
        out=lambda wc: run_dir(wc.dataset, wc.arch, "pretrain", wc.seed),
    group:
        PRETRAIN_GROUP
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
