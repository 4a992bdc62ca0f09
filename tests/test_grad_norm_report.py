"""`greg report grad-norm`: the mean input-gradient norm of the energy score per set and model, over seeds
(the CPU demo's mechanism figure), checked against a per-sample backward done here."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from greg import data, diagnostics, models
from greg.cli import main as greg_main


def test_grad_norm_rows_mean_and_sample_std_by_hand():
    rows = diagnostics.grad_norm_rows({"A": [{"d": 1.0, "o": 2.0}, {"d": 3.0, "o": 2.0}],
                                       "B": [{"d": 0.5, "o": 4.0}]}, {"d": "id", "o": "ood"})
    assert rows == [
        {"model": "A", "set": "d", "role": "id", "n_seeds": 2, "mean": 2.0, "std": pytest.approx(math.sqrt(2.0))},
        {"model": "A", "set": "o", "role": "ood", "n_seeds": 2, "mean": 2.0, "std": 0.0},
        {"model": "B", "set": "d", "role": "id", "n_seeds": 1, "mean": 0.5, "std": 0.0},  # one seed: 0, not NaN
        {"model": "B", "set": "o", "role": "ood", "n_seeds": 1, "mean": 4.0, "std": 0.0},
    ]
    text = diagnostics.format_grad_norm_csv(rows)
    assert text.splitlines()[:2] == ["model,set,role,n_seeds,mean,std", "A,d,id,2,2.0000,1.4142"]


def _per_sample_norms(ckpt, name, split, n, root) -> np.ndarray:
    """||d(-logsumexp f(x))/dx|| one image at a time (eval mode), on the subsample the command draws."""
    model, _ = models.load_checkpoint(ckpt, "cpu")
    model.eval()
    ds = data.subsample(data.load(name, split, root, id_dataset="tiny"), n, 0)
    out = []
    for i in range(len(ds)):
        x = ds[i][0][None].clone().requires_grad_(True)
        (-torch.logsumexp(model(x), dim=1)).sum().backward()
        out.append(x.grad.norm().item())
    return np.array(out)


def test_grad_norm_cli_matches_a_per_sample_backward(tmp_path):
    ckpts = {}
    for label, seeds in (("CE", (0, 1)), ("GReg", (2, 3))):
        ckpts[label] = []
        for seed in seeds:
            torch.manual_seed(seed)
            path = tmp_path / f"{label}{seed}.pt"
            models.save_checkpoint(path, models.create("small_cnn", 10), arch="small_cnn", num_classes=10)
            ckpts[label].append(str(path))
    out, table = tmp_path / "fig" / "grad_norm.pdf", tmp_path / "grad_norm.csv"
    argv = ["report", "grad-norm", "--id", "tiny", "--aux", "tiny_aux", "--ood", "tiny_faces", "--root",
            str(tmp_path), "--device", "cpu", "--max-samples", "8", "--labels-json", '{"tiny": "digits"}',
            "--csv", str(table), "--out", str(out)]
    for label, paths in ckpts.items():
        argv += ["--model", f"{label}={','.join(paths)}"]
    assert greg_main(argv) == 0
    assert out.read_bytes()[:4] == b"%PDF" and out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(table.open(newline="")))
    assert [(r["model"], r["set"], r["role"]) for r in rows] == [
        (m, s, role) for m in ("CE", "GReg") for s, role in (("digits", "id"), ("tiny_aux", "aux"), ("tiny_faces", "ood"))
    ]
    splits = {"digits": ("tiny", "test"), "tiny_aux": ("tiny_aux", "train"), "tiny_faces": ("tiny_faces", "test")}
    for r in rows:
        per_seed = [_per_sample_norms(c, *splits[r["set"]], 8, str(tmp_path)).mean() for c in ckpts[r["model"]]]
        assert r["n_seeds"] == "2"
        assert float(r["mean"]) == pytest.approx(np.mean(per_seed), abs=1e-4, rel=1e-4)
        assert float(r["std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-4, rel=1e-4)


def test_grad_norm_cli_bad_model_argument_is_one_line(tmp_path, capsys):
    argv = ["report", "grad-norm", "--id", "tiny", "--ood", "tiny_faces", "--root", str(tmp_path), "--device",
            "cpu", "--csv", str(tmp_path / "g.csv"), "--out", str(tmp_path / "g.pdf"), "--model", "no-label"]
    assert greg_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "LABEL=" in err[0]


def test_fig3_legend_does_not_show_unused_margins_of_an_auto_run(tmp_path):
    """With `margins: auto` the trainer fits m_in / m_out at step 0; the preset's values left in the config are
    not the run's, so fig3's legend says the margins were fitted instead of printing them."""
    from greg import figures

    run = tmp_path / "energy"
    run.mkdir()
    (run / "config.yaml").write_text("method:\n  name: energy\n  hparams: {m_in: -23.0, m_out: -5.0, margins: auto}\n")
    assert figures.run_margins([str(run / "metrics.jsonl")]) == "margins fitted to the start model"
