# The CPU demo (README "Demo", config/demo.yaml): `snakemake demo --cores 2 --configfile config/demo.yaml`
# renders its table and the energy histograms (every run and evaluation they need comes with them). Without
# the demo config the target would plan the paper's CIFAR pipeline: it refuses instead (demo_inputs).


rule demo:
    """The demo's table (LaTeX + CSV) and fig4 (energy histograms, ID vs OOD, CE vs Energy loss vs GReg)."""
    input:
        demo_inputs,
    default_target: False
