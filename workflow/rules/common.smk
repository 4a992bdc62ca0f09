# Shared helpers: config validation, run paths, which cells are implemented, the inputs of the targets.
# The logic lives in greg.plan (unit-tested); this file only wires it to Snakemake.

import json
import os
import shlex
import shutil
import sys

from snakemake.utils import validate

from greg import plan as P

# One line (exit 2) naming the key for a bad value, a name outside the safe pattern or a YTE config;
# then Snakemake's validation fills in the schema's defaults.
try:
    P.check_workflow_config(
        config,
        os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"),
        workflow.configfiles,
    )
except P.ReportError as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(2)
validate(config, "../schemas/config.schema.yaml", set_default=True)

RESULTS = config["results"]
SEEDS = [int(s) for s in config["seeds"]]
VARIANTS = sorted(config["variants"])
# conda: paths are relative to the rule files (workflow/rules/), config paths to the repository root.
ENV_GPU = os.path.join("../..", config["envs"]["gpu"])  # join keeps an absolute config path as it is
ENV_CPU = os.path.join("../..", config["envs"]["cpu"])
TABLES = P.load_tables(config["tables"])
UNAVAILABLE = P.registry_checker(config)


def _check_names():
    # Fail at parse time, naming the key, when the grid/figures reference undefined things.
    for i, g in enumerate(config["grid"]):
        for kind, key, known in (
            ("dataset", "datasets", config["datasets"]),
            ("arch", "archs", config["archs"]),
        ):
            for name in g[key]:
                if name not in known:
                    raise ValueError(
                        f"config grid[{i}].{key}: unknown {kind} {name!r} (known: {sorted(known)})"
                    )
        for run in g["runs"]:
            if run not in config["variants"]:
                raise ValueError(f"config grid[{i}].runs: unknown variant {run!r} (known: {VARIANTS})")


_check_names()
P.check_extra_names(config)
P.check_detector_kwargs(config)


def run_dir(dataset, arch, run, seed):
    return P.run_dir(RESULTS, dataset, arch, run, seed)


def cell_ok(dataset, arch, run, detector):
    return UNAVAILABLE({"dataset": dataset, "arch": arch, "run": run, "detector": detector}) is None


# A smoke config's aliases or the rehearsal's fakes: its tables and reproduction.md say they are no paper result
NOT_PAPER_DATA = "--aliased" if P.substitute_data(config) else ""
ASSUMPTIONS = P.load_assumptions(config["tables"])  # marked recipes (config/tables.yaml `assumptions`)
# with_sweeps: cells of a detector in detector_sweep list every setting's files (the table keeps the best)
RESOLVED = {
    name: P.with_sweeps(P.resolve_table(name, spec, config, UNAVAILABLE, ASSUMPTIONS), config)
    for name, spec in TABLES.items()
}


def _check_run_configs():
    # Every run the targets can train, validated like `greg train` would: one line, before any job.
    cells = [
        (d, a, r)
        for g in config["grid"]
        for d in g["datasets"]
        for a in g["archs"]
        for r in ["pretrain", *g["runs"]]
    ]
    cells += [
        (c["dataset"], c["arch"], c["run"])
        for t in RESOLVED.values()
        for row in t["rows"]
        for c in row["cells"]
        if not c.get("na")
    ]
    try:
        P.check_run_configs(config, [c for c in cells if cell_ok(*c, "msp")])  # msp: any registered detector
    except P.ReportError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)


_check_run_configs()


def table_outputs(name):
    return [f"{RESULTS}/tables/{name}.tex", f"{RESULTS}/tables/{name}.csv"]


def table_report(fmt):
    """A table's .tex (fmt LaTeX) or .csv (fmt CSV) output of the `table` / `paper_table` rules, in the report."""
    return report(
        f"{RESULTS}/tables/{{table}}.{'tex' if fmt == 'LaTeX' else 'csv'}",
        caption="../report/table.rst",
        category="Tables",
        labels={"table": "{table}", "format": fmt},
    )


def rules_inputs_all_tables():
    """config/tables.yaml's tables (Tables 1-10, table_sam) and, when dg.datasets is set, table_dg."""
    names = list(TABLES) + (["table_dg"] if config["dg"]["datasets"] else [])
    return [f for name in names for f in table_outputs(name)]


PAPER_RESULTS = os.path.join(workflow.basedir, "config", "paper_results.yaml")
# the tables the paper prints (config/paper_results.yaml) get the comparison; extras (table_sam, the demo's) not
PAPER_TABLES = [name for name in TABLES if name in P.paper_tables(PAPER_RESULTS)]


def rules_inputs_reproduction():
    """reproduction.md (the paper comparison of every paper table), when the config has paper tables."""
    return [f"{RESULTS}/tables/reproduction.md"] if PAPER_TABLES else []


def demo_inputs(wc):
    """The demo's table, fig3, fig4 and grad_norm (figure + CSV); one line and exit 2 when the config is not
    the demo's (no table_demo)."""
    if "table_demo" not in TABLES:
        print(
            "ERROR: target 'demo' needs the demo config: snakemake demo --configfile config/demo.yaml "
            "--cores 2 (this config has no table_demo)",
            file=sys.stderr,
        )
        sys.exit(2)
    figs = [
        f for fig in ("fig3", "fig4", "grad_norm") if fig in config["figures"] for f in figure_outputs(fig)
    ]
    return (
        table_outputs("table_demo")
        + figs
        + ([f"{RESULTS}/tables/grad_norm.csv"] if "grad_norm" in config["figures"] else [])
    )


def figure_outputs(name):
    return [f"{RESULTS}/figures/{name}.pdf", f"{RESULTS}/figures/{name}.png"]


def rules_inputs_all_figures():
    return [
        f for name in ("fig3", "fig4", "fig_sam") if name in config["figures"] for f in figure_outputs(name)
    ]


def rules_inputs_all_runs():
    """metrics.csv of every implemented (dataset, arch, run, detector, seed) of the grid."""
    out = []
    for g in config["grid"]:
        for dataset in g["datasets"]:
            for arch in g["archs"]:
                cells = [("pretrain", d) for d in g["posthoc"]]
                cells += [(run, config["variants"][run]["detector"]) for run in g["runs"]]
                for run, det in cells:
                    if cell_ok(dataset, arch, run, det):
                        out += [
                            P.eval_csv(RESULTS, dataset, arch, run, s, name)
                            for name in P.detector_evals(config, dataset, arch, det)
                            for s in SEEDS
                        ]
    return list(dict.fromkeys(out))


def figure_runs(name):
    """(label, dataset, arch, run) of the implemented runs of a figure."""
    f = config["figures"][name]
    dataset = P.alias(config, "dataset", f["dataset"])
    arch = P.alias(config, "arch", f["arch"])
    det = f.get("detector", "energy")
    return [
        (label, dataset, arch, run) for label, run in f["runs"].items() if cell_ok(dataset, arch, run, det)
    ]


def fig_sam_sets():
    """(ID dataset, OOD sets) of fig_sam, aliased; ood `all` = every OOD set of the dataset."""
    f = config["figures"]["fig_sam"]
    dataset = P.alias(config, "dataset", f["dataset"])
    ood = P.ood_sets(config, dataset) if f["ood"] == "all" else [P.alias(config, "ood", o) for o in f["ood"]]
    return dataset, ood


def fig_sam_ckpts(wc):
    """label -> final.pt of the first seed, for each implemented run of fig_sam (first: before fine-tuning)."""
    return {
        label: f"{run_dir(d, ar, run, SEEDS[0])}/final.pt" for label, d, ar, run in figure_runs("fig_sam")
    }


def fig_sam_args(wc):
    f = config["figures"]["fig_sam"]
    dataset, ood = fig_sam_sets()
    labels = {s: config["labels"][s] for s in ood if s in config["labels"]}
    labels["id"] = config["labels"].get(dataset, dataset)
    args = []
    for label, ckpt in fig_sam_ckpts(wc).items():
        args += ["--model", f"{label}={ckpt}"]
    args += [
        "--id",
        dataset,
        "--ood",
        ",".join(ood),
        "--max-samples",
        str(f["max_samples"]),
        "--keys",
        ",".join(f["keys"]),
        "--labels-json",
        json.dumps(labels, sort_keys=True),
    ]
    return quote_args(args)


def data_stamp(name):
    # Under the results, not data_root: data_root is runtime-only (moving the data must not rerun a model);
    # consumers take it as ancient() (a re-verification must not either).
    return f"{RESULTS}/.greg-ready/{name}"


def datasets_of(dataset, with_aux):
    ds = config["datasets"][dataset]
    return [dataset] + ([ds["aux"]] if with_aux else []) + list(ds["ood"])


def quote_args(args):
    return " ".join(shlex.quote(a) for a in args)


# --- cluster plumbing: every GPU rule runs its CLI through workflow/scripts/job.py (per-attempt logs, no
# retry of exit 2/3, signals forwarded), declares its resources (a profile may override them) and a benchmark.
JOB = os.path.join(workflow.basedir, "workflow", "scripts", "job.py")
# A GPU unless the config pins the CPU (smoke runs): with a site profile or plain `--executor slurm` the
# rules themselves ask for it, so `device: auto` never trains on a CPU node by accident.
GPUS = 0 if config["device"] == "cpu" else 1
# Threads of a training/evaluation job (cores per GPU; data-loader workers). Runtime only: the shell text
# names {threads}, not the value, so changing it reruns nothing.
GPU_THREADS = config["job_threads"]  # schema default: 8
# Retries help against preemption, node failures and walltime kills (the CLIs resume); job.py makes a
# retry after exit 2 (bad config) or 3 (NaN) end at once.
GPU_RETRIES = 3
# A model's training job and the evaluations of its checkpoint form one group (one SLURM job; evaluate.smk).
MODEL_GROUP = "model_{dataset}_{arch}_{run}_seed{seed}"
PRETRAIN_GROUP = "model_{dataset}_{arch}_pretrain_seed{seed}"
# Runtimes (minutes) the rules ask SLURM for; none above max_job_minutes (the partition's time limit): a
# training cut by the limit resumes from state.pt on its retry. EVAL_MINUTES: ~1 min measured per evaluation;
# ODIN / fitting detectors take longer.
MAX_JOB_MINUTES = config["max_job_minutes"]  # schema default: 1440


def minutes(wanted):
    return min(wanted, MAX_JOB_MINUTES)


TRAIN_MINUTES = minutes(720)
EVAL_MINUTES = minutes(20)


def _evaluations_per_model():
    # every evaluation any target can ask for, per run directory (an upper bound of a group's size)
    files = rules_inputs_all_runs() + [f for t in RESOLVED.values() for f in P.table_inputs(t)]
    if "fig4" in config["figures"]:
        files += [f"{d}/metrics.csv" for dirs in fig4_dirs(None).values() for d in dirs]
    evals = {}
    for f in files:
        run, _, det = os.path.dirname(f).rpartition("/eval/")
        evals.setdefault(run, set()).add(det)
    return evals


def evaluation_group(wc):
    """The model's group (training + evaluations: one SLURM job), or no group when that job could run longer
    than max_job_minutes: the evaluations are then jobs of their own (the training keeps its group)."""
    run = getattr(wc, "run", "pretrain")  # evaluate_posthoc: the CE model's
    n = len(EVALUATIONS.get(run_dir(wc.dataset, wc.arch, run, wc.seed), ())) or 1
    if TRAIN_MINUTES + n * EVAL_MINUTES > MAX_JOB_MINUTES:
        return None
    name = MODEL_GROUP.format(dataset=wc.dataset, arch=wc.arch, run=run, seed=wc.seed)
    workflow.parent_groupids[name] = MODEL_GROUP  # the profile's group-components name the pattern
    return name


# Runtime-only arguments (greg.config.RUNTIME_KEYS, device, workers = the rule's threads) are not rule params
# and the shell text names them ({config[...]}, {TRAIN_RUNTIME}) instead of containing them: Snakemake reruns
# a job when its params or its shell text change, so editing them never reruns (or deletes) a trained model.
# --require-cuda when the job asked for a GPU (a profile may set gpu=0).
TRAIN_RUNTIME = quote_args(P.train_runtime_args(config))


def attempt(wildcards, attempt):
    """Resource `attempt`: Snakemake's attempt number, for job.py (resources are the only place it reaches)."""
    return attempt


def benchmark_file(kind, *parts):
    return os.path.join(RESULTS, "benchmarks", kind, *parts) + ".tsv"


def check_slurm():
    """onstart of a SLURM run (not a dry run): one line, nothing submitted, when SLURM's commands are not on
    PATH (the executor would start the local jobs, then hang in its shutdown) or a job still has the example
    profile's placeholder account."""
    plugin = workflow.executor_plugin
    if plugin is None or "slurm" not in getattr(plugin, "name", "") or "jobstep" in plugin.name:
        return
    missing = [cmd for cmd in ("sbatch", "squeue") if shutil.which(cmd) is None]
    if missing:
        print(
            f"ERROR: the SLURM executor needs {' and '.join(missing)} on PATH (not a SLURM login node?): run "
            "Snakemake where SLURM's commands are, or locally without the SLURM profile (--cores N); "
            "nothing was submitted",
            file=sys.stderr,
        )
        sys.exit(1)
    for j in workflow.dag.needrun_jobs():
        if j.is_local:
            continue
        account = str(j.resources.get("slurm_account", "") or "")
        if account.strip("'\"") == "my_account":
            # --default-resources on the command line replaces the profile's whole list: name all of it
            defaults = getattr(workflow.resource_settings.default_resources, "args", [])
            keep = [a for a in defaults if not a.startswith(("slurm_account=", "tmpdir="))]
            print(
                "ERROR: slurm_account is still the placeholder 'my_account': set your account under "
                "default-resources in your profile (profiles/slurm-example/config.yaml shows where), or pass "
                f"--default-resources {quote_args(['slurm_account=NAME', *keep])} (the whole list: it "
                "replaces the profile's); slurm-no-account: true on clusters without accounting; nothing "
                "was submitted",
                file=sys.stderr,
            )
            sys.exit(2)
        return


def train_inputs(wc):
    spec = P.run_spec(config, wc.run, wc.dataset)
    aux = (
        [data_stamp(config["datasets"][wc.dataset]["aux"])]
        if P.run_needs_aux(config, wc.run, wc.dataset)
        else []
    )
    ins = {"data": [ancient(f) for f in [data_stamp(wc.dataset), *aux]], "presets": spec["configs"]}
    if spec["init"] == "pretrain":
        ins["init"] = f"{run_dir(wc.dataset, wc.arch, 'pretrain', wc.seed)}/final.pt"
    return ins


def fig3_args(wc):
    runs = figure_runs("fig3")
    args = []
    for label, d, ar, run in runs:
        logs = ",".join(f"{run_dir(d, ar, run, s)}/metrics.jsonl" for s in SEEDS)
        args += ["--run", f"{label}={logs}"]
    return quote_args(args)


def fig4_dirs(wc):
    det = config["figures"]["fig4"].get("detector", "energy")
    return {
        label: [f"{run_dir(d, ar, run, s)}/eval/{det}" for s in SEEDS]
        for label, d, ar, run in figure_runs("fig4")
    }


def fig4_args(wc):
    f = config["figures"]["fig4"]
    ood = P.alias(config, "ood", f["ood"])
    args = []
    for label, dirs in fig4_dirs(wc).items():
        args += ["--model", f"{label}={','.join(dirs)}"]
    args += [
        "--ood",
        ood,
        "--ood-label",
        config["labels"].get(ood, ood),
        "--id-label",
        config["labels"].get(P.alias(config, "dataset", f["dataset"]), "ID"),
    ]
    return quote_args(args)


EVALUATIONS = _evaluations_per_model()


# the demo's grad_norm figure (demo.smk)
def grad_norm_ckpts():
    """label -> final.pt of every seed, for each implemented run of the grad_norm figure."""
    return {
        label: [f"{run_dir(d, ar, run, s)}/final.pt" for s in SEEDS]
        for label, d, ar, run in figure_runs("grad_norm")
    }


def grad_norm_sets():
    """(ID dataset, auxiliary set, OOD sets) of the grad_norm figure."""
    dataset = P.alias(config, "dataset", config["figures"]["grad_norm"]["dataset"])
    return dataset, config["datasets"][dataset]["aux"], P.ood_sets(config, dataset)


def grad_norm_args(wc):
    f = config["figures"]["grad_norm"]
    dataset, aux, ood = grad_norm_sets()
    args = []
    for label, ckpts in grad_norm_ckpts().items():
        args += ["--model", f"{label}={','.join(ckpts)}"]
    labels = {s: config["labels"].get(s, s) for s in [dataset, aux, *ood]}
    args += ["--id", dataset, "--aux", aux, "--ood", ",".join(ood), "--score", f["score"]]
    args += ["--max-samples", str(f["max_samples"]), "--labels-json", json.dumps(labels, sort_keys=True)]
    return quote_args(args)


# The rehearsal (rehearsal.smk): its fakes, their server and the environment the download and GPU jobs inherit.
import threading

from greg.data import downloader as _dl

# workflow/scripts/job.py's REHEARSAL_ENV: GPU jobs run under rehearse.py when it is set
REHEARSAL_ENV = "GREG_REHEARSAL_DIR"
REHEARSAL = config["rehearsal"]
REHEARSAL_DIR = RESULTS  # resources.csv and the per-job records (resources/) beside the runs
REHEARSAL_SERVER = None

if REHEARSAL:
    from greg.data import fake as _fake

    _FAKES = REHEARSAL["fakes"]
    REHEARSAL_SERVER = _fake.server(os.path.join(_FAKES, _fake.SERVE))
    os.environ[_dl.URL_BASE_ENV] = _fake.url_of(REHEARSAL_SERVER)
    os.environ[_dl.CHECKSUMS_ENV] = os.path.join(_FAKES, _fake.SERVE, _fake.CHECKSUMS)
    os.environ[REHEARSAL_ENV] = os.path.abspath(f"{REHEARSAL_DIR}/resources")


def rehearsal_onstart():
    """Write the fakes (again only when the catalog has changed) and start serving them; nothing without the
    `rehearsal` key."""
    if not REHEARSAL:
        return
    if not _fake.fakes_complete(_FAKES):
        _fake.write_fakes(_FAKES)
    threading.Thread(target=REHEARSAL_SERVER.serve_forever, daemon=True).start()
    print(f"rehearsal: serving {os.path.join(_FAKES, _fake.SERVE)} at {os.environ[_dl.URL_BASE_ENV]}")


def planned_gpu_hours():
    """onstart: the GPU jobs about to run and the GPU-hours they reserve, before anything is submitted."""
    line = P.planned_gpu_hours((j.rule.name, j.resources) for j in workflow.dag.needrun_jobs())
    if line:
        print(line)


# Hessian-alignment DG runs (dg.smk)
DG = config["dg"]


def dg_dir(dataset, algorithm):
    return f"{RESULTS}/dg/{dataset}/{algorithm}"


def dg_summaries():
    return [f"{dg_dir(d, a)}/summary.json" for d in DG["datasets"] for a in P.dg_algorithms(config)]


def dg_caption():
    # plain text: greg dg table escapes it
    steps = "the protocol's 501" if DG["steps"] is None else str(DG["steps"])
    return (
        f"Domain generalization (Hessian alignment), test-environment accuracy (%) of the last step, "
        f"mean ± std over {DG['restarts']} restarts, {steps} full-batch steps; best non-oracle test "
        "accuracy in bold."
    )


wildcard_constraints:
    dataset="|".join(sorted(config["datasets"])),
    arch="|".join(sorted(config["archs"])),
    seed=r"\d+",
    detector=P.EVAL_NAME,  # a detector, or a swept "<detector>~<setting>" (config detector_sweep)
    name=r"[A-Za-z0-9_]+",
    dg_dataset=r"[A-Za-z0-9_]+",
    algorithm=r"[A-Za-z0-9_]+",
