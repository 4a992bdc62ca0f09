"""The plan plane: workflow config (``config/config.yaml``) -> ``greg`` command-line arguments.

The only ``greg`` module the Snakefile imports (``workflow/rules/common.smk``). It reads the workflow config
and the preset files' names, never a run config's values: a hyper-parameter goes from a preset (or a
variant's ``set``) into ``greg train --config/--set`` untouched, and ``greg.config`` reads it there. It uses
the registries (``greg.methods``, ``greg.models``, ``greg.detectors``, ``greg.data``, ``greg.dg``) only to
know which names exist and whether a method trains on auxiliary outliers.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from greg import config as run_config
from greg import data, detectors, io, methods, models
from greg.dg.algorithms import DG_ALGORITHMS
from greg.dg.cli import ORDER as DG_ORDER
from greg.dg.datasets import DG_DATASETS
from greg.errors import ReportError, cap
from greg.latex import check_name
from greg.paper_compare import is_aliased, load_paper_results
from greg.tables import metric_column


def check_workflow_config(config: dict, schema_path: str | Path, config_files: Iterable[str | Path] = ()) -> None:
    """The workflow config against its schema (``workflow/schemas/config.schema.yaml``: names of datasets,
    archs, runs and labels match its one safe pattern, paths carry no wildcard or separator characters) and
    its seeds against the run config's seed rule (``greg.config.KEYS["seed"]``), each failure one line
    (``ReportError``) naming the key. ``config_files`` (the files Snakemake read) must not switch on YTE
    templating (``__use_yte__``): a config that does is code, refused unless ``GREG_ALLOW_YTE=1``."""
    import jsonschema  # a Snakemake dependency; only the workflow calls this

    for f in config_files:
        try:
            raw = io.yaml_load(Path(f).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue  # Snakemake read it; its own errors are not ours to restate
        if isinstance(raw, dict) and raw.get("__use_yte__") and os.environ.get("GREG_ALLOW_YTE") != "1":
            raise ReportError(f"config file {f}: __use_yte__ runs the Python expressions in it (YTE "
                              "templating); run only configs you trust, with GREG_ALLOW_YTE=1")
    schema = io.yaml_load(Path(schema_path).read_text(encoding="utf-8"))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        text = cap(error.message, 300)
        if error.validator == "not":  # jsonschema would print the negated schema
            text = f"{cap(repr(error.instance), 100)} is not {error.schema.get('description', 'allowed here')}"
        raise ReportError(f"config {where}: {text}")
    for i, seed in enumerate(config["seeds"]):
        try:
            run_config.check_value(f"config seeds[{i}]", seed, run_config.KEYS["seed"])
        except run_config.ConfigError as e:
            raise ReportError(str(e)) from None


def catalog_files(name: str) -> str:
    """The catalog's files of dataset ``name`` as ``file=checksum`` pairs: the download rule's param, so that a
    catalog change (a new or replaced file, a new checksum) reruns the download, instead of leaving a stale
    ready-stamp whose data every later evaluation refuses."""
    return ";".join(f"{r.filename}={r.checksum}" for r in data.spec(name).resources)


def run_dir(results: str, dataset: str, arch: str, run: str, seed: int) -> str:
    """``results/<dataset>/<arch>/<run>/seed<seed>``: the readable id of one training run."""
    return f"{results}/{dataset}/{arch}/{run}/seed{seed}"


def eval_csv(results: str, dataset: str, arch: str, run: str, seed: int, detector: str) -> str:
    return f"{run_dir(results, dataset, arch, run, seed)}/eval/{detector}/metrics.csv"


def alias(config: dict, kind: str, name: str) -> str:
    """Map a name through ``config['aliases'][kind]`` (the smoke config maps cifar10 -> tiny, etc.)."""
    return (config.get("aliases") or {}).get(kind, {}).get(name, name)


def ood_sets(config: dict, dataset: str) -> list[str]:
    try:
        return list(config["datasets"][dataset]["ood"])
    except KeyError:
        raise ReportError(f"dataset {dataset!r} is not in the workflow config's 'datasets'") from None


class _StandIns:
    """The aliases a table uses, as (kind, used, original): headers and caption name the data actually used,
    so a smoke table (config ``aliases``) cannot pass for a paper result."""

    def __init__(self, config: dict):
        self.config = config
        self.labels = config.get("labels") or {}
        self.seen: dict[tuple[str, str, str], None] = {}

    def name(self, n: str) -> str:
        return self.labels.get(n, n)

    def __call__(self, label: str, *originals: tuple[str, str | None]) -> str:
        """``label``, or "<used> (stand-in for <label>)" when an original name is aliased."""
        used = []
        for kind, original in originals:
            u = alias(self.config, kind, original) if original else original
            if u != original:
                self.seen[(kind, u, original)] = None
                used.append(self.name(u))
        return f"{', '.join(used)} (stand-in for {label})" if used else label

    def substitutes(self) -> list[str]:
        """"<used> for <original>" of each alias in the table (empty unless the config has ``aliases``)."""
        return [f"{self.name(u)} for {', '.join(self.name(o) for _, u2, o in self.seen if u2 == u)}"
                for u in dict.fromkeys(u for _, u, _ in self.seen)]


#: The caption's substitute of a rehearsal config (``rehearsal:`` set): its numbers test the pipeline only.
REHEARSAL_SUBSTITUTE = "the rehearsal: fake data (greg data fake), a few optimizer steps per run"


def substitute_data(config: dict) -> bool:
    """True when ``config`` runs something other than the paper's data -- a smoke config's ``aliases`` or the
    rehearsal's fakes: its tables and reproduction.md then say that the deltas to the paper mean nothing."""
    return is_aliased(config.get("aliases")) or bool(config.get("rehearsal"))


def _group_columns(name: str, g: dict, config: dict, dataset: str, stand_in: _StandIns) -> list[dict]:
    """A group's columns: ``ood`` is ``all`` (every OOD set of the dataset + mean), ``mean``, ``id`` (one
    column of the model's ID value, e.g. ID accuracy) or a list of OOD sets and ``mean``."""
    ood = g.get("ood", "all")
    if ood == "id":
        return [{"ood": "mean", "label": ""}]
    if ood == "all":
        cols = ood_sets(config, dataset) + ["mean"]
    elif ood == "mean":
        cols = ["mean"]
    else:
        cols = [o if o == "mean" else alias(config, "ood", o) for o in ood]
        known = set(ood_sets(config, dataset))
        bad = [o for o in cols if o != "mean" and o not in known]
        if bad:
            raise ReportError(f"table {name}: OOD set(s) {bad} not among {dataset}'s {sorted(known)}")
    back = {alias(config, "ood", o): o for o in (ood if isinstance(ood, list) else []) if o != "mean"}
    return [{"ood": o, "label": stand_in(stand_in.name(back[o]), ("ood", back[o])) if o in back
             else stand_in.labels.get(o, "Average" if o == "mean" else o)} for o in cols]


def _resolve_groups(name: str, spec: dict, config: dict, stand_in: _StandIns) -> list[dict]:
    groups = []
    for g in spec["groups"]:
        dataset = alias(config, "dataset", g["dataset"])
        label = g.get("label", stand_in.name(g["dataset"]))
        # the printed header: a group label names the network when the group has one (else the dataset); the
        # caption names the other substitutes
        if g.get("arch"):
            header = stand_in(label, ("dataset", g["dataset"]), ("arch", g["arch"]))
        elif "label" not in g:
            header = stand_in(label, ("dataset", g["dataset"]))
        else:
            header = label
            stand_in(label, ("dataset", g["dataset"]))  # recorded for the caption only
        group = {
            "label": label,  # the paper's (greg.paper_compare.attach_paper matches on it)
            "header": header,
            "dataset": dataset,
            "arch": alias(config, "arch", g["arch"]) if "arch" in g else None,
            "columns": _group_columns(name, g, config, dataset, stand_in),
        }
        if g.get("metrics"):
            group["metrics"] = list(g["metrics"])
        groups.append(group)
    return groups


def _assumptions_of(assumptions: dict, config: dict, run: str, detector: str, original: dict) -> list[str]:
    """Keys of the assumptions a cell's recipe rests on: those declared for its run (and detector) on its paper
    dataset and arch, and, for a run that fine-tunes the CE model there, the CE model's (the paper's names
    throughout, so that an aliased run shows the marks of the cell it stands in for)."""
    def matching(r: str) -> set[str]:
        return {k for k, a in assumptions.items() if r in a["runs"]
                and detector in a.get("detectors", [detector])
                and original["dataset"] in a.get("datasets", [original["dataset"]])
                and original["arch"] in a.get("archs", [original["arch"]])}

    found = matching(run)
    if run != "pretrain" and run_spec(config, run, original["dataset"])["init"] == "pretrain":
        found |= matching("pretrain")
    return [k for k in assumptions if k in found]


def _resolve_row(name: str, r: dict, g_specs: list[dict], groups: list[dict], config: dict,
                 stand_in: _StandIns, unavailable: Callable[[dict], str | None], assumptions: dict) -> dict:
    run = r["run"]
    variants = config["variants"]
    if run != "pretrain" and run not in variants:
        raise ReportError(f"table {name}: row {r.get('label', run)!r}: run {run!r} is neither 'pretrain' "
                          f"nor a variant in the workflow config ({', '.join(sorted(variants))})")
    detector = r.get("detector") or (variants.get(run, {}).get("detector") if run != "pretrain" else None)
    if not detector:
        raise ReportError(f"table {name}: row {r.get('label', run)!r} needs a detector")
    cells = []
    for g_spec, g in zip(g_specs, groups):
        dataset = alias(config, "dataset", r["dataset"]) if "dataset" in r else g["dataset"]
        arch = alias(config, "arch", r["arch"]) if "arch" in r else g["arch"]
        if arch is None:
            raise ReportError(f"table {name}: row {r.get('label', run)!r} has no arch (give it in the "
                              "group or the row)")
        cell = {"dataset": dataset, "arch": arch, "run": run, "detector": detector}
        reason = unavailable(cell)
        cell["na"] = reason
        cell["files"] = [] if reason else [eval_csv(config["results"], dataset, arch, run, s, detector)
                                           for s in config["seeds"]]
        # assumptions are declared on the paper's names (the smoke run's aliased cells show them too)
        original = {"dataset": r.get("dataset", g_spec["dataset"]), "arch": r.get("arch", g_spec.get("arch"))}
        cell["assumptions"] = _assumptions_of(assumptions, config, run, detector, original)
        cells.append(cell)
    section = r.get("section")
    if "dataset" in r:
        stand_in("", ("dataset", r["dataset"]))
    return {"label": r.get("label", run), "section": section, "cells": cells,
            "section_header": stand_in(section, ("arch", r["arch"])) if section and "arch" in r else section}


def resolve_table(name: str, spec: dict, config: dict,
                  unavailable: Callable[[dict], str | None] = lambda cell: None,
                  assumptions: dict | None = None) -> dict:
    """Turn one ``config/tables.yaml`` entry into a self-contained, JSON-able table spec.

    Each column group gives ``dataset``/``arch`` (aliased through ``config['aliases']``), ``ood``: a list
    of OOD sets and/or ``mean``, or ``all`` (every OOD set of the dataset, then ``mean``), ``mean``, or ``id``
    (one column of the model's ID value), and optionally its own ``metrics``. Each row gives ``run``
    (``pretrain`` or a variant of ``config['variants']``) and optionally ``detector`` (default: the variant's
    detector), ``dataset``/``arch`` (override the group's). ``unavailable(cell)`` returns a reason when the
    cell cannot be produced (method/detector/model/dataset not implemented): the cell is then ``na`` and
    lists no files. ``assumptions`` (:func:`load_assumptions`) marks the cells whose recipe rests on one.
    """
    fpr = spec.get("fpr", "fpr95_idpos")
    metrics = list(spec.get("metrics", ["fpr95", "auroc"]))
    for m in metrics + [m for g in spec["groups"] for m in g.get("metrics") or []]:
        metric_column(m, fpr)
    assumptions = assumptions or {}
    stand_in = _StandIns(config)
    groups = _resolve_groups(name, spec, config, stand_in)
    rows = [_resolve_row(name, r, spec["groups"], groups, config, stand_in, unavailable, assumptions)
            for r in spec["rows"]]
    used = {a for row in rows for c in row["cells"] for a in c["assumptions"]}
    return {
        "name": check_name(name),
        "caption": spec.get("caption", name),
        "fpr": fpr,
        "metrics": metrics,
        "digits": int(spec.get("digits", 2)),
        "show_std": bool(spec.get("show_std", True)),
        "best": spec.get("best", "mean"),
        "groups": groups,
        "rows": rows,
        "assumptions": {k: a["note"] for k, a in assumptions.items() if k in used},
        "substitutes": stand_in.substitutes() + ([REHEARSAL_SUBSTITUTE] if config.get("rehearsal") else []),
    }


# the keys of an `assumptions` entry of a table-layout file and their types
ASSUMPTION_KEYS = {"note": str, "runs": list, "datasets": list, "archs": list, "detectors": list}


def load_assumptions(path: str | Path) -> dict[str, dict]:
    """The ``assumptions`` of a table-layout file: key -> ``{note, runs, datasets?, archs?, detectors?}`` (a
    recipe that neither the paper nor the released code gives; its cells carry a mark)."""
    path = Path(path)
    entries = io.yaml_load(path.read_text(encoding="utf-8")) or {}
    out = (entries.get("assumptions") or {}) if isinstance(entries, dict) else {}
    if not isinstance(out, dict):
        raise ReportError(f"{path}: assumptions: expected a mapping of key -> "
                          "{note, runs, datasets, archs, detectors}")
    for k, a in out.items():
        check_name(k, f"{path}: assumption key")
        if not isinstance(a, dict) or "note" not in a or "runs" not in a:
            raise ReportError(f"{path}: assumptions.{k}: expected a mapping with 'note' and 'runs'")
        for key, value in a.items():
            if key not in ASSUMPTION_KEYS or not isinstance(value, ASSUMPTION_KEYS[key]):
                raise ReportError(f"{path}: assumptions.{k}.{key}: allowed keys: note (text), runs, datasets, "
                                  "archs, detectors (lists of names)")
    return out


def quick_table(resolved: dict, cells: Iterable[tuple[str, str, str]]) -> dict | None:
    """``resolved`` (:func:`resolve_table`) cut to the cells whose (dataset, arch, run) is in ``cells``: column
    groups and rows left without such a cell are dropped, the other cells of a kept row become n/a. ``None``
    when no cell is kept (``repro_quick``, which resolves the tables with its one seed)."""
    keep = set(cells)

    def kept(c: dict) -> bool:
        return not c.get("na") and (c["dataset"], c["arch"], c["run"]) in keep

    groups = [i for i in range(len(resolved["groups"])) if any(kept(r["cells"][i]) for r in resolved["rows"])]
    rows = []
    for r in resolved["rows"]:
        if not any(kept(r["cells"][i]) for i in groups):
            continue
        cut = []
        for i in groups:
            c = dict(r["cells"][i])
            if not kept(c):
                c["na"], c["files"] = c.get("na") or "not in repro_quick", []
            cut.append(c)
        rows.append({**r, "cells": cut})
    if not rows:
        return None
    return {**resolved, "groups": [resolved["groups"][i] for i in groups], "rows": rows}


def planned_gpu_hours(jobs: Iterable[tuple[str, Any]]) -> str | None:
    """One line for Snakemake's ``onstart``: the GPU jobs of ``jobs`` ((rule name, resources mapping) pairs)
    and the GPU-hours they reserve (each job's ``runtime`` limit in minutes x its ``gpu``); ``None`` without
    GPU jobs. A job whose resources cannot be read (a profile's odd override) is counted apart: this line
    must never stop a run."""
    kinds: dict[str, int] = {}
    hours, unread = 0.0, 0
    for rule, res in jobs:
        try:
            gpus = int(res.get("gpu", 0) or 0)
            if gpus > 0:
                hours += float(res.get("runtime", 0) or 0) / 60 * gpus
                kinds[rule] = kinds.get(rule, 0) + 1
        except (TypeError, ValueError, AttributeError):
            unread += 1
    if not kinds:
        return None
    listed = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return (f"planned: {sum(kinds.values())} GPU jobs ({listed}), at most {hours:.1f} GPU-hours reserved (each "
            f"job's runtime limit; docs/WORKFLOW.md has the expected cost)"
            + (f"; {unread} jobs' resources unreadable" if unread else ""))


def load_tables(path: str | Path) -> dict[str, dict]:
    """The table entries of a layout file (``config/tables.yaml``): keys starting with ``_`` hold YAML
    anchors and ``assumptions`` the marked recipes (:func:`load_assumptions`). Table names must be
    identifiers (a ``\\label``, a rule name and a file stem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tables file not found: {path}")
    entries = io.yaml_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(entries, dict):
        raise ReportError(f"{path}: expected a mapping of table name -> layout")
    tables = {k: v for k, v in entries.items() if not str(k).startswith("_") and k != "assumptions"}
    for k, v in tables.items():
        check_name(k, f"{path}: table name")
        missing = [key for key in ("caption", "groups", "rows") if key not in (v or {})]
        if missing:
            raise ReportError(f"{path}: table {k!r} lacks {', '.join(missing)}")
    return tables


def paper_tables(path: str | Path) -> list[str]:
    """The names of the tables the paper prints (``config/paper_results.yaml``): those get the comparison."""
    return list(load_paper_results(path)["tables"])


def run_spec(config: dict, run: str, dataset: str) -> dict:
    """The training recipe of ``run`` on ``dataset``: ``{configs, set, init}`` (``pretrain`` or a variant)."""
    if run == "pretrain":
        v, init = config["pretrain"], "scratch"
    else:
        if run not in config["variants"]:
            raise ReportError(f"unknown run {run!r}; variants: {', '.join(sorted(config['variants']))}")
        v = config["variants"][run]
        init = (v.get("init_by_dataset") or {}).get(dataset, v.get("init", "pretrain"))
    sets = {**(v.get("set") or {}), **((v.get("set_by_dataset") or {}).get(dataset) or {})}
    return {"configs": list(v["configs"]), "set": sets, "init": init}


def run_method(config: dict, run: str, dataset: str) -> str:
    """Method name a run trains with: the last ``method.name`` of its presets, unless ``set`` overrides it."""
    spec = run_spec(config, run, dataset)
    name = spec["set"].get("method.name")
    if name is None:
        missing = [f for f in spec["configs"] if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"run {run!r}: preset {missing[0]} not found")
        name = (run_config.load_presets(spec["configs"]).get("method") or {}).get("name")
    return name or run_config.DEFAULTS["method"]["name"]


def run_needs_aux(config: dict, run: str, dataset: str) -> bool:
    """Whether a run trains on auxiliary outliers: its method class's ``needs_aux`` (read from the registry,
    no Method is built). SAM fine-tuning makes its pseudo-OOD from the ID batch. A method name the registry
    does not know gets True: its cells are n/a (:func:`registry_checker`), so no job of it is planned."""
    if run == "pretrain":
        return False
    name = run_method(config, run, dataset)
    return bool(methods.METHODS.get(name).needs_aux) if name in methods.METHODS else True


def yaml_value(v: Any) -> str:
    """A ``--set`` value that ``greg train`` parses back (YAML flow style, one line)."""
    return yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def pretrain_import(config: dict, dataset: str, arch: str) -> str | None:
    """The released checkpoint (a ``weights`` entry of the data catalog) that replaces CE training of
    (dataset, arch), or None: ``pretrain.import``. The workflow downloads it like a dataset."""
    by_arch = ((config.get("pretrain") or {}).get("import") or {}).get(dataset) or {}
    return by_arch.get(arch) or None


def train_args(config: dict, dataset: str, arch: str, run: str, seed: int | str) -> list[str]:
    """Arguments of ``greg train`` (without ``--out``) for one run; shell-quote them before use.

    ``pretrain`` of a pair listed in ``pretrain.import`` imports that file as the run checkpoint: 0 epochs
    (and no ``max_steps`` cap, which ``train_set`` may set), ``init.kind = pretrained``; these settings come
    last so that no other ``--set`` turns the import back into training.
    """
    spec = run_spec(config, run, dataset)
    a = config["archs"][arch]
    ds = config["datasets"][dataset]
    sets: dict[str, Any] = {
        "seed": int(seed),
        "model.name": a["model"],
        "model.kwargs": a.get("kwargs") or {},
        "data.root": config["data_root"],
        "data.id": dataset,
    }
    if run_needs_aux(config, run, dataset):
        sets["data.aux"] = ds["aux"]
    if spec["init"] == "pretrain":
        sets["init.checkpoint"] = f"{run_dir(config['results'], dataset, arch, 'pretrain', seed)}/final.pt"
        sets["init.kind"] = "run"
    sets.update(ds.get("set") or {})
    sets.update(spec["set"])
    sets.update(config.get("train_set") or {})
    imported = pretrain_import(config, dataset, arch) if run == "pretrain" else None
    if imported:
        # the catalog name, resolved under --data-root by greg train: data_root stays out of the run's identity
        sets.update({"init.checkpoint": imported, "init.kind": "pretrained", "init.skip_head": False,
                     "train.epochs": 0, "train.max_steps": None})
    args: list[str] = []
    for f in spec["configs"]:
        args += ["--config", f]
    for k, v in sets.items():
        if k not in run_config.RUNTIME_KEYS:  # they reach greg train through train_runtime_args
            args += ["--set", f"{k}={yaml_value(v)}"]
    return args


def check_run_configs(config: dict, cells: Iterable[tuple[str, str, str]]) -> None:
    """Resolve and validate (``greg.config.load_config``) the run config of every (dataset, arch, run) the
    workflow will train, so that a typo in ``train_set`` / ``set`` / ``set_by_dataset`` (``train.epochz``)
    fails the dry run with one line instead of every training job. ``ReportError`` names the run."""
    for dataset, arch, run in dict.fromkeys(cells):
        args = train_args(config, dataset, arch, run, 0) + train_runtime_args(config)
        files = [v for k, v in itertools.pairwise(args) if k == "--config"]
        sets = [v for k, v in itertools.pairwise(args) if k == "--set"]
        try:
            run_config.load_config(files, sets)
        except (ValueError, OSError) as e:
            raise ReportError(f"config: run {run!r} of {dataset}/{arch}: {e}") from None


def train_runtime_args(config: dict) -> list[str]:
    """The runtime-only part of every ``greg train`` call (``greg.config.RUNTIME_KEYS``): ``--data-root``
    and the runtime keys of ``train_set`` (e.g. the smoke run's ``data.num_workers: 0``, which then wins
    over the rule's ``--workers {threads}``). Not part of a run's identity: the workflow passes them outside
    the rule params, so editing them never reruns (or deletes) a trained model. Shell-quote before use."""
    args = ["--data-root", str(config["data_root"])]
    for k, v in (config.get("train_set") or {}).items():
        if k in run_config.RUNTIME_KEYS and k != "data.root":
            args += ["--set", f"{k}={yaml_value(v)}"]
    return args


def dg_algorithms(config: dict) -> list[str]:
    """The ``dg`` section's algorithms; unset: every registered one, in ``greg dg table``'s row order."""
    return list(config["dg"].get("algorithms") or DG_ORDER)


def dg_run_args(config: dict, dataset: str, algorithm: str) -> list[str]:
    """Arguments of ``greg dg run`` (without ``--out`` and ``--device``) for one (dataset, algorithm) of the
    ``dg`` config section (docs/DG.md); shell-quote them before use."""
    dg = config["dg"]  # its defaults: the workflow schema's (set when the Snakefile validates the config)
    args = ["--dataset", dataset, "--algorithm", algorithm, "--restarts", str(int(dg["restarts"])),
            "--seed", str(int(dg["seed"])), "--hparams-seed", str(int(dg["hparams_seed"])),
            "--data-root", str(config["data_root"])]
    if dg.get("steps") is not None:
        args += ["--steps", str(int(dg["steps"]))]
    for k, v in ((dg.get("set_by_algorithm") or {}).get(algorithm) or {}).items():
        args += ["--set", f"{k}={yaml_value(v)}"]
    return args


def check_extra_names(config: dict) -> None:
    """Fail (``ReportError`` naming the config key) when ``pretrain.import``, ``figures.fig_sam.runs`` or the
    ``dg`` section name a dataset, arch, run, DG dataset or DG algorithm that does not exist (the figure
    labels' rule is the schema's, :func:`check_workflow_config`)."""
    for dataset, by_arch in ((config.get("pretrain") or {}).get("import") or {}).items():
        for arch, path in (by_arch or {}).items():
            if path and (dataset not in config["datasets"] or arch not in config["archs"]):
                raise ReportError(f"config pretrain.import.{dataset}.{arch}: unknown dataset or arch (datasets: "
                                  f"{sorted(config['datasets'])}, archs: {sorted(config['archs'])})")
            if path and path not in data.names("weights"):
                raise ReportError(f"config pretrain.import.{dataset}.{arch}: {path!r} is not a released "
                                  f"checkpoint of the data catalog (known: {data.names('weights')})")
    variants = config.get("variants") or {}
    fig = (config.get("figures") or {}).get("fig_sam") or {}
    for label, run in (fig.get("runs") or {}).items():
        if run != "pretrain" and run not in variants:
            raise ReportError(f"config figures.fig_sam.runs[{label!r}]: unknown run {run!r} "
                              f"(pretrain or one of {sorted(variants)})")
    dg = config.get("dg") or {}
    if dg.get("datasets"):
        for key, known in (("datasets", DG_DATASETS.names()), ("algorithms", DG_ALGORITHMS.names())):
            bad = [n for n in dg.get(key) or [] if n not in known]
            if bad:
                raise ReportError(f"config dg.{key}: unknown {bad} (known: {sorted(known)})")
        for algorithm in dg.get("set_by_algorithm") or {}:
            if algorithm not in DG_ALGORITHMS.names():
                raise ReportError(f"config dg.set_by_algorithm: unknown algorithm {algorithm!r} "
                                  f"(known: {sorted(DG_ALGORITHMS.names())})")


def registry_checker(config: dict) -> Callable[[dict], str | None]:
    """``unavailable(cell)`` from the package registries: a reason string when the cell's method, model,
    detector or dataset is not implemented, else None."""
    known = {
        "method": set(methods.METHODS.names()),
        "model": set(models.MODELS.names()),
        "detector": set(detectors.DETECTORS.names()),
        "dataset": set(data.DATASETS.names()),
    }
    cache: dict[tuple, str | None] = {}

    def unavailable(cell: dict) -> str | None:
        key = (cell["dataset"], cell["arch"], cell["run"], cell["detector"])
        if key not in cache:
            ds = config["datasets"].get(cell["dataset"], {})
            wanted = [("method", run_method(config, cell["run"], cell["dataset"])),
                      ("model", config["archs"][cell["arch"]]["model"]),
                      ("detector", cell["detector"]), ("dataset", cell["dataset"])]
            wanted += [("dataset", d) for d in ds.get("ood", [])]
            if cell["run"] != "pretrain":
                wanted.append(("dataset", ds.get("aux")))
            missing = [f"{kind} {name!r}" for kind, name in wanted
                       if name not in known[kind]]
            cache[key] = f"not implemented: {', '.join(missing)}" if missing else None
        return cache[key]

    return unavailable


def table_inputs(resolved: dict) -> list[str]:
    """Every metrics.csv a resolved table reads (the rule's inputs), without duplicates, in order."""
    seen: dict[str, None] = {}
    for row in resolved["rows"]:
        for cell in row["cells"]:
            for f in [*cell["files"], *(f for files in (cell.get("sweep") or {}).values() for f in files)]:
                seen.setdefault(f, None)
    return list(seen)


# ------------------------------------------------------------------------------------ post-hoc detectors
# ``detector_kwargs`` (workflow config): detector -> dataset or "<dataset>/<arch>" -> ``greg evaluate
# --detector-kwargs``; ``detector_sweep``: detectors also evaluated with every distinct listed setting, each
# in its own eval directory "<detector>~<setting tag>" (the default setting keeps "<detector>").

SWEEP_SEP = "~"
EVAL_NAME = r"[A-Za-z0-9_]+(~[A-Za-z0-9_.+-]+)?"  # an eval directory name (the workflow's wildcard constraint)


def detector_kwargs(config: dict, dataset: str, arch: str, detector: str) -> dict[str, Any]:
    """The detector arguments of one (dataset, arch) cell: the dataset's entry, updated by the
    "<dataset>/<arch>" entry; {} (the detector's defaults) when neither is listed."""
    by_key = (config.get("detector_kwargs") or {}).get(detector) or {}
    return {**(by_key.get(dataset) or {}), **(by_key.get(f"{dataset}/{arch}") or {})}


def _tag(kwargs: dict[str, Any]) -> str:
    """A readable, stable directory-name part for one setting: sorted ``<key><value>`` joined by ``+``."""
    return "+".join(f"{k}{v}" for k, v in sorted(kwargs.items()))


def sweep_settings(config: dict, detector: str) -> list[dict[str, Any]]:
    """The distinct settings ``detector_kwargs`` lists for ``detector``, in config order ([] without any)."""
    out: list[dict[str, Any]] = []
    for kw in ((config.get("detector_kwargs") or {}).get(detector) or {}).values():
        if kw and kw not in out:
            out.append(dict(kw))
    return out


def detector_evals(config: dict, dataset: str, arch: str, detector: str) -> list[str]:
    """The eval directory names of a (dataset, arch, detector) cell: ``[detector]``, plus, when the detector
    is in ``detector_sweep``, ``<detector>~<tag>`` for each other setting of :func:`sweep_settings`."""
    names = [detector]
    if detector in (config.get("detector_sweep") or []):
        own = detector_kwargs(config, dataset, arch, detector)
        names += [f"{detector}{SWEEP_SEP}{_tag(kw)}" for kw in sweep_settings(config, detector) if kw != own]
    return names


def _eval_kwargs(config: dict, dataset: str, arch: str, name: str) -> tuple[str, dict[str, Any]]:
    """(detector, its arguments) of the eval directory ``name``: a detector, or a swept ``<detector>~<tag>``."""
    detector, _, tag = name.partition(SWEEP_SEP)
    if not tag:
        return detector, detector_kwargs(config, dataset, arch, detector)
    found = [kw for kw in sweep_settings(config, detector) if _tag(kw) == tag]
    if not found:
        raise ReportError(f"eval {name!r}: no setting of detector_kwargs.{detector} has the tag {tag!r}")
    return detector, found[0]


def evaluate_detector_args(config: dict, dataset: str, arch: str, names: str | list[str]) -> list[str]:
    """``--detector`` and ``--detector-kwargs`` of ``greg evaluate`` for one eval directory name (a detector,
    or a swept ``<detector>~<tag>``) or several plain detectors in one process (the kwargs then keyed by
    detector), then ``evaluate_args``; shell-quote before use."""
    names = [names] if isinstance(names, str) else list(names)
    resolved = dict(_eval_kwargs(config, dataset, arch, n) for n in names)
    if len(resolved) != len(names):
        raise ReportError(f"greg evaluate of {names}: one process takes each detector once")
    args = ["--detector", ",".join(resolved)]
    kwargs = next(iter(resolved.values())) if len(names) == 1 else {d: kw for d, kw in resolved.items() if kw}
    if kwargs:
        args += ["--detector-kwargs", json.dumps(kwargs, sort_keys=True)]
    return args + [str(a) for a in config.get("evaluate_args") or []]


def check_detector_kwargs(config: dict) -> None:
    """Fail (``ReportError`` naming the config key) when ``detector_kwargs`` / ``detector_sweep`` name an
    unknown detector, dataset or arch, or give arguments the detector does not take or accept."""
    for detector, by_key in (config.get("detector_kwargs") or {}).items():
        where = f"config detector_kwargs.{detector}"
        if detector not in detectors.DETECTORS:
            raise ReportError(f"{where}: unknown detector (known: {detectors.DETECTORS.names()})")
        for key, kwargs in (by_key or {}).items():
            dataset, _, arch = key.partition("/")
            if dataset not in config["datasets"] or (arch and arch not in config["archs"]):
                raise ReportError(f"{where}.{key}: unknown dataset or arch (datasets: {sorted(config['datasets'])}"
                                  f", archs: {sorted(config['archs'])})")
            try:
                run_config.check_kwargs(kwargs or {}, detectors.DETECTORS.get(detector), f"{where}.{key}")
                detectors.create(detector, **(kwargs or {}))
            except (ValueError, TypeError) as e:
                raise ReportError(f"{where}.{key}: {e}") from None
    for detector in config.get("detector_sweep") or []:
        for kw in sweep_settings(config, detector):
            if not re.fullmatch(EVAL_NAME, f"{detector}{SWEEP_SEP}{_tag(kw)}"):
                raise ReportError(f"config detector_sweep: setting {kw} of {detector!r} makes the directory name "
                                  f"{_tag(kw)!r}; swept settings need scalar values (letters, digits, _ . + -)")
        if len(sweep_settings(config, detector)) < 2:
            raise ReportError(f"config detector_sweep: {detector!r} needs at least two distinct settings in "
                              f"detector_kwargs.{detector} (has {len(sweep_settings(config, detector))})")


def with_sweeps(resolved: dict, config: dict) -> dict:
    """A copy of a resolved table in which every available cell of a detector in ``detector_sweep`` lists
    ``sweep``: eval name (:func:`detector_evals`, the cell's own setting first) -> its per-seed metrics files,
    and whose caption says that such cells report the best setting, chosen on the test set
    (``greg.tables.choose_sweep_settings`` picks it). Unchanged when the table has no swept cell."""
    results, seeds = config.get("results", "results"), list(config["seeds"])
    swept: dict[str, int] = {}
    rows = []
    for row in resolved["rows"]:
        cells = []
        for cell in row["cells"]:
            names = [] if cell["na"] else detector_evals(config, cell["dataset"], cell["arch"], cell["detector"])
            if len(names) > 1:
                cell = {**cell, "sweep": {n: [eval_csv(results, cell["dataset"], cell["arch"], cell["run"], s, n)
                                              for s in seeds] for n in names}}
                swept[cell["detector"]] = max(swept.get(cell["detector"], 0), len(names))
            cells.append(cell)
        rows.append({**row, "cells": cells})
    if not swept:
        return resolved
    note = "; ".join(f"{d}: best of {n} settings" for d, n in swept.items())
    caption = (f"{resolved['caption']} ({note} per cell, chosen on the test set by the lowest mean FPR95 over "
               "seeds.)")
    return {**resolved, "rows": rows, "caption": caption}
