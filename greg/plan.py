"""The plan plane: workflow config (``config/config.yaml``) -> ``greg`` command-line arguments.

The only ``greg`` module the Snakefile imports (``workflow/rules/common.smk``). It reads the workflow config
and the preset files' names, never a run config's values: a hyper-parameter goes from a preset (or a
variant's ``set``) into ``greg train --config/--set`` untouched, and ``greg.config`` reads it there. It uses
the registries (``greg.methods``, ``greg.models``, ``greg.detectors``, ``greg.data``, ``greg.dg``) only to
know which names exist and whether a method trains on auxiliary outliers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from greg import config as run_config
from greg import data, detectors, io, methods, models
from greg.dg.algorithms import DG_ALGORITHMS
from greg.dg.datasets import DG_DATASETS
from greg.tables import FPR_CONVENTIONS, ReportError, metric_column


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


def resolve_table(name: str, spec: dict, config: dict,
                  unavailable: Callable[[dict], str | None] = lambda cell: None) -> dict:
    """Turn one ``config/tables.yaml`` entry into a self-contained, JSON-able table spec.

    Each column group gives ``dataset``/``arch`` (aliased through ``config['aliases']``) and ``ood``: a list
    of OOD sets and/or ``mean``, or ``all`` (every OOD set of the dataset, then ``mean``), or ``mean``.
    Each row gives ``run`` (``pretrain`` or a variant of ``config['variants']``) and optionally ``detector``
    (default: the variant's detector), ``dataset``/``arch`` (override the group's). ``unavailable(cell)``
    returns a reason when the cell cannot be produced (method/detector/model/dataset not implemented):
    the cell is then ``na`` and lists no files.
    """
    results = config.get("results", "results")
    seeds = list(config["seeds"])
    fpr = spec.get("fpr", "fpr95_idpos")
    metrics = list(spec.get("metrics", ["fpr95", "auroc"]))
    for m in metrics:
        metric_column(m, fpr)
    labels = {**(config.get("labels") or {})}
    name_of = lambda n: labels.get(n, n)
    # (kind, used, original) of every alias this table uses: headers and caption name the data actually used,
    # so a smoke table (config `aliases`) cannot pass for a paper result
    subs: dict[tuple[str, str, str], None] = {}

    def stand_in(label: str, *originals: tuple[str, str | None]) -> str:
        used = []
        for kind, original in originals:
            u = alias(config, kind, original) if original else original
            if u != original:
                subs[(kind, u, original)] = None
                used.append(name_of(u))
        return f"{', '.join(used)} (stand-in for {label})" if used else label

    groups = []
    for g in spec["groups"]:
        dataset = alias(config, "dataset", g["dataset"])
        ood = g.get("ood", "all")
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
        label = g.get("label", name_of(g["dataset"]))
        # the printed header: a group label names the network when the group has one (else the dataset); the
        # caption names the other substitutes
        if g.get("arch"):
            header = stand_in(label, ("dataset", g["dataset"]), ("arch", g["arch"]))
        elif "label" not in g:
            header = stand_in(label, ("dataset", g["dataset"]))
        else:
            header = label
            stand_in(label, ("dataset", g["dataset"]))  # recorded for the caption only
        back = {alias(config, "ood", o): o for o in (g["ood"] if isinstance(g.get("ood"), list) else [])
                if o != "mean"}
        groups.append({
            "label": label,  # the paper's (greg.tables.attach_paper matches on it)
            "header": header,
            "dataset": dataset,
            "arch": alias(config, "arch", g["arch"]) if "arch" in g else None,
            "columns": [{"ood": o, "label": stand_in(name_of(back[o]), ("ood", back[o])) if o in back
                         else labels.get(o, "Average" if o == "mean" else o)} for o in cols],
        })
    variants = config.get("variants", {})
    rows = []
    for r in spec["rows"]:
        run = r["run"]
        if run != "pretrain" and run not in variants:
            raise ReportError(f"table {name}: row {r.get('label', run)!r}: run {run!r} is neither 'pretrain' "
                              f"nor a variant in the workflow config ({', '.join(sorted(variants))})")
        detector = r.get("detector") or (variants.get(run, {}).get("detector") if run != "pretrain" else None)
        if not detector:
            raise ReportError(f"table {name}: row {r.get('label', run)!r} needs a detector")
        cells = []
        for g in groups:
            dataset = alias(config, "dataset", r["dataset"]) if "dataset" in r else g["dataset"]
            arch = alias(config, "arch", r["arch"]) if "arch" in r else g["arch"]
            if arch is None:
                raise ReportError(f"table {name}: row {r.get('label', run)!r} has no arch (give it in the "
                                  "group or the row)")
            cell = {"dataset": dataset, "arch": arch, "run": run, "detector": detector}
            reason = unavailable(cell)
            cell["na"] = reason
            cell["files"] = [] if reason else [eval_csv(results, dataset, arch, run, s, detector) for s in seeds]
            cells.append(cell)
        section = r.get("section")
        if "dataset" in r:
            stand_in("", ("dataset", r["dataset"]))
        rows.append({"label": r.get("label", run), "section": section, "cells": cells,
                     "section_header": stand_in(section, ("arch", r["arch"])) if section and "arch" in r
                     else section})
    return {
        "name": name,
        "caption": spec.get("caption", name),
        "fpr": fpr,
        "fpr_note": FPR_CONVENTIONS[fpr],
        "metrics": metrics,
        "digits": int(spec.get("digits", 2)),
        "show_std": bool(spec.get("show_std", True)),
        "groups": groups,
        "rows": rows,
        # "<used> for <original>" of each alias in the table (empty unless the config has `aliases`)
        "substitutes": [f"{name_of(u)} for {', '.join(name_of(o) for _, u2, o in subs if u2 == u)}"
                        for u in dict.fromkeys(u for _, u, _ in subs)],
    }


def load_tables(path: str | Path) -> dict[str, dict]:
    """The ``tableN`` entries of ``config/tables.yaml`` (keys starting with ``_`` hold YAML anchors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tables file not found: {path}")
    entries = io.yaml_load(path.read_text(encoding="utf-8")) or {}
    tables = {k: v for k, v in entries.items() if not str(k).startswith("_")}
    for k, v in tables.items():
        missing = [key for key in ("caption", "groups", "rows") if key not in (v or {})]
        if missing:
            raise ReportError(f"{path}: table {k!r} lacks {', '.join(missing)}")
    return tables


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


def dg_run_args(config: dict, dataset: str, algorithm: str) -> list[str]:
    """Arguments of ``greg dg run`` (without ``--out`` and ``--device``) for one (dataset, algorithm) of the
    ``dg`` config section (docs/DG.md); shell-quote them before use."""
    dg = config.get("dg") or {}
    args = ["--dataset", dataset, "--algorithm", algorithm, "--restarts", str(int(dg.get("restarts", 10))),
            "--seed", str(int(dg.get("seed", 0))), "--hparams-seed", str(int(dg.get("hparams_seed", 0))),
            "--data-root", str(config.get("data_root", "data"))]
    if dg.get("steps") is not None:
        args += ["--steps", str(int(dg["steps"]))]
    for k, v in ((dg.get("set_by_algorithm") or {}).get(algorithm) or {}).items():
        args += ["--set", f"{k}={yaml_value(v)}"]
    return args


def check_extra_names(config: dict) -> None:
    """Fail (``ReportError`` naming the config key) when ``pretrain.import``, ``figures.fig_sam.runs`` or the
    ``dg`` section name a dataset, arch, run, DG dataset or DG algorithm that does not exist."""
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
            for f in cell["files"]:
                seen.setdefault(f, None)
    return list(seen)
