# The CPU demo (README "The CPU demo", config/demo.yaml): `snakemake demo --configfile config/demo.yaml --cores 2`
# renders its table, fig3, the energy histograms and the input-gradient norms per set (every run and
# evaluation they need comes with them). Without the demo config the target would plan the paper's CIFAR
# pipeline: it refuses instead (demo_inputs).


rule demo:
    """The demo's table (LaTeX + CSV), fig3 (energy loss and input-gradient norm during fine-tuning), fig4
    (energy histograms, ID vs OOD, CE vs Energy loss vs GReg) and the input-gradient norms of the energy score
    per set (CE, Energy loss, GReg)."""
    input:
        demo_inputs,
    default_target: False


rule grad_norm:
    """Mean input-gradient norm of the score per set (ID test, auxiliary, each OOD set) and model, over seeds."""
    input:
        ckpts=lambda wc: [c for cs in grad_norm_ckpts().values() for c in cs],
        data=lambda wc: [data_stamp(d) for d in datasets_of(grad_norm_sets()[0], with_aux=True)],
    output:
        csv=f"{RESULTS}/tables/grad_norm.csv",
        pdf=report(
            f"{RESULTS}/figures/grad_norm.pdf",
            caption="../report/grad_norm.rst",
            category="Figures",
            labels={"figure": "grad_norm", "format": "PDF"},
        ),
        png=report(
            f"{RESULTS}/figures/grad_norm.png",
            caption="../report/grad_norm.rst",
            category="Figures",
            labels={"figure": "grad_norm", "format": "PNG"},
        ),
    log:
        f"{RESULTS}/logs/report/grad_norm.log",
    params:
        args=grad_norm_args,  # shell-quoted by quote_args
        root=config["data_root"],
        device=config["device"],
    conda:
        ENV_CPU
    shell:
        "greg report grad-norm {params.args} --root {params.root:q} --device {params.device:q}"
        " --csv {output.csv:q} --out {output.pdf:q} > {log:q} 2>&1"
