"""The rehearsal: format-faithful fakes (greg.data.fake), their served download, the job wrapper
(workflow/scripts/rehearse.py), repro_quick's tables; and, with GREG_REHEARSAL_TESTS=1 (.ci/run), the CI slice
of the rehearsal through Snakemake at the paper's shapes."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import pickle
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import greg.data as gd
from greg import models
from greg import plan as P
from greg.cli import main as greg_main
from greg.data import catalog, fake
from greg.data.base import Resource, names

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

import rehearse as R
from test_workflow import SNAKEMAKE, job_counts, workdir
from test_workflow import snakemake as run_snakemake


# ------------------------------------------------------------------------------------------------ fakes
def test_every_downloadable_catalog_entry_has_a_fake_writer():
    downloadable = {n for n in names() if gd.spec(n).resources}
    assert downloadable == set(fake.faked_names())
    assert downloadable <= set(fake.WRITERS), sorted(downloadable - set(fake.WRITERS))
    assert len(fake.DTD_CLASSES) == len(set(fake.DTD_CLASSES)) == 47


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    """Every fake but ImageNet, written once (a few seconds)."""
    root = tmp_path_factory.mktemp("fakes")
    fake.write_fakes(root, imagenet=False, progress=False)
    return root


@pytest.fixture(scope="module")
def served(fakes):
    srv = fake.server(fakes / fake.SERVE)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield fake.url_of(srv)
    srv.shutdown()
    srv.server_close()


def _member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as t:
        return t.extractfile(name).read()


def test_cifar_fakes_are_python2_pickles_with_the_real_keys(fakes):
    serve = fakes / fake.SERVE
    b = pickle.loads(_member(serve / "cifar-10-python.tar.gz", "cifar-10-batches-py/data_batch_3"), encoding="latin1")
    assert set(b) == {"batch_label", "labels", "data", "filenames"}
    assert b["data"].dtype == np.uint8 and b["data"].shape == (fake.CIFAR_TRAIN_PER_BATCH, 3072)
    assert b["batch_label"] == "training batch 3 of 5" and set(b["labels"]) == set(range(10))
    meta = pickle.loads(_member(serve / "cifar-10-python.tar.gz", "cifar-10-batches-py/batches.meta"), encoding="latin1")
    assert meta["label_names"][0] == "airplane" and meta["num_vis"] == 3072
    c = pickle.loads(_member(serve / "cifar-100-python.tar.gz", "cifar-100-python/train"), encoding="latin1")
    assert set(c) == {"batch_label", "fine_labels", "coarse_labels", "data", "filenames"}
    assert set(c["fine_labels"]) == set(range(100)) and set(c["coarse_labels"]) == set(range(20))
    m = pickle.loads(_member(serve / "cifar-100-python.tar.gz", "cifar-100-python/meta"), encoding="latin1")
    assert len(m["fine_label_names"]) == 100 and len(m["coarse_label_names"]) == 20
    with tarfile.open(serve / "cifar-10-python.tar.gz") as t:  # the real archive's members, dirs included
        assert sorted(t.getnames()) == sorted(
            ["cifar-10-batches-py", "cifar-10-batches-py/readme.html", "cifar-10-batches-py/batches.meta",
             "cifar-10-batches-py/test_batch", *(f"cifar-10-batches-py/data_batch_{k}" for k in range(1, 6))]
        )


def test_svhn_fake_is_matlab_v5_with_x_hwcn_and_labels_1_to_10(fakes):
    from scipy.io import loadmat

    path = fakes / fake.SERVE / "test_32x32.mat"
    assert path.read_bytes()[:6] == b"MATLAB" and path.read_bytes()[126:128] in (b"IM", b"MI")  # v5 header
    m = loadmat(path)
    assert m["X"].dtype == np.uint8 and m["X"].shape == (32, 32, 3, fake.OOD_IMAGES)
    assert m["y"].shape == (fake.OOD_IMAGES, 1) and m["y"].min() >= 1 and m["y"].max() <= 10


def test_folder_fakes_have_the_real_layouts_and_image_sizes(fakes):
    serve = fakes / fake.SERVE
    with tarfile.open(serve / "dtd-r1.0.1.tar.gz") as t:
        files = [n for n in t.getnames() if n.startswith("dtd/images/") and n.endswith(".jpg")]
        assert {n.split("/")[2] for n in files} == set(fake.DTD_CLASSES)
        sides = [min(Image.open(t.extractfile(n)).size) for n in files[:10]]
    assert min(sides) >= catalog.DTD_MIN_SIDE
    for name, first in (("lsun_crop", "LSUN/test/1.jpg"), ("lsun_resize", "LSUN_resize/LSUN_resize/1.jpg"),
                        ("isun", "iSUN/iSUN_patches/000001.jpeg"), ("inaturalist", None)):
        s = gd.spec(name)
        with tarfile.open(serve / s.resources[0].filename) as t:
            jpgs = [n for n in t.getnames() if n.lower().endswith((".jpg", ".jpeg"))]
            assert len(jpgs) == fake.OOD_IMAGES and all(n.startswith(s.layout[0] + "/") for n in jpgs)
            if first:
                assert first in jpgs
            if s.file_size:
                assert Image.open(t.extractfile(jpgs[0])).size == s.file_size
    arr = np.load(serve / "300K_random_images.npy", mmap_mode="r")
    assert arr.dtype == np.uint8 and arr.shape == (fake.RANDOM300K, 32, 32, 3)


def test_fakes_complete_follows_the_catalog(tmp_path, fakes, monkeypatch):
    assert not fake.fakes_complete(fakes)  # written without ImageNet / DenseNet-121
    fake._densenet121(fakes / fake.DATA)
    assert fake.fakes_complete(fakes)
    s = gd.spec("svhn")
    changed = dataclasses.replace(s, resources=(*s.resources, Resource("http://x/extra.txt", "extra.txt")))
    monkeypatch.setattr(fake, "spec", lambda n: changed if n == "svhn" else gd.spec(n))
    assert not fake.fakes_complete(fakes)  # a catalog entry with a new file: written again


def test_fakes_are_reproducible_and_never_the_catalogs_checksums(tmp_path, fakes):
    s = gd.spec("lsun_crop")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        fake.WRITERS["lsun_crop"](s, tmp_path / d, np.random.default_rng([0, 1]))
    assert (tmp_path / "a" / "LSUN.tar.gz").read_bytes() == (tmp_path / "b" / "LSUN.tar.gz").read_bytes()
    table = gd.downloader.read_checksums_file(fakes / fake.SERVE / fake.CHECKSUMS)
    assert table["lsun_crop/LSUN.tar.gz"] != s.resources[0].checksum
    assert s.resources[0].checksum == "md5:458a0a0ab8e5f1cb4516d7400568e460"  # the catalog is untouched
    # every downloaded file and every extracted file the catalog checks has a fake digest
    for n in fake.faked_names():
        sp = gd.spec(n)
        for rel in [r.filename for r in sp.resources] + list(sp.file_checksums):
            assert f"{sp.directory}/{rel}" in table, (n, rel)


def test_fakes_download_through_the_served_path_and_load(tmp_path, fakes, served):
    """greg data download with --url-base (the server) and --checksums (the fakes' file): fetch, verify,
    extract, and every set then loads with its real loader (CIFAR batches checked at load)."""
    root = tmp_path / "data"
    # a partial file from an interrupted transfer: resumed with a Range request, then verified
    part = root / "lsun_crop" / "LSUN.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes((fakes / fake.SERVE / "LSUN.tar.gz").read_bytes()[:1000])
    checks = str(fakes / fake.SERVE / fake.CHECKSUMS)
    rc = greg_main(["data", "download", *fake.faked_names(), "--root", str(root), "--url-base", served,
                    "--checksums", checks, "--no-progress"])
    assert rc == 0
    assert (root / "lsun_crop" / "LSUN.tar.gz").read_bytes() == (fakes / fake.SERVE / "LSUN.tar.gz").read_bytes()
    x, y = gd.load("cifar10", split="train", root=root)[5]
    assert len(gd.load("cifar10", split="train", root=root)) == 5 * fake.CIFAR_TRAIN_PER_BATCH
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert len(gd.load("cifar100", split="test", root=root)) == fake.CIFAR_TEST
    assert len(gd.load("random300k", split="train", root=root)) == fake.RANDOM300K
    assert len(gd.load("places365", split="test", root=root, id_dataset="cifar10")) == fake.OOD_IMAGES - 10  # listed
    for n in ("svhn", "textures", "places365", "lsun_crop", "lsun_resize", "isun"):
        ds = gd.load(n, split="test", root=root, id_dataset="cifar10")
        assert ds[len(ds) - 1][0].shape == (3, 32, 32), n
    for n in ("inaturalist", "sun", "places", "textures_imagenet"):
        ds = gd.load(n, split="test", root=root, id_dataset="imagenet10")
        assert ds[len(ds) - 1][0].shape == (3, 224, 224), n
    # the fake released DenseNet-100s load as the real ones do (key map, DataParallel prefix, head name)
    for n, k in (("densenet100_cifar10_released", 10), ("densenet100_cifar100_released", 100)):
        models.load_pretrained(models.create("densenet100", num_classes=k), gd.weights_path(n, root))


def test_fake_released_weights_have_the_real_files_layout(tmp_path, checkpoint_mirror):
    """Keys, shapes, dtypes and wrapper entries as in the released files (values random)."""
    for n in ("densenet100_cifar10_released", "densenet100_cifar100_released"):
        s = gd.spec(n)
        fake.WRITERS[n](s, tmp_path, np.random.default_rng(0))
        ours = torch.load(tmp_path / s.resources[0].filename, map_location="cpu", weights_only=True)
        real = torch.load(checkpoint_mirror / s.resources[0].filename, map_location="cpu", weights_only=True)
        assert set(ours) == set(real)
        assert {k: (v.shape, v.dtype) for k, v in ours["state_dict"].items()} == {
            k: (v.shape, v.dtype) for k, v in real["state_dict"].items()
        }
        assert list(ours["state_dict"]) == list(real["state_dict"])


def test_fake_densenet121_is_torchvisions_legacy_file_and_loads(tmp_path):
    fake._densenet121(tmp_path)
    path = tmp_path / fake.DENSENET121_FILE
    raw = path.read_bytes()
    assert not raw.startswith(b"PK")  # legacy serialization, as the 2017 file (not a zip archive)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    m = models.create("densenet121", num_classes=10)
    models.load_pretrained(m, path, skip_head=True)
    assert torch.equal(m.state_dict()["body.conv0.weight"], sd["features.conv0.weight"])


def test_fake_imagenet_has_the_real_folders_and_oddities(tmp_path, monkeypatch):
    monkeypatch.setattr(fake, "IMAGENET_ID_TRAIN", 2)
    monkeypatch.setattr(fake, "IMAGENET_ID_VAL", 1)
    monkeypatch.setattr(fake, "IMAGENET_AUX_TRAIN", 0)  # 990 empty class folders: enough for the check
    n = fake._imagenet(tmp_path, np.random.default_rng(0))
    assert n == 30
    catalog.check_manual(gd.spec("imagenet10"), tmp_path)
    catalog.check_manual(gd.spec("imagenet990"), tmp_path)
    files = sorted((tmp_path / "imagenet").rglob("*.JPEG"))
    modes = {Image.open(f).mode for f in files}
    assert {"RGB", "L", "CMYK"} <= modes
    ds = gd.load("imagenet10", split="train", root=tmp_path)
    assert len(ds) == 20 and all(ds[i][0].shape == (3, 224, 224) for i in range(len(ds)))


# ------------------------------------------------------------------------------------------------ rehearse.py
def test_step_times_use_consecutive_records_of_one_session(tmp_path):
    f = tmp_path / "metrics.jsonl"
    recs = [(0, 5.0), (1, 7.0), (2, 9.5), (2, 4.0), (3, 7.0), (4, 10.0)]  # a resume after step 2 restarts time
    f.write_text("".join(json.dumps({"step": s, "time": t}) + "\n" for s, t in recs) + "not json\n")
    steps, sps = R.step_times(f)
    # diffs within sessions: 2.0, 2.5 | 3.0, 3.0  -> median 2.75; 5 distinct steps
    assert steps == 5 and sps == pytest.approx(2.75)
    assert R.step_times(tmp_path / "missing.jsonl") == (0, None)


def test_batch_sizes_read_from_the_runs_config(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "data:\n  aux_batch_size: 256\n  batch_size: 128\n  root: data\ntrain:\n  batch_size: 7\n"
    )
    assert R.batch_sizes(tmp_path) == {"batch_size": 128, "aux_batch_size": 256}


FAKE_TRAIN = """
import os, signal, sys, time, json
out = sys.argv[sys.argv.index('--out') + 1]
os.makedirs(out, exist_ok=True)
state = os.path.join(out, 'state.pt')
resumed = os.path.exists(state)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
with open(os.path.join(out, 'metrics.jsonl'), 'a') as log:
    start = 2 if resumed else 0
    for step in range(start, 4):
        log.write(json.dumps({'step': step, 'time': 0.1 * (step - start + 1)}) + '\\n'); log.flush()
        if step == 1:
            open(state, 'w').write('s')
            for _ in range(100):
                if stop: sys.exit(143)
                time.sleep(0.05)
open(os.path.join(out, 'final.pt'), 'w').write('f')
"""


def test_rehearse_preempts_a_training_once_and_resumes_it(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(FAKE_TRAIN)
    run = tmp_path / "run"
    jobs = tmp_path / "jobs"
    # kind_of: "greg train" -> train; here the program is python, so pose as greg via a symlinked name
    greg = tmp_path / "bin" / "greg"
    greg.parent.mkdir()
    greg.write_text(f"#!{sys.executable}\nimport runpy, sys\nsys.argv = sys.argv[1:]\nsys.argv[0] = {str(script)!r}\n"
                    f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    greg.chmod(0o755)
    rc = R.main(["--jobs", str(jobs), "--", str(greg), "train", "--out", str(run)])
    assert rc == 0 and (run / "final.pt").exists()
    (rec_file,) = jobs.glob("*.json")
    rec = json.loads(rec_file.read_text())
    assert rec["preempted_and_resumed"] is True and rec["exit"] == 0 and rec["kind"] == "train"
    assert rec["steps"] == 4 and rec["s_per_step"] == pytest.approx(0.1)
    assert rec["peak_rss_mb"] > 1 and rec["peak_mem_mb"] >= rec["peak_rss_mb"]
    out = tmp_path / "resources.csv"
    assert R.main(["--jobs", str(jobs), "--summarize", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 1 and rows[0]["steps"] == "4" and rows[0]["preempted_and_resumed"] == "True"


def test_resident_plus_swap_is_read_from_proc(tmp_path):
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024
    swap = int(re.search(r"^VmSwap:\s+(\d+) kB", status, re.M).group(1)) / 1024
    got = R.resident_plus_swap_mb(os.getpid())
    assert got == pytest.approx(rss + swap, rel=0.2) and got > 10  # this test process: tens of MB, moving
    assert R.resident_plus_swap_mb(2**22 + 12345) == 0.0  # no such process (beyond pid_max's default)


def test_job_py_runs_commands_under_rehearse_only_when_the_rehearsal_env_is_set(tmp_path):
    job = ROOT / "workflow" / "scripts" / "job.py"
    cmd = [sys.executable, str(job), "--log", str(tmp_path / "j.log"), "--", sys.executable, "-c", "print(1)",
           "--out", str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k != "GREG_REHEARSAL_DIR"}
    assert subprocess.run(cmd, env=env, check=False).returncode == 0
    assert not (tmp_path / "jobs").exists()
    env["GREG_REHEARSAL_DIR"] = str(tmp_path / "jobs")
    assert subprocess.run(cmd, env=env, check=False).returncode == 0
    (rec,) = (tmp_path / "jobs").glob("*.json")
    assert json.loads(rec.read_text())["exit"] == 0


# ------------------------------------------------------------------------------------------------ repro_quick
def test_quick_table_keeps_only_the_named_cells():
    def cell(d, a, r, na=None):
        return {"dataset": d, "arch": a, "run": r, "detector": "energy", "na": na, "files": [] if na else [f"{d}/{a}/{r}"]}

    resolved = {
        "name": "t", "groups": [{"label": "R"}, {"label": "D"}],
        "rows": [
            {"label": "MSP", "cells": [cell("c10", "r18", "pretrain"), cell("c10", "dn", "pretrain")]},
            {"label": "OE", "cells": [cell("c10", "r18", "oe"), cell("c10", "dn", "oe")]},
            {"label": "GReg", "cells": [cell("c10", "r18", "greg"), cell("c10", "dn", "greg", na="n/a")]},
        ],
    }
    q = P.quick_table(resolved, [("c10", "dn", "pretrain"), ("c10", "dn", "greg")])
    assert [g["label"] for g in q["groups"]] == ["D"]
    assert [r["label"] for r in q["rows"]] == ["MSP"]  # GReg's only kept-arch cell is n/a
    assert q["rows"][0]["cells"][0]["files"] == ["c10/dn/pretrain"]
    assert P.quick_table(resolved, [("c100", "dn", "pretrain")]) is None
    q2 = P.quick_table(resolved, [("c10", "dn", "pretrain"), ("c10", "r18", "oe")])
    assert [g["label"] for g in q2["groups"]] == ["R", "D"]
    oe = q2["rows"][1]["cells"]
    assert oe[0]["files"] == ["c10/r18/oe"] and oe[1]["na"] == "not in repro_quick" and oe[1]["files"] == []


def test_planned_gpu_hours_sums_runtime_limits_of_gpu_jobs():
    jobs = [("train", {"gpu": 1, "runtime": 720}), ("evaluate_posthoc", {"gpu": 1, "runtime": 140}),
            ("evaluate", {"gpu": 1, "runtime": 20}), ("download", {"gpu": 0}), ("table", {}),
            ("train", {"gpu": "x", "runtime": 720})]
    line = P.planned_gpu_hours(jobs)
    # (720 + 140 + 20) / 60 = 14.67
    assert line.startswith("planned: 3 GPU jobs (1 evaluate, 1 evaluate_posthoc, 1 train), at most 14.7 GPU-hours")
    assert line.endswith("; 1 jobs' resources unreadable")
    assert P.planned_gpu_hours([("download", {"gpu": 0})]) is None


def test_repro_quick_dry_run_on_the_paper_config(tmp_path):
    """The paper config plans repro_quick: the released checkpoints imported (no CE training), the post-hoc
    detectors on CIFAR-10 and CIFAR-100, one GReg fine-tuning; one seed."""
    r = run_snakemake("-n", "repro_quick", "--config", f"results={tmp_path}/r", "--cores", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = job_counts(r.stdout)
    assert counts["pretrain"] == 2 and counts["train"] == 1  # two imports (0 steps), one GReg fine-tuning
    # the post-hoc detectors of each CE model in one job (evaluate_posthoc); GReg's energy evaluation
    assert counts["evaluate_posthoc"] == 2 and counts["evaluate"] == 1
    assert counts["repro_quick"] == 1 and counts["download"] == 11  # 2 ID + 6 OOD sets + aux + 2 weights


def test_the_rehearsal_plans_every_training_of_all_tables_once(tmp_path):
    """`snakemake rehearsal` on config/rehearsal.yaml plans what `all_tables` plans on the paper config with its
    first seed (the same trainings and evaluations), plus the downloads of the fakes, repro_quick and the
    resources table; both reproduction.md files are told that the numbers are no paper result."""
    reh = run_snakemake("-n", "-p", "rehearsal", "--configfile", "config/rehearsal.yaml", "--config",
                        f"results={tmp_path}/reh", "--cores", "2")
    assert reh.returncode == 0, reh.stderr[-3000:]
    one_seed = tmp_path / "one_seed.yaml"
    one_seed.write_text(f"results: {tmp_path}/paper\nseeds: [2]\n")
    paper = run_snakemake("-n", "-p", "all_tables", "--configfile", "config/config.yaml", str(one_seed), "--cores", "2")
    assert paper.returncode == 0, paper.stderr[-3000:]
    got, want = job_counts(reh.stdout), job_counts(paper.stdout)
    for rule in ("pretrain", "train", "evaluate", "evaluate_posthoc", "paper_table", "table"):
        assert got[rule] == want[rule], rule
    assert got["download"] == 17 and got["repro_quick"] == 1 and got["rehearsal_resources"] == 1
    reports = [ln for ln in reh.stdout.splitlines() if "greg report reproduction" in ln]
    assert len(reports) == 2 and all(ln.rstrip().endswith("--aliased") or "--aliased >" in ln for ln in reports)
    assert "greg report reproduction" in paper.stdout and "--aliased" not in paper.stdout


# ------------------------------------------------------------------------------------------------ the CI slice
CI = os.environ.get("GREG_REHEARSAL_TESTS") == "1"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not CI, reason="the rehearsal's CI slice runs in .ci/run (GREG_REHEARSAL_TESTS=1)")
def test_rehearsal_ci_slice(tmp_path):
    """Fakes written, served and downloaded by the workflow's download jobs; one DenseNet-100 CIFAR-10 GReg+
    run with its evaluation, one DenseNet-121 ImageNet-10 GReg run at 224 px (its CE fine-tuning first), and
    repro_quick, all at the paper's shapes through Snakemake; every training preempted and resumed once."""
    res = tmp_path / "r"
    targets = [
        P.eval_csv(str(res), "cifar10", "densenet100", "greg_plus", 2, "energy"),
        f"{P.run_dir(str(res), 'imagenet10', 'densenet121', 'greg', 2)}/final.pt",
        f"{res}/repro_quick/tables/reproduction.md",
    ]
    # As small as honest: 2 steps per run (a checkpoint after step 1, where rehearse.py preempts the job and the
    # rerun resumes it), at most 20 images per OOD set; the rest is config/rehearsal.yaml's, i.e. the paper's.
    slice_cfg = tmp_path / "slice.yaml"
    fakes = res / "fakes"
    slice_cfg.write_text(
        f"results: {res}\ndata_root: {fakes}/data\nrehearsal: {{fakes: {fakes}}}\njob_threads: 2\n"
        "train_set: {train.max_steps: 2, train.checkpoint_every: 1, train.progress: false}\n"
        'evaluate_args: [--n-ood, "20"]\n'
        f"pretrain: {{set_by_dataset: {{imagenet10: {{init.checkpoint: {fakes}/data/{fake.DENSENET121_FILE}}}}}}}\n"
    )
    t0 = time.monotonic()
    # one job at a time (job_threads 2: a DenseNet-100 GReg+ step takes ~14 GB), torch on both cores
    proc = subprocess.Popen(
        [str(SNAKEMAKE), *targets, "--configfile", "config/rehearsal.yaml", str(slice_cfg), "--cores", "2"],
        cwd=workdir(), env={**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                            "OMP_NUM_THREADS": "2"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=1700)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its jobs: no orphan keeps the cores
        out, err = proc.communicate()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    wall = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-6000:])
    print(f"rehearsal CI slice: {wall:.0f} s")
    recs = [json.loads(f.read_text()) for f in (res / "resources").glob("*.json")]
    trains = [x for x in recs if x["kind"] == "train" and x["steps"]]
    assert len(trains) == 4  # imagenet10 CE, its GReg, CIFAR-10 GReg+, repro_quick's GReg
    assert all(x["preempted_and_resumed"] and x["steps"] == 2 and x["s_per_step"] for x in trains)
    assert all(x["exit"] == 0 and x["peak_rss_mb"] > 100 for x in recs)
    md = (res / "repro_quick" / "tables" / "reproduction.md").read_text()
    assert "table1" in md and "or is the rehearsal" in md  # fakes: the deltas are said to mean nothing


def test_fake_train_sets_hold_a_full_batch_of_every_paper_run():
    """Every run of the paper config draws full ID batches from the fakes (DOS on ImageNet: 64)."""
    import itertools

    from greg import config as run_config
    from greg.io import yaml_load

    cfg = yaml_load((ROOT / "config" / "config.yaml").read_text())
    n_train = {"cifar10": 5 * fake.CIFAR_TRAIN_PER_BATCH, "cifar100": 5 * fake.CIFAR_TRAIN_PER_BATCH,
               "imagenet10": 10 * fake.IMAGENET_ID_TRAIN}
    seen = set()
    for g in cfg["grid"]:
        for d, a, r in itertools.product(g["datasets"], g["archs"], ["pretrain", *g["runs"]]):
            args = P.train_args(cfg, d, a, r, 0)
            files = [v for k, v in itertools.pairwise(args) if k == "--config"]
            sets = [v for k, v in itertools.pairwise(args) if k == "--set"]
            bs = run_config.load_config(files, sets)["data"]["batch_size"]
            seen.add((d, bs))
            assert bs <= n_train[d], (d, a, r, bs)
    assert ("imagenet10", 64) in seen  # the largest ImageNet batch is covered


# ------------------------------------------------------------------------------------------------ found by it
def test_dir_lock_is_released_while_a_forked_child_still_holds_the_descriptor(tmp_path):
    """A preempted training's rerun found its run directory "in use" by the process that had just exited: its
    DataLoader workers (forked) shared the lock's file description and held the flock until they noticed.
    The lock is now released on exit from the block, whoever else still holds the descriptor."""
    from greg import io as gio

    with gio.dir_lock(tmp_path / "run"):
        pid = os.fork()
        if pid == 0:  # a worker that outlives the block for a while
            time.sleep(3)
            os._exit(0)
    try:
        with gio.dir_lock(tmp_path / "run"):  # LockedError before the fix
            pass
    finally:
        os.waitpid(pid, 0)


HOLDER_KILLED = """
import os, sys, time
from greg import io as gio
with gio.dir_lock(sys.argv[1]):
    if os.fork() == 0:  # a DataLoader-like worker that outlives its parent for a while
        time.sleep(4)
        os._exit(0)
    os._exit(1)  # killed: no cleanup runs
"""


def test_dir_lock_dies_with_its_holder_although_a_forked_child_lives_on(tmp_path):
    """The holder killed (OOM killer, SIGTERM outside the training loop) while its forked workers live on:
    the directory must be free at once, or an immediate retry exits 2 ('in use')."""
    from greg import io as gio

    r = subprocess.run([sys.executable, "-c", HOLDER_KILLED, str(tmp_path / "run")], check=False, timeout=60)
    assert r.returncode == 1
    with gio.dir_lock(tmp_path / "run"):  # LockedError before the fix (the child held the flock)
        pass
