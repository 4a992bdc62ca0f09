# Datasets: one job per dataset (ID, auxiliary and OOD sets). `greg data download` verifies checksums and is a
# no-op when the files are already there; the stamp file only tells Snakemake that the dataset is ready.
# ImageNet cannot be downloaded (licence): put it under data_root by hand, the job then only verifies it.


rule download:
    output:
        touch(f"{config['data_root']}/.greg-ready/{{name}}"),
    log:
        f"{RESULTS}/logs/download/{{name}}.log",
    params:
        root=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),
    conda:
        ENV_CPU
    shell:
        "greg data download {wildcards.name:q} --root {params.root:q} --no-progress > {log:q} 2>&1"


# Compute nodes often have no internet access: downloads run on the node that runs Snakemake.
localrules:
    download,
