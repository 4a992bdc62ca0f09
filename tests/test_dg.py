"""Hessian alignment / DG baselines: penalties against explicit formulas, data construction, CLI resume."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greg.dg import datasets, hparams_registry
from greg.dg import penalties as P
from greg.dg.algorithms import DG_ALGORITHMS, create


def _small_head(seed=0, d=4, k=3):
    torch.manual_seed(seed)
    head = nn.Linear(d, k).double()
    h = torch.randn(7, d, dtype=torch.float64)
    y = torch.randint(0, k, (7,))
    return head, h, y


def _explicit_hessian(head, h, y):
    """Full Hessian of the CE loss w.r.t. the flattened head parameters [W, b]."""
    shapes = [p.shape for p in head.parameters()]
    sizes = [p.numel() for p in head.parameters()]

    def f(theta):
        w, b = [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]
        return F.cross_entropy(F.linear(h, w, b), y)

    theta = torch.cat([p.detach().reshape(-1) for p in head.parameters()])
    return torch.autograd.functional.hessian(f, theta)


def test_hgp_equals_explicit_hessian_gradient_product():
    head, h, y = _small_head()
    loss = F.cross_entropy(head(h), y)
    g, hg = P.hessian_gradient_product(loss, list(head.parameters()))
    H = _explicit_hessian(head, h, y)
    torch.testing.assert_close(hg, H @ g.detach(), rtol=1e-10, atol=1e-12)
    # and it stays differentiable (the penalty must be trainable)
    assert hg.requires_grad


def test_hutchinson_converges_to_explicit_diagonal():
    head, h, y = _small_head(seed=1)
    loss = F.cross_entropy(head(h), y)
    H = _explicit_hessian(head, h, y)
    draws = 20000
    gen = torch.Generator().manual_seed(0)
    _, diag = P.hutchinson_diagonal(loss, list(head.parameters()), draws, gen, chunk=5000)
    # per-coordinate std of one draw is sqrt(sum_{j != i} H_ij^2)
    off = (H.pow(2).sum(1) - H.diagonal().pow(2)).sqrt()
    tol = 5 * off / math.sqrt(draws) + 1e-10
    assert torch.all((diag.detach() - H.diagonal()).abs() <= tol)
    # few draws are visibly noisier than many (the estimator is not exact by construction)
    _, rough = P.hutchinson_diagonal(loss, list(head.parameters()), 4, torch.Generator().manual_seed(1))
    assert (rough - H.diagonal()).abs().max() > (diag - H.diagonal()).abs().max()


def test_irm_penalty_by_hand():
    # BCE: dL(s z)/ds at s=1 = mean((sigmoid(z) - y) * z); z = [0, ln 3] -> sigmoid = [0.5, 0.75]
    z = torch.tensor([[0.0], [math.log(3.0)]])
    y = torch.tensor([1, 0])
    expected = (0.5 * (0.0 + 0.75 * math.log(3.0))) ** 2
    assert P.irm_penalty(z, y).item() == pytest.approx(expected, rel=1e-6)
    # CE with 2 logits at z = 0: dL/ds = mean_i sum_k (p_k - onehot_k) z_k = 0
    assert P.irm_penalty(torch.zeros(3, 2), torch.tensor([0, 1, 1])).item() == pytest.approx(0.0, abs=1e-12)


def test_vrex_penalty_by_hand():
    assert P.vrex_penalty(torch.tensor([1.0, 3.0])).item() == pytest.approx(1.0)
    # mean 1.2, deviations -0.7, -0.2, 0.9 -> (0.49 + 0.04 + 0.81) / 3
    assert P.vrex_penalty(torch.tensor([0.5, 1.0, 2.1])).item() == pytest.approx(1.34 / 3, rel=1e-6)


def test_fishr_penalty_against_closed_form():
    torch.manual_seed(0)
    head = nn.Linear(5, 1).double()
    feats = [torch.randn(9, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)]
    ys = [torch.randint(0, 2, (9,)), torch.randint(0, 2, (6,))]
    variances = []
    ref_vars = []
    for h, y in zip(feats, ys):
        g = P.per_sample_head_gradients(head, h, y)
        # BCE single logit: per-sample grad = (sigmoid(z) - y) * [h, 1]
        r = (torch.sigmoid(head(h)).squeeze(1) - y.double()).detach().numpy()
        ref = np.concatenate([r[:, None] * h.numpy(), r[:, None]], axis=1)
        np.testing.assert_allclose(g.detach().numpy(), ref, rtol=1e-10)
        variances.append(P.gradient_variance(g))
        ref_vars.append(np.var(ref, axis=0))
    mean_v = (ref_vars[0] + ref_vars[1]) / 2
    expected = (np.sum((ref_vars[0] - mean_v) ** 2) + np.sum((ref_vars[1] - mean_v) ** 2)) / 2
    assert P.fishr_penalty(variances).item() == pytest.approx(expected, rel=1e-10)


def test_coral_penalty_against_numpy():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(8, 3)), rng.normal(1.0, 2.0, size=(11, 3)), rng.normal(size=(5, 3))]

    def mmd(a, b):
        return np.mean((a.mean(0) - b.mean(0)) ** 2) + np.mean(
            (np.cov(a, rowvar=False) - np.cov(b, rowvar=False)) ** 2
        )

    expected = (mmd(xs[0], xs[1]) + mmd(xs[0], xs[2]) + mmd(xs[1], xs[2])) / 3
    got = P.coral_penalty([torch.from_numpy(x) for x in xs]).item()
    assert got == pytest.approx(expected, rel=1e-10)


def test_alignment_penalty_by_hand():
    # two domains [0, 0] and [2, 4]: mean [1, 2]; each ||.||^2 = 1 + 4
    a = P.alignment_penalty([torch.tensor([0.0, 0.0]), torch.tensor([2.0, 4.0])])
    assert a.item() == pytest.approx(5.0)


def test_color_environment_rates():
    rng = np.random.default_rng(0)
    n = 200_000
    digits = rng.integers(0, 10, n)
    images = np.ones((n, 2, 2), dtype=np.float32)
    for flip in (0.1, 0.2, 0.9):
        x, y, c = datasets.color_environment(images, digits, flip, rng)
        assert np.mean(y != (digits < 5)) == pytest.approx(0.25, abs=0.005)
        assert np.mean(c != y) == pytest.approx(flip, abs=0.005)
        # the image sits in channel c, the other channel is zero
        assert np.all(x[np.arange(n), c].sum((1, 2)) == 4) and np.all(x[np.arange(n), 1 - c] == 0)


def test_colored_digits_construction_statistics():
    envs = datasets.load("colored_digits", seed=3)
    assert envs.input_shape == (2, 8, 8) and envs.num_outputs == 1
    n_total = sum(len(e[1]) for e in envs.train + envs.val) + len(envs.test[1])
    assert n_total == 1797
    for (xt, yt), (xv, yv), flip in zip(envs.train, envs.val, datasets.TRAIN_COLOR_FLIPS):
        assert len(yv) / (len(yv) + len(yt)) == pytest.approx(0.2, abs=0.002)
        x, y = torch.cat([xt, xv]), torch.cat([yt, yv])
        colour = (x[:, 1].sum((1, 2)) > x[:, 0].sum((1, 2))).long()
        assert (colour != y).float().mean().item() == pytest.approx(flip, abs=0.06)
    x, y = envs.test
    colour = (x[:, 1].sum((1, 2)) > x[:, 0].sum((1, 2))).long()
    assert (colour != y).float().mean().item() == pytest.approx(0.9, abs=0.06)
    # label noise: recover the digits from the permutation used by the builder
    images, digits = datasets.load_digits_arrays()
    perm = np.random.default_rng(3).permutation(len(digits))
    n_train = (2 * len(digits)) // 3
    test_digits = digits[perm][n_train:]
    assert np.mean(y.numpy() != (test_digits < 5)) == pytest.approx(0.25, abs=0.06)
    np.testing.assert_allclose(x.sum(1).numpy(), images[perm][n_train:], atol=1e-6)


def test_label_shift_priors():
    envs = datasets.load("colored_digits_ls", seed=0)
    ys = [torch.cat([t[1], v[1]]) for t, v in zip(envs.train, envs.val)] + [envs.test[1]]
    for y, prior in zip(ys, datasets.LABEL_SHIFT_PRIORS):
        assert y.float().mean().item() == pytest.approx(prior, abs=0.01)


def test_hparams_registry():
    d = hparams_registry.default_hparams("hgp", "colored_digits")
    assert (d["alpha"], d["beta"]) == (1e-4, 5e-3)
    d = hparams_registry.default_hparams("hutchinson", "colored_mnist")
    assert (d["alpha"], d["beta"], d["mlp_width"], d["penalty_anneal_iters"]) == (1e-3, 5e-3, 390, 190)
    r1 = hparams_registry.random_hparams("irm", "colored_mnist", 5)
    assert r1 == hparams_registry.random_hparams("irm", "colored_mnist", 5)
    assert r1 != hparams_registry.random_hparams("irm", "colored_mnist", 6)
    assert set(r1) == set(hparams_registry.default_hparams("irm", "colored_mnist"))
    with pytest.raises(KeyError):
        hparams_registry.default_hparams("nope", "colored_mnist")


@pytest.mark.parametrize("name", DG_ALGORITHMS.names())
def test_every_algorithm_updates(name):
    torch.manual_seed(0)
    hp = hparams_registry.default_hparams(name, "colored_digits")
    hp.update(mlp_width=8, penalty_anneal_iters=1)
    if name == "hutchinson":
        hp["hutchinson_draws"] = 8
    alg = create(name, (2, 4, 4), 1, 2, hp)
    batches = [(torch.rand(6, 2, 4, 4), torch.randint(0, 2, (6,))) for _ in range(2)]
    before = [p.detach().clone() for p in alg.network.parameters()]
    opt0 = alg.optimizer
    out = [alg.update(batches) for _ in range(2)][-1]
    assert all(math.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, alg.network.parameters()))
    assert alg.predict(batches[0][0]).shape == (6, 1)
    # Adam is re-created when the penalty switches on (update 1), only for penalized algorithms
    assert (alg.optimizer is not opt0) == alg.penalized
    if alg.penalized:
        assert out["penalty_weight"] == hp["penalty_weight"]


def test_hessian_penalties_vanish_for_identical_domains():
    hp = hparams_registry.default_hparams("hgp", "colored_digits") | {"mlp_width": 8}
    alg = create("hgp", (2, 4, 4), 1, 2, hp)
    b = (torch.rand(6, 2, 4, 4), torch.randint(0, 2, (6,)))
    out = alg.update([b, b])
    assert out["hess_penalty"] == 0.0 and out["grad_penalty"] == 0.0


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_run_resume_and_table(tmp_path, capsys):
    from greg.cli import main

    out = tmp_path / "hgp"
    base = [
        "dg",
        "run",
        "--dataset",
        "colored_digits",
        "--algorithm",
        "hgp",
        "--out",
        str(out),
        "--steps",
        "3",
        "--device",
        "cpu",
        "--set",
        "mlp_width=16",
    ]
    assert main(base + ["--restarts", "2"]) == 0
    rows = _read_csv(out / "results.csv")
    assert [int(r["restart"]) for r in rows] == [0, 1]
    assert set(rows[0]) >= {"train_acc", "val_acc", "test_acc"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_restarts"] == 2
    assert summary["test_acc"]["mean"] == pytest.approx(
        np.mean([float(r["test_acc"]) for r in rows]), abs=1e-3
    )
    capsys.readouterr()
    # resume: only restart 2 is trained; restarts 0-1 are kept verbatim
    assert main(base + ["--restarts", "3"]) == 0
    log = capsys.readouterr().out
    assert "restart 2" in log and "restart 0" not in log and "restart 1:" not in log
    rows3 = _read_csv(out / "results.csv")
    assert len(rows3) == 3 and rows3[:2] == rows
    # a different config in the same directory is refused
    with pytest.raises(SystemExit):
        main(base[:-1] + ["mlp_width=32", "--restarts", "3"])
    # table: ERM run + the HGP run
    erm = tmp_path / "erm"
    assert (
        main(
            [
                "dg",
                "run",
                "--dataset",
                "colored_digits",
                "--algorithm",
                "erm",
                "--out",
                str(erm),
                "--steps",
                "2",
                "--restarts",
                "2",
                "--set",
                "mlp_width=16",
            ]
        )
        == 0
    )
    tex = tmp_path / "tables" / "dg.tex"
    assert main(["dg", "table", "--inputs", str(erm), str(out), "--out", str(tex)]) == 0
    text = tex.read_text()
    assert "HGP" in text and "ERM" in text and "\\textbf{" in text
    table_rows = _read_csv(tex.with_suffix(".csv"))
    assert [r["algorithm"] for r in table_rows] == ["erm", "hgp"]


def test_mnist_idx_reader_offline(tmp_path):
    import gzip

    raw = tmp_path / "mnist" / "raw"
    raw.mkdir(parents=True)
    imgs = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([7, 0, 4], dtype=np.uint8)
    header = lambda magic, dims: b"".join(int(v).to_bytes(4, "big") for v in (magic, *dims))
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header(2051, imgs.shape) + imgs.tobytes())
    with gzip.open(raw / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(header(2049, labels.shape) + labels.tobytes())
    x, y = datasets.load_mnist_train(tmp_path, download=False)
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(FileNotFoundError):
        datasets.load_mnist_train(tmp_path / "empty", download=False)


def test_download_mnist_from_local_mirrors(tmp_path, monkeypatch):
    """The MNIST path uses the project's downloader: a dead mirror falls through, md5 is enforced."""
    import functools
    import gzip
    import hashlib
    import http.server
    import threading

    from greg.dg import datasets as dgd

    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    blobs = {
        "train-images-idx3-ubyte.gz": gzip.compress(
            (2051).to_bytes(4, "big")
            + b"".join(d.to_bytes(4, "big") for d in images.shape)
            + images.tobytes()
        ),
        "train-labels-idx1-ubyte.gz": gzip.compress(
            (2049).to_bytes(4, "big") + (2).to_bytes(4, "big") + b"\x03\x07"
        ),
    }
    for name, blob in blobs.items():
        (srv_dir / name).write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(srv_dir))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/"
        monkeypatch.setattr(dgd, "MNIST_MIRRORS", (base + "missing/", base))
        good = {k: hashlib.md5(v).hexdigest() for k, v in blobs.items()}
        monkeypatch.setattr(dgd, "MNIST_RESOURCES", good)
        x, y = dgd.load_mnist_train(tmp_path / "data")
        assert np.array_equal(x, images) and y.tolist() == [3, 7]
        # a wrong checksum on every mirror: clear error, nothing left in place
        monkeypatch.setattr(dgd, "MNIST_RESOURCES", {**good, "train-labels-idx1-ubyte.gz": "0" * 32})
        (tmp_path / "data" / "mnist" / "raw" / "train-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(RuntimeError, match="md5 .* expected 0000"):
            dgd.load_mnist_train(tmp_path / "data")
        assert not (tmp_path / "data" / "mnist" / "raw" / "train-labels-idx1-ubyte.gz").exists()
    finally:
        server.shutdown()


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"erm"', "{"])
def test_dg_summary_or_config_that_is_not_an_object_is_one_line(tmp_path, capsys, text):
    from greg.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(text)
    assert main(["dg", "table", "--inputs", str(run), "--out", str(tmp_path / "t.tex")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run / 'summary.json'}:" in err, err
    # an existing config.json of a greg run directory (its lock file is greg's mark): refused before any training
    (run / ".greg.lock").write_text("")
    (run / "config.json").write_text(text)
    rc = main(["dg", "run", "--dataset", "colored_digits", "--algorithm", "erm", "--out", str(run), "--steps", "1",
               "--restarts", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{run / 'config.json'}:" in err, err
    assert not (run / "results.csv").exists()


def test_dg_table_escapes_names_and_caption():
    from greg.dg.cli import render_table

    runs = [{"dataset": "my_set%", "algorithm": "new_alg&#", "n_restarts": 1, "path": "p",
             **{m: {"mean": 50.0, "std": 1.0} for m in ("train_acc", "val_acc", "test_acc")}}]
    tex = render_table(runs, caption="Acc. (%) of x_y \\input{/etc/hostname}")[0]
    assert r"my\_set\% & new\_alg\&\# &" in tex and r"\input" not in tex
    assert r"\caption{Acc. (\%) of x\_y \textbackslash{}input\{/etc/hostname\}}" in tex


def test_run_defaults_are_the_workflow_schemas():
    """``greg dg run`` takes its defaults from RUN_DEFAULTS, and the workflow schema's ``dg:`` and
    ``data_root`` defaults equal them: a changed default on either side fails here."""
    import argparse
    from pathlib import Path

    import yaml

    from greg.dg.cli import RUN_DEFAULTS, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = vars(parser.parse_args(["run", "--dataset", "d", "--algorithm", "a", "--out", "o"]))
    assert {k: args[k] for k in RUN_DEFAULTS} == RUN_DEFAULTS
    assert vars(parser.parse_args(["download", "--dataset", "d"]))["data_root"] == RUN_DEFAULTS["data_root"]
    schema = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text(encoding="utf-8")
    )
    dg = schema["properties"]["dg"]["properties"]
    assert {k: dg[k]["default"] for k in ("restarts", "seed", "hparams_seed", "steps")} == {
        k: RUN_DEFAULTS[k] for k in ("restarts", "seed", "hparams_seed", "steps")
    }
    assert schema["properties"]["data_root"]["default"] == RUN_DEFAULTS["data_root"]
