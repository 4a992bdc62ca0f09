"""The CPU demo: its data and model choices, and a reduced run of config/demo.yaml."""

from pathlib import Path

import pytest
import torch

from greg import data
from greg.data.base import random_crop_flip


def test_tiny_training_augmentation_shifts_but_never_flips():
    assert data.spec("tiny").train_aug == "crop_noflip"
    ds = data.load("tiny", "train", "unused-root", train=True)
    plain = data.load("tiny", "train", "unused-root")
    x0 = plain[0][0]
    fill = ((0.0 - torch.tensor(data.spec("tiny").mean)) / torch.tensor(data.spec("tiny").std)).view(3, 1, 1)
    padded = torch.cat([fill.expand(3, 32, 4), x0, fill.expand(3, 32, 4)], dim=2)
    padded = torch.cat([fill.expand(3, 4, 40), padded, fill.expand(3, 4, 40)], dim=1)
    shifts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        x = ds[0][0]
        # the augmented image is one of the 81 shifted windows of the zero-padded (unflipped) image
        found = [
            (i, j)
            for i in range(9)
            for j in range(9)
            if torch.allclose(x, padded[:, i : i + 32, j : j + 32], atol=1e-6)
        ]
        assert found, f"seed {seed}: not a shift of the original (flipped?)"
        shifts.add(found[0])
    assert len(shifts) > 10  # it does shift


def test_random_crop_flip_flips_only_when_asked():
    x = torch.arange(24, dtype=torch.float32).view(1, 3, 8)  # asymmetric along the width
    windows = [x[..., j : j + 3] for j in range(6)]
    flipped = 0
    for seed in range(20):
        torch.manual_seed(seed)
        a = random_crop_flip(x, 3, padding=0, flip=True)
        torch.manual_seed(seed)
        b = random_crop_flip(x, 3, padding=0, flip=False)
        assert any(torch.equal(b, w) for w in windows)  # the same window, never mirrored
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))  # same draws, then a coin flip
        flipped += int(not torch.equal(a, b))
    assert 0 < flipped < 20


def test_tiny_m_shares_tiny_split_and_its_own_statistics():
    import numpy as np

    from greg.data import tiny

    s, t = data.spec("tiny_m"), data.spec("tiny")
    for split in ("train", "test"):
        np.testing.assert_array_equal(s.loader(s, split, None).labels, t.loader(t, split, None).labels)
    x = np.asarray(s.loader(s, "train", None).images, dtype=np.float64).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(x.mean(axis=0), tiny.TINY_M_MEAN, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), tiny.TINY_M_STD, atol=1e-5)
    # the OOD sets are normalized with the ID set's statistics when evaluated against tiny_m
    raw = data.spec("tiny_photos").loader(data.spec("tiny_photos"), "test", None).images[0]
    got = data.load("tiny_photos", "test", "unused-root", id_dataset="tiny_m")[0][0]
    want = (raw.astype(np.float64) / 255.0 - np.array(tiny.TINY_M_MEAN)) / np.array(tiny.TINY_M_STD)
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), want, atol=2e-6)


# ------------------------------------------------------------------------------------------- the reduced demo
ROOT = Path(__file__).resolve().parents[1]


def _demo_config(results: str) -> dict:
    """config/config.yaml merged with config/demo.yaml, as Snakemake merges them."""
    import yaml
    from snakemake.utils import update_config

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load((ROOT / "config" / "demo.yaml").read_text()))
    cfg["results"] = results
    return cfg


def _mean_auroc(csv_path) -> dict[str, float]:
    import csv

    with open(csv_path, newline="") as f:
        return {r["ood_set"]: float(r["auroc"]) for r in csv.DictReader(f)}


@pytest.mark.timeout(900)  # about 1 min on 2 idle cores; 5+ min on a loaded machine
def test_reduced_demo_shows_the_sanity_facts_and_the_mechanism(tmp_path, monkeypatch):
    """config/demo.yaml's recipe, one seed and fewer steps (CE 150, fine-tuning 60): the facts that do not
    depend on luck. MSP of the CE model beats chance on the three natural-image OOD sets (post-hoc energy
    does not on textures, docs/DATASETS.md). The mechanism: Energy loss and GReg fine-tune the same CE model
    on the same batches and differ only by the gradient term, so GReg's input-gradient norm of the energy
    score is the smaller one on the ID test set and the auxiliary set, the two it penalizes. No AUROC ordering
    of the fine-tuned models is asserted: the demo does not show one beyond its seeds' spread."""
    import csv

    from greg import cli, diagnostics
    from greg import plan as P

    cfg = _demo_config(str(tmp_path / "r"))
    ood = ",".join(cfg["datasets"]["tiny_m"]["ood"])

    monkeypatch.chdir(ROOT)  # the presets' paths are relative to the repository

    def greg(*args: str) -> None:
        assert cli.main(list(args)) == 0, f"greg {' '.join(args)}"  # in-process: no interpreter start-ups

    def train(run: str, steps: int) -> str:
        out = P.run_dir(cfg["results"], "tiny_m", "small_cnn", run, 0)
        args = P.train_args(cfg, "tiny_m", "small_cnn", run, 0) + P.train_runtime_args(cfg)
        args += ["--set", f"train.max_steps={steps}", "--out", out, "--device", "cpu"]
        greg("train", *args)
        return out

    ce = train("pretrain", 150)
    out = f"{ce}/eval/msp"
    greg("evaluate", "--checkpoint", f"{ce}/final.pt", "--id", "tiny_m", "--ood", ood, "--detector", "msp",
         "--out", out, "--device", "cpu")
    msp = _mean_auroc(f"{out}/metrics.csv")
    with open(f"{out}/metrics.csv", newline="") as f:
        id_acc = float(next(csv.DictReader(f))["id_acc"])  # the same on every row
    assert id_acc > 80.0, f"CE ID accuracy {id_acc} %"
    for name in ("tiny_textures", "tiny_faces", "tiny_photos"):
        assert msp[name] > 50.0, (name, msp)

    sets = {"id": ("tiny_m", "test"), "aux": ("tiny_aux", "train")}
    norms = {run: diagnostics.grad_norms_checkpoint(f"{train(run, 60)}/final.pt", sets, "tiny_m", "data")
             for run in ("energy", "greg")}
    for name in sets:
        assert norms["greg"][name] < 0.9 * norms["energy"][name], (name, norms)
