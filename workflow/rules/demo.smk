# The CPU demo (README "Demo", config/demo.yaml): `snakemake demo --cores 2 --configfile config/demo.yaml`
# renders its table and the energy histograms (every run and evaluation they need comes with them).


rule demo:
    """The demo's table (LaTeX + CSV) and fig4 (energy histograms, ID vs OOD, CE vs Energy loss vs GReg)."""
    input:
        table_outputs("table_demo") if "table_demo" in TABLES else [],
        figure_outputs("fig4") if "fig4" in config["figures"] else [],
    default_target: False
