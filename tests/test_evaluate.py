"""greg.evaluate: the file-free core on a tiny model, CSV determinism, and the CLI on the tiny benchmark."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import greg.models as gm
from greg import detectors, scores
from greg.evaluate import (
    COLUMNS,
    evaluate,
    format_csv,
    metrics_from_scores_dir,
    metrics_table,
    save_scores,
    score_detectors,
)
from greg.metrics import ood_metrics


class TinyNet(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, k)

    def feature_map(self, x):
        return torch.relu(self.conv(x))

    def pool(self, f):
        return f.mean((2, 3))

    def features(self, x):
        return self.pool(self.feature_map(x))

    def forward(self, x):
        return self.head(self.features(x))


def data(n, shift, seed, labelled=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g) + shift
    y = torch.randint(0, 3, (n,), generator=g) if labelled else torch.full((n,), -1)
    return DataLoader(TensorDataset(x, y), batch_size=7)


def test_evaluate_core_matches_metrics_and_accuracy():
    model = TinyNet()
    id_loader = data(20, 1.0, 0)
    oods = {"a": data(15, 0.0, 1, False), "b": data(9, -1.0, 2, False)}
    sc, df = evaluate(model, id_loader, oods, "energy", "cpu")
    assert set(sc) == {"id", "a", "b"} and sc["id"].dtype == np.float32 and sc["a"].shape == (15,)
    x_id = id_loader.dataset.tensors[0]
    y_id = id_loader.dataset.tensors[1]
    with torch.no_grad():
        np.testing.assert_allclose(sc["id"], scores.energy(model(x_id)).numpy(), rtol=1e-6)
        acc = float((model(x_id).argmax(1) == y_id).float().mean())
    assert list(df.columns) == COLUMNS and list(df["ood_set"]) == ["a", "b", "mean"]
    row = df.set_index("ood_set")
    m = ood_metrics(sc["id"], sc["b"])
    assert row.loc["b", "auroc"] == pytest.approx(100 * m["auroc"])
    assert row.loc["b", "fpr95_idpos"] == pytest.approx(100 * m["fpr95"])
    assert row.loc["b", "fpr95_oodpos"] == pytest.approx(100 * m["fpr95_oodpos"])
    assert row.loc["a", "id_acc"] == pytest.approx(100 * acc)
    assert row.loc["mean", "n_ood"] == 24 and row.loc["mean", "n_id"] == 20
    assert row.loc["mean", "aupr_out"] == pytest.approx(
        (row.loc["a", "aupr_out"] + row.loc["b", "aupr_out"]) / 2
    )
    assert model.training  # scored in eval mode, caller's mode restored


def test_evaluate_fits_and_runs_gradient_detectors():
    model = TinyNet()
    fit = data(30, 1.0, 5)
    sc, _ = evaluate(
        model,
        data(10, 1.0, 0),
        {"o": data(8, 0.0, 1, False)},
        detectors.create("react"),
        "cpu",
        fit_loader=fit,
    )
    det = detectors.create("react").fit(model, fit, "cpu")
    with torch.inference_mode():
        ref = det.score(model, data(10, 1.0, 0).dataset.tensors[0]).numpy()
    np.testing.assert_allclose(sc["id"], ref, rtol=1e-6)
    # ODIN needs input gradients: evaluate must not run it under inference_mode.
    sc, df = evaluate(model, data(10, 1.0, 0), {"o": data(8, 0.0, 1, False)}, "odin", "cpu")
    assert np.isfinite(sc["o"]).all() and len(df) == 2


def test_accuracy_ignores_extra_absent_class():
    model = TinyNet(k=4)  # 3 ID classes + absent class
    with torch.no_grad():
        model.head.bias[3] = 100.0  # always predicts the absent class
    loader = data(12, 0.0, 0)
    out = score_detectors(
        model, loader, {"absent_class": detectors.create("absent_class")}, "cpu", with_predictions=True,
        num_classes=3,
    )
    with torch.no_grad():
        expected = model(loader.dataset.tensors[0])[:, :3].argmax(1).numpy()
    np.testing.assert_array_equal(out["pred"], expected)
    np.testing.assert_array_equal(out["labels"], loader.dataset.tensors[1].numpy())


def test_metrics_table_errors_name_the_set():
    with pytest.raises(ValueError, match="OOD set 'bad'"):
        metrics_table(np.zeros(3), {"bad": np.array([np.nan, 1.0])})
    with pytest.raises(ValueError, match="'id'"):
        evaluate(TinyNet(), data(4, 0, 0), {"id": data(4, 0, 1, False)}, "energy", "cpu")


def test_csv_is_byte_identical_when_rescored(tmp_path):
    model = TinyNet()
    sc, df = evaluate(model, data(20, 1.0, 0), {"a": data(15, 0.0, 1, False)}, "msp", "cpu")
    text = format_csv(df)
    assert text.splitlines()[0] == ",".join(COLUMNS)
    assert text == format_csv(metrics_table(sc["id"], {"a": sc["a"]}, df["id_acc"].iloc[0] / 100))
    # Same numbers through the npz files written by the CLI.
    # the npz keys: one detector named "scores", plus labels and pred
    out = score_detectors(model, data(20, 1.0, 0), {"scores": detectors.create("msp")}, "cpu",
                          with_predictions=True)
    save_scores(tmp_path / "id.npz", out)
    save_scores(tmp_path / "a.npz", {"scores": sc["a"]})
    assert format_csv(metrics_from_scores_dir(tmp_path, ["a"])) == text
    assert "0.0000" in format_csv(pd.DataFrame({"x": [0.0]}))  # fixed formatting, not repr


def test_cli_tiny_benchmark(tmp_path):
    from greg.cli import main

    torch.manual_seed(0)
    model = gm.create("small_cnn", 10, widths=[8, 16])
    ckpt = tmp_path / "final.pt"
    gm.save_checkpoint(
        ckpt, model, arch="small_cnn", num_classes=10, model_kwargs={"widths": [8, 16]}, meta={}
    )
    common = [
        "--id",
        "tiny",
        "--ood",
        "tiny_textures,tiny_uniform",
        "--root",
        str(tmp_path / "data"),
        "--device",
        "cpu",
        "--batch-size",
        "128",
        "--n-ood",
        "300",
    ]
    out = tmp_path / "react"
    argv = [
        "evaluate",
        "--checkpoint",
        str(ckpt),
        "--detector",
        "react",
        "--out",
        str(out),
        *common,
        "--detector-kwargs",
        '{"percentile": 80}',
        "--robustness",
        "--robustness-n",
        "32",
    ]
    assert main(argv) == 0
    df = pd.read_csv(out / "metrics.csv")
    assert list(df.columns) == COLUMNS and list(df["ood_set"]) == ["tiny_textures", "tiny_uniform", "mean"]
    assert df["n_id"].iloc[0] == 500 and list(df["n_ood"]) == [300, 300, 600]
    assert ((df[COLUMNS[3:]] >= 0) & (df[COLUMNS[3:]] <= 100)).all().all()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["detector"] == "react" and meta["detector_hparams"]["percentile"] == 80.0
    assert meta["subsample_seed"] == 0 and "fpr95_idpos" in meta["conventions"]
    with np.load(out / "scores" / "tiny_textures.npz") as z:
        assert z["scores"].shape == (300,) and len(np.unique(z["index"])) == 300
    with np.load(out / "scores" / "id.npz") as z:
        assert set(z.files) == {"scores", "labels", "pred", "index"}
    assert pd.read_csv(out / "robustness.csv")["ood_set"].tolist() == [
        "tiny_textures",
        "tiny_uniform",
        "mean",
    ]
    assert json.loads((out / "certified.json").read_text())["n"] == 32
    first = (out / "metrics.csv").read_bytes()
    assert (
        format_csv(metrics_from_scores_dir(out / "scores", ["tiny_textures", "tiny_uniform"])).encode()
        == first
    )
    # Re-running gives the same bytes (same subsample, same scores).
    assert main(argv[:-3]) == 0
    assert (out / "metrics.csv").read_bytes() == first

    # External weights: --arch/--num-classes with a bare state_dict.
    torch.save(model.state_dict(), tmp_path / "ext.pt")
    argv = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "ext.pt"),
        "--arch",
        "small_cnn",
        "--num-classes",
        "10",
        "--model-kwargs",
        '{"widths": [8, 16]}',
        "--detector",
        "msp",
        "--out",
        str(tmp_path / "ext"),
        *common,
    ]
    assert main(argv) == 0
    assert len(pd.read_csv(tmp_path / "ext" / "metrics.csv")) == 3


@pytest.mark.parametrize("detector", ["absent_class", "msp_known"])
def test_kplus1_detectors_refuse_a_k_class_model(tmp_path, capsys, detector):
    # msp_known (OpenMix's evaluation) drops the last logit: on a plain K-class model it would drop a real class
    from greg.cli import main

    model = gm.create("small_cnn", 10, widths=[8, 16])
    ckpt = tmp_path / "final.pt"
    gm.save_checkpoint(ckpt, model, arch="small_cnn", num_classes=10, model_kwargs={"widths": [8, 16]},
                       meta={"method": "ce"})
    argv = ["evaluate", "--checkpoint", str(ckpt), "--detector", detector, "--out", str(tmp_path / "ev"),
            "--id", "tiny", "--ood", "tiny_uniform", "--root", str(tmp_path / "data"), "--device", "cpu"]
    assert main(argv) == 2
    assert f"{detector} needs a (K+1)-class model" in capsys.readouterr().err
    assert not (tmp_path / "ev" / "metrics.csv").exists()


def test_shared_fit_equals_each_detectors_own_fit():
    """fit_detectors collects the ID features once; each detector still sees its own first max_fit_samples."""
    from greg.evaluate import fit_detectors

    model, fit = TinyNet(), data(30, 1.0, 5)
    shared = [detectors.create("react", max_fit_samples=10), detectors.create("dice"),
              detectors.create("mahalanobis", max_fit_samples=20)]
    fit_detectors(shared, model, fit, "cpu")
    own = [detectors.create("react", max_fit_samples=10), detectors.create("dice"),
           detectors.create("mahalanobis", max_fit_samples=20)]
    for d in own:
        d.fit(model, fit, "cpu")
    x = data(10, 0.0, 1).dataset.tensors[0]
    with torch.inference_mode():
        for a, b in zip(shared, own):
            assert torch.equal(a.score(model, x), b.score(model, x)), type(a).__name__
    assert shared[0].threshold != detectors.create("react").fit(model, fit, "cpu").threshold  # 10 rows, not 30


def _cli_ckpt(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "final.pt"
    gm.save_checkpoint(ckpt, gm.create("small_cnn", 10, widths=[8, 16]), arch="small_cnn", num_classes=10,
                       model_kwargs={"widths": [8, 16]}, meta={"method": "ce", "extra_classes": 0})
    return ckpt


def test_several_detectors_in_one_process_write_what_separate_runs_write(tmp_path, capsys):
    from greg.cli import main

    ckpt = _cli_ckpt(tmp_path)
    common = ["evaluate", "--checkpoint", str(ckpt), "--id", "tiny", "--ood", "tiny_textures,tiny_uniform",
              "--root", str(tmp_path / "data"), "--device", "cpu", "--n-ood", "100", "--fit-max-samples", "300"]
    for det in ("msp", "react"):
        assert main([*common, "--detector", det, "--out", str(tmp_path / "one" / det),
                     "--detector-kwargs", '{"percentile": 80}' if det == "react" else "{}"]) == 0
    both = [*common, "--detector", "msp,react", "--out", str(tmp_path / "many" / "{detector}"),
            "--detector-kwargs", '{"react": {"percentile": 80}}']
    assert main(both) == 0
    for det in ("msp", "react"):
        one, many = tmp_path / "one" / det, tmp_path / "many" / det
        assert (one / "metrics.csv").read_bytes() == (many / "metrics.csv").read_bytes()
        for f in ("id", "tiny_textures", "tiny_uniform"):
            with np.load(one / "scores" / f"{f}.npz") as a, np.load(many / "scores" / f"{f}.npz") as b:
                assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
        meta = json.loads((many / "meta.json").read_text())
        assert meta["detector"] == det and meta["request"]["checkpoint_sha256"]
    assert json.loads((tmp_path / "many" / "react" / "meta.json").read_text())["detector_hparams"]["percentile"] == 80
    # resumable: a rerun skips what is done; a missing metrics.csv is redone, alone
    capsys.readouterr()
    (tmp_path / "many" / "react" / "metrics.csv").unlink()
    assert main(both) == 0
    err = capsys.readouterr().err
    assert "msp/metrics.csv exists for this request: skipped" in err and "react/metrics.csv exists" not in err
    assert (tmp_path / "many" / "react" / "metrics.csv").read_bytes() == (
        tmp_path / "one" / "react" / "metrics.csv").read_bytes()
    # another request in the same directory is not "done"
    assert main([*both[:-2], "--detector-kwargs", '{"react": {"percentile": 90}}']) == 0
    assert json.loads((tmp_path / "many" / "react" / "meta.json").read_text())["detector_hparams"]["percentile"] == 90


@pytest.mark.parametrize("extra, match", [
    (["--detector", "msp,energy", "--out", "OUT"], "must contain '{detector}'"),
    (["--detector", "msp,energy", "--out", "OUT/{detector}", "--detector-kwargs", '{"percentile": 80}'],
     "keyed by detector name"),
    (["--detector", "msp,msp", "--out", "OUT/{detector}"], "--detector names must be unique"),
])
def test_several_detectors_argument_errors(tmp_path, capsys, extra, match):
    from greg.cli import main

    extra = [e.replace("OUT", str(tmp_path / "ev")) for e in extra]
    argv = ["evaluate", "--checkpoint", str(_cli_ckpt(tmp_path)), "--id", "tiny", "--ood", "tiny_uniform",
            "--root", str(tmp_path / "data"), "--device", "cpu", *extra]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
