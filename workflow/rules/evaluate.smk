# One model x one detector on the ID test set and every OOD set of its dataset: scores/<set>.npz (id.npz for
# the ID set) and metrics.csv (one row per OOD set + `mean`). Only metrics.csv is declared; the npz files
# beside it are written first (atomically), so metrics.csv existing means the scores are there too.


rule evaluate:
    input:
        ckpt=f"{RESULTS}/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/final.pt",
        data=lambda wc: [data_stamp(d) for d in datasets_of(wc.dataset, with_aux=False)],
    output:
        f"{RESULTS}/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/eval/{{detector}}/metrics.csv",
    log:
        f"{RESULTS}/logs/eval/{{dataset}}/{{arch}}/{{run}}/seed{{seed}}/{{detector}}.log",
    wildcard_constraints:
        run="|".join(["pretrain"] + VARIANTS),
    params:
        ood=lambda wc: ",".join(config["datasets"][wc.dataset]["ood"]),
        out=lambda wc: f"{run_dir(wc.dataset, wc.arch, wc.run, wc.seed)}/eval/{wc.detector}",
        root=config["data_root"],
        device=config["device"],
        extra=quote_args(config["evaluate_args"]),
    conda:
        ENV_GPU
    shell:
        "greg evaluate --checkpoint {input.ckpt} --id {wildcards.dataset} --ood {params.ood}"
        " --detector {wildcards.detector} --root {params.root} --device {params.device}"
        " --out {params.out} {params.extra} > {log} 2>&1"
