# One model x one detector on the ID test set and every OOD set of its dataset: scores/<set>.npz (id.npz for
# the ID set) and metrics.csv (one row per OOD set + `mean`). Only metrics.csv is declared; the npz files
# beside it are written first (atomically), so metrics.csv existing means the scores are there too.


rule evaluate:
    input:
        ckpt=f"{RESULTS}/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/final.pt",
        data=lambda wc: [ancient(data_stamp(d)) for d in datasets_of(wc.dataset, with_aux=False)],
    output:
        f"{RESULTS}/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/eval/{{detector}}/metrics.csv",
    log:
        f"{RESULTS}/logs/eval/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/{{detector}}.log",
    benchmark:
        benchmark_file("evaluate", "{dataset}", "{arch}", "{run}", "seed{seed}", "{detector}")
    # One SLURM job per model: training and every evaluation of its checkpoint share a group id, so they run
    # one after another in one submission on one GPU (with the workflow profile's `gpu=local` scope). When the
    # model already exists, the profile's `group-components` still merges its evaluations into one job. A
    # model whose job would exceed max_job_minutes has ungrouped evaluations (evaluation_group).
    group:
        evaluation_group
    wildcard_constraints:
        run="|".join(["pretrain"] + VARIANTS),
    params:
        ood=lambda wc: ",".join(config["datasets"][wc.dataset]["ood"]),
        out=lambda wc: f"{run_dir(wc.dataset, wc.arch, wc.run, wc.seed)}/eval/{wc.detector}",
        # --detector (the eval directory's detector, also a swept "<detector>~<setting>"), its per-(dataset,
        # arch) --detector-kwargs (config detector_kwargs) and evaluate_args
        detector=lambda wc: quote_args(P.evaluate_detector_args(config, wc.dataset, wc.arch, wc.detector)),
    threads: GPU_THREADS
    resources:
        gpu=GPUS,
        runtime=EVAL_MINUTES,
        mem_mb=32000,
        attempt=attempt,
    retries: GPU_RETRIES
    conda:
        ENV_GPU
    shell:
        "python {JOB:q} --log {log:q} --attempt {resources.attempt} --"
        " greg evaluate --checkpoint {input.ckpt:q} --id {wildcards.dataset:q} --ood {params.ood:q}"
        " --out {params.out:q} --root {config[data_root]:q}"
        " --num-workers {threads} --device {config[device]:q} $([ {resources.gpu} -gt 0 ] && echo --require-cuda)"
        " {params.detector}"


# A pretrained (CE) model is scored by every post-hoc detector of the grid in one process (`greg evaluate
# --detector a,b,...`: model, data and ID features loaded once; each detector's eval/<detector>/ as above)
# instead of one job per detector, which paid the start-up each time. Other detectors a table asks of it
# (and every fine-tuned model's detector) go through `evaluate`.
POSTHOC = list(dict.fromkeys(d for g in config["grid"] for d in g["posthoc"]))


ruleorder: evaluate_posthoc > evaluate


rule evaluate_posthoc:
    input:
        ckpt=f"{RESULTS}/{{dataset}}/{{arch}}/pretrain/seed{{seed}}/final.pt",
        data=lambda wc: [ancient(data_stamp(d)) for d in datasets_of(wc.dataset, with_aux=False)],
    output:
        [f"{RESULTS}/{{dataset}}/{{arch}}/pretrain/seed{{seed}}/eval/{d}/metrics.csv" for d in POSTHOC],
    log:
        f"{RESULTS}/logs/eval/{{dataset}}/{{arch}}/pretrain/seed{{seed}}/posthoc.log",
    benchmark:
        benchmark_file("evaluate", "{dataset}", "{arch}", "pretrain", "seed{seed}", "posthoc")
    group:
        evaluation_group
    params:
        ood=lambda wc: ",".join(config["datasets"][wc.dataset]["ood"]),
        out=lambda wc: f"{run_dir(wc.dataset, wc.arch, 'pretrain', wc.seed)}/eval/{{detector}}",
        # --detector a,b,... with each one's (dataset, arch) --detector-kwargs (config detector_kwargs), then
        # evaluate_args
        detectors=lambda wc: quote_args(P.evaluate_detector_args(config, wc.dataset, wc.arch, POSTHOC)),
    threads: GPU_THREADS
    resources:
        gpu=GPUS,
        runtime=minutes(EVAL_MINUTES * max(len(POSTHOC), 1)),  # as `evaluate`, per detector
        mem_mb=32000,
        attempt=attempt,
    retries: GPU_RETRIES
    conda:
        ENV_GPU
    shell:
        "python {JOB:q} --log {log:q} --attempt {resources.attempt} --"
        " greg evaluate --checkpoint {input.ckpt:q} --id {wildcards.dataset:q} --ood {params.ood:q}"
        " --out {params.out:q} --root {config[data_root]:q}"
        " --num-workers {threads} --device {config[device]:q} $([ {resources.gpu} -gt 0 ] && echo --require-cuda)"
        " {params.detectors}"
