"""Model zoo: interface identities, sizes, external checkpoints (the shared DenseNet-BC-100 files) and
run checkpoints."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from greg import models

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GREG_SHARED", REPO.parent / "shared"))
CKPT10 = SHARED / "checkpoints" / "densenet100_cifar10.pth"
CKPT100 = SHARED / "checkpoints" / "densenet100_cifar100.pth"
need_shared = pytest.mark.skipif(
    not (CKPT10.is_file() and CKPT100.is_file()),
    reason=f"shared DenseNet checkpoints not found under {SHARED} (set GREG_SHARED to the shared folder)",
)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# name, kwargs, input size, expected feature-map shape (C, H, W)
CASES = [
    ("small_cnn", {}, 32, (32, 8, 8)),
    ("resnet18", {}, 32, (512, 4, 4)),  # CIFAR stem: 32 -> 32 -> 16 -> 8 -> 4
    ("resnet18", {"stem": "imagenet"}, 32, (512, 1, 1)),  # /2 conv, /2 pool, /8 layers -> 1
    ("wrn40_2", {}, 32, (128, 8, 8)),
    ("densenet100", {}, 32, (342, 8, 8)),
    ("densenet121", {}, 64, (1024, 2, 2)),  # /32
]


def _load_raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ interface
@pytest.mark.parametrize(("name", "kwargs", "size", "fmap_shape"), CASES, ids=lambda v: str(v))
def test_interface_shapes_and_identities(name, kwargs, size, fmap_shape):
    torch.manual_seed(0)
    model = models.create(name, 7, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fmap = model.feature_map(x)
        h = model.features(x)
        logits = model(x)
    assert fmap.shape == (2, *fmap_shape)
    assert h.shape == (2, fmap_shape[0]) and model.feature_dim == fmap_shape[0]
    assert logits.shape == (2, 7)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    # the head is the *last* Linear of the module
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1] is model.head
    assert torch.equal(model.head(h), logits)
    assert torch.equal(model.pool(fmap), h)
    assert torch.equal(h, fmap.mean(dim=(2, 3)))  # pool is global average pooling
    assert model.arch == name and model.num_classes == 7 and model.model_kwargs == kwargs


def test_feature_map_includes_final_bn_relu():
    # DenseNet/WRN/torchvision apply BN+ReLU after the last block; it belongs to the feature map
    for name in ("densenet100", "wrn40_2", "small_cnn"):
        model = models.create(name, 10).eval()
        with torch.no_grad():
            fmap = model.feature_map(torch.randn(2, 3, 32, 32))
        assert fmap.min() >= 0 and (fmap == 0).any(), name


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError) as e:
        models.create("densenet101", 10)
    msg = str(e.value)
    for n in ("densenet100", "densenet121", "resnet18", "small_cnn", "wrn40_2"):
        assert n in msg
    assert models.names() == sorted(["densenet100", "densenet121", "resnet18", "small_cnn", "wrn40_2"])
    with pytest.raises(ValueError, match="stem"):
        models.create("resnet18", 10, stem="bogus")


# ------------------------------------------------------------------------------------ parameter counts
def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def densenet_bc_params(depth=100, k=12, reduction=0.5, num_classes=10):
    """Parameter count of DenseNet-BC written out layer by layer (BN has 2 params per channel)."""
    n = (depth - 4) // 6
    c = 2 * k
    total = 3 * c * 9  # stem conv
    for block in range(3):
        for _ in range(n):
            total += 2 * c + c * 4 * k + 2 * 4 * k + 4 * k * k * 9  # BN, 1x1 conv, BN, 3x3 conv
            c += k
        if block < 2:
            out = math.floor(c * reduction)
            total += 2 * c + c * out  # transition BN + 1x1 conv
            c = out
    return total + 2 * c + c * num_classes + num_classes, c


def wrn_params(depth=40, widen=2, num_classes=10):
    n = (depth - 4) // 6
    ch = [16, 16 * widen, 32 * widen, 64 * widen]
    total = 3 * ch[0] * 9
    for b in range(3):
        for i in range(n):
            cin, cout = (ch[b] if i == 0 else ch[b + 1]), ch[b + 1]
            total += (
                2 * cin + cin * cout * 9 + 2 * cout + cout * cout * 9 + (cin * cout if cin != cout else 0)
            )
    return total + 2 * ch[3] + ch[3] * num_classes + num_classes


def test_densenet100_size():
    expected, feat_dim = densenet_bc_params()
    assert feat_dim == 342
    assert expected == 769_162  # the well-known "0.77M" of DenseNet-BC (L=100, k=12)
    model = models.create("densenet100", 10)
    assert _n_params(model) == expected
    assert model.feature_dim == 342
    assert _n_params(models.create("densenet100", 100)) == densenet_bc_params(num_classes=100)[0]
    if CKPT10.is_file():  # and independently, the released file's trainable tensors
        sd = _load_raw(CKPT10)["state_dict"]
        n_file = sum(
            v.numel()
            for k, v in sd.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
        assert n_file == expected


def test_wrn_and_resnet_sizes():
    assert _n_params(models.create("wrn40_2", 10)) == wrn_params() == 2_243_546
    # the ImageNet-stem ResNet-18 is torchvision's network with a renamed classifier
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    ours = models.create("resnet18", 10, stem="imagenet")
    assert _n_params(ours) == _n_params(tv)
    assert set(models.map_pretrained_keys(ours, tv.state_dict())) == set(ours.state_dict())
    # CIFAR stem: 3x3x3x64 conv instead of 7x7x3x64
    assert _n_params(models.create("resnet18", 10)) == _n_params(tv) - 3 * 64 * (49 - 9)


# ------------------------------------------------------------------------------------------- training
def test_small_cnn_train_step_is_fast():
    torch.manual_seed(0)
    model = models.create("small_cnn", 10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # then process CPU time = compute time, whatever else runs on the machine
    try:
        times = []
        for _ in range(6):
            t = time.process_time()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            times.append(time.process_time() - t)
    finally:
        torch.set_num_threads(threads)
    assert math.isfinite(loss.item())
    assert min(times[1:]) < 0.1


@pytest.mark.parametrize("name", ["small_cnn", "densenet100"])
def test_double_backprop_through_input_gradient(name):
    # GReg differentiates ||d score / d x|| w.r.t. the weights: needs create_graph through every layer
    torch.manual_seed(0)
    model = models.create(name, 10).train()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    energy = -torch.logsumexp(model(x), dim=1)
    (g,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
    torch.linalg.vector_norm(g.flatten(1), dim=1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert grads[0].abs().sum() > 0  # the stem conv gets a second-order gradient


# -------------------------------------------------------------------------------- external checkpoints
def _photo(name, mean, std):
    """A scikit-image sample photograph, center-cropped and resized to 32x32, normalized like CIFAR."""
    import skimage.data
    import skimage.transform

    img = getattr(skimage.data, name)()
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    x = skimage.transform.resize(img, (32, 32), anti_aliasing=True).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


@need_shared
@pytest.mark.parametrize(
    ("path", "num_classes", "prefix", "fc"), [(CKPT10, 10, "", "fc"), (CKPT100, 100, "module.", "linear")]
)
def test_shared_densenet_checkpoints_load_strict(path, num_classes, prefix, fc):
    raw = _load_raw(path)["state_dict"]
    model = models.load_pretrained(models.create("densenet100", num_classes), path)
    own = model.state_dict()
    assert len(own) == len(raw) == 596
    # every tensor arrived, under the documented map: strip `module.`, fc/linear -> head
    for key, value in raw.items():
        assert key.startswith(prefix)
        new = key[len(prefix) :]
        new = "head." + new[len(fc) + 1 :] if new.startswith(fc + ".") else new
        assert torch.equal(own[new], value), key
    # BN running statistics are the trained ones, not the defaults
    bn = model.bn1
    assert not torch.equal(bn.running_mean, torch.zeros(342)) and not torch.equal(
        bn.running_var, torch.ones(342)
    )


@need_shared
def test_cifar10_densenet_is_sane():
    model = models.load_pretrained(models.create("densenet100", 10), CKPT10).eval()
    raw = _load_raw(CKPT10)
    # BN counted 100 epochs x ceil(50000 / 64) steps: the stats come from the CIFAR-10 training run
    assert raw["epoch"] == 100 and int(model.bn1.num_batches_tracked) == 100 * math.ceil(50000 / 64)
    g = torch.Generator().manual_seed(0)
    noise = (
        torch.rand(16, 3, 32, 32, generator=g) - torch.tensor(CIFAR10_MEAN)[:, None, None]
    ) / torch.tensor(CIFAR10_STD)[:, None, None]
    with torch.no_grad():
        logits = model(noise)
        cat = model(_photo("chelsea", CIFAR10_MEAN, CIFAR10_STD)).softmax(1)[0]
    assert torch.isfinite(logits).all() and logits.std() > 0
    # a photograph of a cat (scikit-image's "chelsea") is classified as CIFAR-10 class 3, "cat"
    assert int(cat.argmax()) == 3 and cat[3] > 0.5


@need_shared
def test_cifar100_densenet_is_sane():
    model = models.load_pretrained(models.create("densenet100", 100), CKPT100).eval()
    x = torch.cat([_photo(n, CIFAR100_MEAN, CIFAR100_STD) for n in ("coffee", "rocket", "astronaut")])
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    # CIFAR-100 fine labels (alphabetical): 28 cup, 69 rocket; people: 2 baby, 11 boy, 35 girl, 46 man, 98 woman
    assert pred[0] == 28 and pred[1] == 69 and pred[2] in {2, 11, 35, 46, 98}


@need_shared
def test_wrong_checkpoint_errors_name_file_and_keys():
    # CIFAR-100 weights into a 10-class model: head shape mismatch
    with pytest.raises(models.CheckpointError) as e:
        models.load_pretrained(models.create("densenet100", 10), CKPT100)
    msg = str(e.value)
    assert (
        str(CKPT100) in msg and "2 shape mismatches" in msg and "head.weight" in msg and "(100, 342)" in msg
    )
    # skip_head loads everything else (a K+1-class model from a K-class checkpoint)
    model = models.load_pretrained(models.create("densenet100", 11), CKPT10, skip_head=True)
    assert torch.equal(model.bn1.running_mean, _load_raw(CKPT10)["state_dict"]["bn1.running_mean"])
    # the DenseNet file into another architecture
    with pytest.raises(models.CheckpointError, match=r"missing keys: .*layer1\.0\.conv1\.weight") as e:
        models.load_pretrained(models.create("resnet18", 10), CKPT10)
    assert "unexpected keys: block1.layer.0.bn1.weight" in str(e.value) and str(CKPT10) in str(e.value)


def test_wrong_file_errors_without_shared(tmp_path):
    model = models.create("densenet100", 10)
    bad = tmp_path / "resnet.pth"
    torch.save({"epoch": 3, "state_dict": models.create("small_cnn", 10).state_dict()}, bad)
    with pytest.raises(models.CheckpointError) as e:
        models.load_pretrained(model, bad)
    msg = str(e.value)
    assert str(bad) in msg and "missing keys" in msg and "unexpected keys: body.0.weight" in msg
    assert "more)" in msg  # long lists are cut
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "acc": 1.0}, junk)
    with pytest.raises(models.CheckpointError, match="no state_dict found"):
        models.load_pretrained(model, junk)
    with pytest.raises(FileNotFoundError):
        models.load_pretrained(model, tmp_path / "absent.pth")


def test_torchvision_layouts_load_and_match(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    # torchvision ResNet-18, bare state_dict
    tv = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    ours = models.load_pretrained(models.create("resnet18", 10, stem="imagenet"), tmp_path / "r18.pth").eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)
    ours_key = models.create("densenet121", 10).map_pretrained_key
    # torchvision DenseNet-121, with the legacy "norm.1" key style, inside a DataParallel-style container
    tv = torchvision.models.densenet121(weights=None, num_classes=10).eval()
    for m in tv.modules():  # non-trivial BN stats so a wrong map would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    legacy = {}
    for k, v in tv.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # files of that era predate the counter; BatchNorm fills it in
        for part in ("norm1", "norm2", "conv1", "conv2"):
            k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.") if ".denselayer" in k else k
        legacy["module." + k] = v
    assert any(".norm.1." in k for k in legacy)
    key = "features.denseblock1.denselayer1.norm.1.num_batches_tracked"
    assert ours_key(key) == "body.denseblock1.denselayer1.norm1.num_batches_tracked"
    torch.save({"state_dict": legacy}, tmp_path / "d121.pth")
    ours = models.load_pretrained(models.create("densenet121", 10), tmp_path / "d121.pth").eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), tv(x), atol=1e-5)
        assert torch.allclose(
            ours.features(x), torch.flatten(F.adaptive_avg_pool2d(F.relu(tv.features(x)), 1), 1)
        )


# ------------------------------------------------------------------------------------- run checkpoints
def test_run_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    kwargs = {"widths": [8, 16]}
    model = models.create("small_cnn", 5, **kwargs)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # move BN running stats off their defaults
    model.eval()
    meta = {"method": "greg", "epoch": 3, "metrics": {"acc": 0.5}, "seeds": [2, 42], "note": None}
    path = tmp_path / "run" / "final.pt"
    models.save_checkpoint(path, model, arch="small_cnn", num_classes=5, model_kwargs=kwargs, meta=meta)
    assert [p.name for p in path.parent.iterdir()] == ["final.pt"]  # no temp file left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert set(raw) == {"format", "arch", "num_classes", "model_kwargs", "state_dict", "meta"}
    assert raw["format"] == "greg-model-v1" and raw["arch"] == "small_cnn" and raw["num_classes"] == 5

    loaded, meta2 = models.load_checkpoint(path, device="cpu")
    assert meta2 == meta and loaded.arch == "small_cnn" and loaded.model_kwargs == kwargs
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # into an existing model of the same architecture
    fresh = models.create("small_cnn", 5, **kwargs)
    same, _ = models.load_checkpoint(path, model=fresh)
    assert same is fresh and torch.equal(fresh.head.weight, model.head.weight)
    # a run checkpoint also loads through load_pretrained (e.g. `init.kind: pretrained`)
    again = models.load_pretrained(models.create("small_cnn", 5, **kwargs), path)
    assert torch.equal(again.head.bias, model.head.bias)


def test_run_checkpoint_errors(tmp_path):
    model = models.create("small_cnn", 5)
    path = tmp_path / "final.pt"
    models.save_checkpoint(path, model, arch="small_cnn", num_classes=5, model_kwargs={}, meta={})
    with pytest.raises(
        models.CheckpointError, match="holds a 'small_cnn' model; cannot load it into a 'wrn40_2'"
    ):
        models.load_checkpoint(path, model=models.create("wrn40_2", 5))
    other = torch.nn.Sequential(torch.nn.Linear(3, 5))  # not from `create`: caught by the key check
    with pytest.raises(models.CheckpointError, match="missing keys: 0.weight"):
        models.load_checkpoint(path, model=other)
    with pytest.raises(
        models.CheckpointError, match=r"shape mismatches: head.weight \(file \(5, 32\) vs model \(7, 32\)\)"
    ):
        models.load_checkpoint(path, model=models.create("small_cnn", 7))
    # not a greg run checkpoint
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    with pytest.raises(models.CheckpointError, match=r"bare\.pth is not a greg run checkpoint"):
        models.load_checkpoint(bare)
    # inconsistent or non-plain arguments are refused before anything is written
    with pytest.raises(models.CheckpointError, match="created as 'small_cnn', not 'wrn40_2'"):
        models.save_checkpoint(
            tmp_path / "a.pt", model, arch="wrn40_2", num_classes=5, model_kwargs={}, meta={}
        )
    with pytest.raises(models.CheckpointError, match="shape mismatches"):
        models.save_checkpoint(
            tmp_path / "b.pt", model, arch="small_cnn", num_classes=3, model_kwargs={}, meta={}
        )
    with pytest.raises(TypeError, match=r"meta\['dir'\].*PosixPath"):
        models.save_checkpoint(
            tmp_path / "c.pt", model, arch="small_cnn", num_classes=5, meta={"dir": tmp_path}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.pth", "final.pt"]


def test_cli_modules_import_without_torchvision_and_report_without_torch():
    """Every Snakemake job is a fresh `python -m greg ...`: `import torchvision` (~2.5 s, it pulls in
    torch._dynamo) is paid only by jobs that build a torchvision-based model, and table/plot jobs skip torch."""
    import subprocess
    import sys

    code = (
        "import sys, greg.report; assert 'torch' not in sys.modules, 'report imports torch'; "
        "import greg.train, greg.evaluate, greg.dg.cli, greg.data.cli; "
        "assert 'torchvision' not in sys.modules, 'a CLI module imports torchvision'; "
        "from greg import models; models.create('small_cnn', num_classes=10); "
        "assert 'torchvision' not in sys.modules; models.create('resnet18', num_classes=10); "
        "assert 'torchvision' in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
