"""Training methods (greg.methods): registry/create, loss values by hand or independent formulas, GReg+."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nets import IdentityNet, TinyNet

from greg import methods
from greg.methods import grad_reg
from greg.methods.base import Method
from greg.methods.energy import energy_loss
from greg.methods.oe import oe_loss


class FakeSampler:
    """Stands in for greg.sampling.ClusterSampler: a random choice drawn from the method's generator."""

    def __init__(self, n_total: int):
        self.n_total = n_total
        self.calls = 0

    def select(self, model, x_candidates, generator):
        self.calls += 1
        return torch.randperm(len(x_candidates), generator=generator)[: self.n_total]


def tiny_batch(n_id=4, n_aux=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "x_id": torch.randn(n_id, 3, 4, 4, generator=g, dtype=dtype),
        "y_id": torch.randint(0, 3, (n_id,), generator=g),
        "x_aux": 2 * torch.randn(n_aux, 3, 4, 4, generator=g, dtype=dtype),
    }


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyNet().double().train()


# --- registry and create ---------------------------------------------------------------------------------


def test_registry_names_and_class_attributes():
    assert set(methods.names()) >= {"ce", "oe", "energy", "greg", "greg_plus", "energy_clustering"}
    expect = {
        "ce": ("msp", False),
        "oe": ("msp", True),
        "energy": ("energy", True),
        "greg": ("energy", True),
        "greg_plus": ("energy", True),
        "energy_clustering": ("energy", True),
    }
    for name, (detector, needs_aux) in expect.items():
        m = methods.create(name)
        assert isinstance(m, Method)
        assert (m.detector, m.needs_aux, m.extra_classes) == (detector, needs_aux, 0), name
    assert methods.create("greg").hparams["lambda_grad"] == 1.0
    assert methods.create("energy").hparams["lambda_grad"] == 0.0
    assert methods.create("oe").hparams["lambda_grad"] == 0.0
    assert methods.create("oe").hparams["grad_score"] == "msp"
    assert methods.create("energy_clustering").hparams["lambda_grad"] == 0.0
    hp = methods.create("greg_plus").hparams
    assert (hp["lambda_grad"], hp["n_clusters"], hp["n_selected"], hp["two_way"]) == (1.0, 64, 128, True)
    assert (hp["lambda_S"], hp["m_in"], hp["m_out"]) == (0.1, -25.0, -7.0)


def test_create_merges_defaults_without_mutating_them():
    m = methods.create("energy", m_in=-23, m_out=-5)
    assert (m.hparams["m_in"], m.hparams["m_out"], m.hparams["lambda_S"]) == (-23, -5, 0.1)
    assert methods.METHODS.get("energy").defaults["m_in"] == -25.0


def test_create_errors():
    with pytest.raises(KeyError, match="unknown method 'gregg'.*'greg'"):
        methods.create("gregg")
    with pytest.raises(ValueError, match="unknown hparam.*'lamda_grad'.*did you mean 'lambda_grad'"):
        methods.create("greg", lamda_grad=1.0)
    with pytest.raises(ValueError, match="grad_reduction"):
        methods.create("greg", grad_reduction="sum")
    with pytest.raises(ValueError, match="grad_score"):
        methods.create("oe", grad_score="nope")
    with pytest.raises(ValueError, match="n_clusters"):
        methods.create("greg_plus", n_clusters=0)


def test_missing_aux_is_a_clear_error():
    b = tiny_batch()
    del b["x_aux"]
    with pytest.raises(ValueError, match="x_aux"):
        methods.create("energy").compute_loss(tiny_model(), b)


# --- loss values -----------------------------------------------------------------------------------------


def test_ce_matches_cross_entropy():
    model, b = tiny_model(), tiny_batch()
    out = methods.create("ce").compute_loss(model, b)
    # the method ignores x_aux: BN batch statistics come from the ID rows only
    ref = F.cross_entropy(model(b["x_id"]), b["y_id"])
    assert out["total"].item() == pytest.approx(ref.item(), abs=1e-12)
    assert out["total"].requires_grad and not out["ce"].requires_grad


def test_energy_loss_pure_hand_values():
    s_id = torch.tensor([-30.0, -20.0, -24.0])  # relu(S + 25) = 0, 5, 1
    s_aux = torch.tensor([-10.0, -5.0])  # relu(-7 - S) = 3, 0
    assert energy_loss(s_id, s_aux, -25.0, -7.0).item() == pytest.approx(26 / 3 + 9 / 2)


def test_energy_method_hand_values():
    # logits are the inputs: ID [0,0] (label 0), [ln3,0] (label 0); aux [0,0], [ln3,0]; S = -ln2, -ln4
    a = math.log(3.0)
    rows = torch.tensor([[0.0, 0.0], [a, 0.0]], dtype=torch.float64)
    b = {"x_id": rows, "y_id": torch.tensor([0, 0]), "x_aux": rows.clone()}
    out = methods.create("energy", m_in=-1.0, m_out=-1.0, lambda_S=0.1).compute_loss(IdentityNet(), b)
    ce = (math.log(2) + math.log(4 / 3)) / 2
    # ID: relu(S + 1)^2 = (1 - ln2)^2, 0; aux: relu(-1 - S)^2 = 0, (ln4 - 1)^2
    l_s = (1 - math.log(2)) ** 2 / 2 + (math.log(4) - 1) ** 2 / 2
    assert out["ce"].item() == pytest.approx(ce, abs=1e-12)
    assert out["energy"].item() == pytest.approx(l_s, abs=1e-12)
    assert out["total"].item() == pytest.approx(ce + 0.1 * l_s, abs=1e-12)
    assert "grad" not in out  # lambda_grad = 0: the regularizer is not computed

    # GReg on the same batch: + grad, active rows ID [ln3,0] and aux [0,0] (grad S = -softmax)
    out = methods.create("greg", m_in=-1.0, m_out=-1.0).compute_loss(IdentityNet(), b)
    l_grad = (math.sqrt(0.625) / 2 + math.sqrt(0.5) / 2) / 4
    assert out["grad"].item() == pytest.approx(l_grad, abs=1e-12)
    assert out["total"].item() == pytest.approx(ce + 0.1 * l_s + l_grad, abs=1e-12)


def test_oe_loss_is_kl_to_uniform_plus_log_k():
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    uniform = torch.full_like(logits, 1 / 5)
    kl = F.kl_div(F.log_softmax(logits, 1), uniform, reduction="batchmean")  # KL(uniform || p)
    assert oe_loss(logits).item() == pytest.approx(kl.item() + math.log(5), abs=1e-12)


def test_oe_method_total():
    model, b = tiny_model(), tiny_batch()
    out = methods.create("oe").compute_loss(model, b)
    logits = model(torch.cat([b["x_id"], b["x_aux"]]))  # train mode: same outputs as the method's forward
    p = F.softmax(logits[4:], 1)
    ce_uniform = -(torch.log(p).mean(1)).mean()
    ref = F.cross_entropy(logits[:4], b["y_id"]) + 0.5 * ce_uniform
    assert out["total"].item() == pytest.approx(ref.item(), abs=1e-10)
    assert out["oe"].item() == pytest.approx(ce_uniform.item(), abs=1e-10)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("oe", {}),
        ("oe", {"grad_score": "energy", "grad_reduction": "paper"}),
        ("energy", {}),
        ("energy", {"grad_m_in": -1.2, "grad_m_out": -1.3}),
    ],
)
def test_plus_grad_adds_exactly_lambda_times_l_grad(name, extra):
    model, b = tiny_model(), tiny_batch()
    # margins that make rows active for the tiny net (energies near -ln 3, max softmax near 1/3)
    margins = {"m_in": 0.0, "m_out": -5.0} if name == "energy" else {"grad_m_in": -0.2, "grad_m_out": -0.9}
    if extra.get("grad_score") == "energy":
        margins = {"grad_m_in": 0.0, "grad_m_out": -5.0}
    base = methods.create(name, **{**margins, **extra}).compute_loss(model, b)
    plus = methods.create(name, lambda_grad=0.7, **{**margins, **extra}).compute_loss(model, b)
    # the independent value of L_grad for the method's own score and margins
    hp = methods.create(name, **{**margins, **extra}).hparams
    fallback = (hp["m_in"], hp["m_out"]) if name == "energy" and hp["grad_score"] == "energy" else None
    m_in, m_out = grad_reg.resolve_margins(hp["grad_score"], hp["grad_m_in"], hp["grad_m_out"], fallback)
    x = torch.cat([b["x_id"], b["x_aux"]]).requires_grad_(True)
    s = grad_reg.scores.get(hp["grad_score"])(model(x))
    ref = grad_reg.gradient_penalty(x, s, 4, m_in, m_out, hp["grad_reduction"]).loss
    assert ref.item() > 0
    assert plus["grad"].item() == pytest.approx(ref.item(), abs=1e-12)
    assert (plus["total"] - base["total"]).item() == pytest.approx(0.7 * ref.item(), abs=1e-12)


def test_energy_plus_grad_is_greg():
    model, b = tiny_model(), tiny_batch()
    a = methods.create("energy", lambda_grad=1.0, m_in=0.0, m_out=-5.0).compute_loss(model, b)
    g = methods.create("greg", m_in=0.0, m_out=-5.0).compute_loss(model, b)
    assert a["total"].item() == g["total"].item() and a["grad"].item() > 0


def test_greg_total_backprops_through_input_gradient():
    model, b = tiny_model(), tiny_batch()
    out = methods.create("greg", m_in=0.0, m_out=-5.0).compute_loss(model, b)
    out["total"].backward()
    with_grad = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    out0 = methods.create("greg", m_in=0.0, m_out=-5.0, lambda_grad=0.0).compute_loss(model, b)
    out0["total"].backward()
    # the regularizer contributes a parameter gradient (double backprop), and everything is finite
    assert all(torch.isfinite(v).all() for v in with_grad.values())
    assert not torch.allclose(with_grad["conv.weight"], model.conv.weight.grad)


def test_base_state_dict_and_hooks():
    m = methods.create("greg")
    assert m.state_dict() == {}
    m.load_state_dict({})
    m.on_epoch_start(tiny_model(), 0)
    with pytest.raises(ValueError, match="no state"):
        m.load_state_dict({"x": 1})


def test_default_train_step_is_one_sgd_update_and_none_on_a_non_finite_total():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    # independent: the CE gradient of a linear model, (softmax - onehot)^T x / N
    p = torch.softmax(x @ w0.T + b0, dim=1) - F.one_hot(y, 2).float()
    want_w, want_b = w0 - 0.1 * p.T @ x / 4, b0 - 0.1 * p.mean(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    terms = methods.create("ce").train_step(model, {"x_id": x, "y_id": y}, opt)
    assert torch.allclose(model.weight, want_w, atol=1e-6) and torch.allclose(model.bias, want_b, atol=1e-6)
    assert float(terms["total"].detach()) == pytest.approx(float(F.cross_entropy(x @ w0.T + b0, y)), rel=1e-6)

    class NaNLoss(Method):
        def compute_loss(self, model, batch):
            return {"total": model(batch["x_id"]).sum() * float("nan")}

    w1 = model.weight.detach().clone()
    terms = NaNLoss().train_step(model, {"x_id": x, "y_id": y}, opt)
    assert math.isnan(float(terms["total"].detach())) and torch.equal(model.weight, w1)  # no update


# --- GReg+ -----------------------------------------------------------------------------------------------


def make_plus(name="greg_plus", seed=0, n_selected=5, **kw):
    m = methods.create(name, seed=seed, n_selected=n_selected, m_in=0.0, m_out=-5.0, **kw)
    m.sampler = FakeSampler(n_selected)
    return m


def test_greg_plus_selects_subset_and_loss_is_greg_on_selection():
    model, b = tiny_model(), tiny_batch(n_aux=12)
    m = make_plus()
    out = m.compute_loss(model, b)
    idx = m.last_selected
    assert len(idx) == 5 and len(set(idx.tolist())) == 5
    assert ((idx >= 0) & (idx < 12)).all()
    ref = methods.create("greg", m_in=0.0, m_out=-5.0).compute_loss(model, {**b, "x_aux": b["x_aux"][idx]})
    for key in ("total", "ce", "energy", "grad"):
        assert out[key].item() == pytest.approx(ref[key].item(), abs=1e-12), key
    assert out["n_aux_selected"].item() == 5


def test_greg_plus_same_seed_same_selection_and_resume():
    model, b = tiny_model(), tiny_batch(n_aux=12)
    m1, m2 = make_plus(seed=7), make_plus(seed=7)
    sel1 = [m1.select(model, b["x_aux"]).tolist() for _ in range(3)]
    sel2 = [m2.select(model, b["x_aux"]).tolist() for _ in range(3)]
    assert sel1 == sel2 and sel1[0] != sel1[1]
    assert make_plus(seed=8).select(model, b["x_aux"]).tolist() != sel1[0]
    # resume: the state after step 1 reproduces steps 2 and 3 in a fresh method with another seed
    m3 = make_plus(seed=7)
    m3.select(model, b["x_aux"])
    state = m3.state_dict()
    m4 = make_plus(seed=123)
    m4.load_state_dict(state)
    assert [m4.select(model, b["x_aux"]).tolist() for _ in range(2)] == sel1[1:]


def test_energy_clustering_is_greg_plus_without_grad():
    model, b = tiny_model(), tiny_batch(n_aux=12)
    m = make_plus("energy_clustering")
    assert isinstance(m, type(methods.create("greg_plus")))
    out = m.compute_loss(model, b)
    assert "grad" not in out
    ref = methods.create("energy", m_in=0.0, m_out=-5.0).compute_loss(
        model, {**b, "x_aux": b["x_aux"][m.last_selected]}
    )
    assert out["total"].item() == pytest.approx(ref["total"].item(), abs=1e-12)


def test_greg_plus_with_real_sampler():
    model, b = tiny_model(), tiny_batch(n_aux=24)
    model.eval()
    model.bn.train()  # mixed modes must be restored by the sampler
    m1 = methods.create("greg_plus", n_clusters=4, n_selected=8, seed=3, m_in=0.0, m_out=-5.0)
    m2 = methods.create("greg_plus", n_clusters=4, n_selected=8, seed=3, m_in=0.0, m_out=-5.0)
    idx1, idx2 = m1.select(model, b["x_aux"]), m2.select(model, b["x_aux"])
    assert not model.training and model.bn.training
    assert torch.equal(idx1, idx2)
    assert len(idx1) == 8 and len(set(idx1.tolist())) == 8 and ((idx1 >= 0) & (idx1 < 24)).all()
    state = m1.state_dict()
    nxt = m1.select(model, b["x_aux"])
    m3 = methods.create("greg_plus", n_clusters=4, n_selected=8, seed=99, m_in=0.0, m_out=-5.0)
    m3.load_state_dict(state)
    assert torch.equal(m3.select(model, b["x_aux"]), nxt)
    model.train()
    out = m1.compute_loss(model, b)
    assert torch.isfinite(out["total"]) and out["n_aux_selected"].item() == 8


def test_every_module_of_a_package_is_imported_so_a_new_method_is_one_file(tmp_path, monkeypatch):
    """greg.methods and greg.detectors import all their public modules (registry.import_package_modules):
    a new file registers itself with no import line elsewhere."""
    import sys

    from greg.registry import import_package_modules

    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "new_method.py").write_text("")
    (pkg / "_private.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_package_modules("plugpkg", [str(pkg)])
    assert "plugpkg.new_method" in sys.modules and "plugpkg._private" not in sys.modules
    for m in ("plugpkg", "plugpkg.new_method"):
        monkeypatch.delitem(sys.modules, m)
    # the real packages: every @METHODS.register / @DETECTORS.register in their files is registered
    import re
    from pathlib import Path

    from greg import detectors
    for package, registry in ((methods, methods.METHODS), (detectors, detectors.DETECTORS)):
        declared = {n for f in Path(package.__file__).parent.glob("*.py")
                    for n in re.findall(r'@[A-Z]+\.register\("(\w+)"\)', f.read_text())}
        assert declared and declared == set(registry.names())
