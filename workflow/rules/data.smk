# Datasets: one job per dataset (ID, auxiliary and OOD sets). `greg data download` verifies checksums and is a
# no-op when the files are already there; the stamp file only tells Snakemake that the dataset is ready.
# ImageNet cannot be downloaded (licence): put it under data_root by hand, the job then only verifies it.
# The stamp lives in <results>/.greg-ready/ and data_root is not a param (runtime-only, like in greg train):
# after moving the data, change data_root and nothing reruns; to fetch into a new, empty root, delete
# <results>/.greg-ready/ (or run `greg data download NAME --root NEW` by hand).


rule download:
    output:
        touch(data_stamp("{name}")),
    log:
        f"{RESULTS}/logs/download/{{name}}.log",
    params:
        # not used by the command: a changed catalog entry reruns the download (rerun-triggers: params)
        files=lambda wc: P.catalog_files(wc.name),
    conda:
        ENV_CPU
    shell:
        "greg data download {wildcards.name:q} --root {config[data_root]:q} --no-progress > {log:q} 2>&1"


# Compute nodes often have no internet access: downloads run on the node that runs Snakemake.
localrules:
    download,
