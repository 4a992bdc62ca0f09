"""The gradient regularizer (greg.methods.grad_reg) against hand values and independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nets import IdentityNet, TinyNet
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call

from greg import diagnostics, methods
from greg.methods import grad_reg


def energy(logits):
    return -torch.logsumexp(logits, dim=1)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TinyNet(c_in=2, width=3).double().train()
    x_id = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y_id = torch.tensor([0, 1, 2])
    x_aux = torch.randn(4, 2, 4, 4, dtype=torch.float64) * 2
    # margins in the middle of each group's energies so that some rows are active and some are not
    with torch.no_grad():
        s = energy(model(torch.cat([x_id, x_aux])))
    m_in = float(s[:3].median())
    m_out = float(s[3:].median())
    return model, x_id, y_id, x_aux, m_in, m_out


def official_reference(model, x, n_id, m_in, m_out):
    """The released code path: a SECOND forward inside a Jacobian of J, per-row norms, mean over N."""

    def j_fn(xx):
        s = energy(model(xx))
        return -torch.relu(m_in - s[:n_id]).mean() + torch.relu(s[n_id:] - m_out).mean()

    g = jacobian(j_fn, x)
    return g.flatten(1).norm(dim=1).mean()


def test_hand_values_identity_model():
    # logits rows: ID [0,0], [ln3,0]; aux [0,0], [ln3,0]; S = -ln2, -ln4, -ln2, -ln4; grad S = -softmax.
    model = IdentityNet()
    a = math.log(3.0)
    x_id = torch.tensor([[0.0, 0.0], [a, 0.0]], dtype=torch.float64)
    x_aux = x_id.clone()
    x = torch.cat([x_id, x_aux]).requires_grad_(True)
    s = energy(model(x))
    # m_in = m_out = -1: active rows are ID [ln3,0] (S=-ln4 < -1) and aux [0,0] (S=-ln2 > -1)
    n_active_id, n_active_aux = math.sqrt(0.75**2 + 0.25**2), math.sqrt(0.5)
    off = grad_reg.gradient_penalty(x, s, 2, -1.0, -1.0, "official")
    assert off.loss.item() == pytest.approx((n_active_id / 2 + n_active_aux / 2) / 4, abs=1e-12)
    assert off.row_norms.tolist() == pytest.approx([0.0, n_active_id / 2, n_active_aux / 2, 0.0], abs=1e-12)
    pap = grad_reg.gradient_penalty(x, s, 2, -1.0, -1.0, "paper")
    assert pap.loss.item() == pytest.approx(n_active_id / 2 + n_active_aux / 2, abs=1e-12)


def test_official_matches_second_forward_jacobian(setup):
    model, x_id, y_id, x_aux, m_in, m_out = setup
    method = methods.create("greg", m_in=m_in, m_out=m_out)
    out = method.compute_loss(model, {"x_id": x_id, "y_id": y_id, "x_aux": x_aux})
    x = torch.cat([x_id, x_aux])
    ref = official_reference(model, x, 3, m_in, m_out)
    assert ref.item() > 0  # some rows active
    assert out["grad"].item() == pytest.approx(ref.item(), abs=1e-10)
    # the rest of the total, by independent formulas on a third forward (train mode: same outputs)
    logits = model(x)
    s = energy(logits)
    ce = F.cross_entropy(logits[:3], y_id)
    l_s = torch.relu(s[:3] - m_in).pow(2).mean() + torch.relu(m_out - s[3:]).pow(2).mean()
    expected = ce + 0.1 * l_s + 1.0 * ref
    assert out["total"].item() == pytest.approx(expected.item(), abs=1e-10)
    assert out["ce"].item() == pytest.approx(ce.item(), abs=1e-12)
    assert out["energy"].item() == pytest.approx(l_s.item(), abs=1e-12)


def test_paper_reduction_train_mode_matches_jacobian(setup):
    model, x_id, _, x_aux, m_in, m_out = setup
    x = torch.cat([x_id, x_aux])

    def j_sum(xx):
        s = energy(model(xx))
        return -torch.relu(m_in - s[:3]).sum() + torch.relu(s[3:] - m_out).sum()

    norms = jacobian(j_sum, x).flatten(1).norm(dim=1)
    ref = norms[:3].mean() + norms[3:].mean()
    xl = x.clone().requires_grad_(True)
    pen = grad_reg.gradient_penalty(xl, energy(model(xl)), 3, m_in, m_out, "paper")
    assert pen.loss.item() == pytest.approx(ref.item(), abs=1e-10)


def test_paper_reduction_eval_mode_formula_and_official_relation(setup):
    model, x_id, _, x_aux, _, _ = setup
    model.eval()
    x = torch.cat([x_id, x_aux])
    n, n_id = len(x), 3
    with torch.no_grad():
        s = energy(model(x))
    m_in, m_out = float(s[:n_id].median()), float(s[n_id:].median())
    # per-sample gradients of S from the full Jacobian dS_i/dx_j (eval mode: block diagonal)
    jac = jacobian(lambda xx: energy(model(xx)), x)  # N x N x C x H x W
    off_diag = jac.clone()
    off_diag[torch.arange(n), torch.arange(n)] = 0
    assert off_diag.abs().max().item() == 0.0
    grad_norms = jac[torch.arange(n), torch.arange(n)].flatten(1).norm(dim=1)
    ind_id = (s[:n_id] < m_in).double()
    ind_aux = (s[n_id:] > m_out).double()
    assert ind_id.sum() > 0 and ind_aux.sum() > 0 and ind_id.sum() < n_id
    paper_ref = (ind_id * grad_norms[:n_id]).mean() + (ind_aux * grad_norms[n_id:]).mean()
    xl = x.clone().requires_grad_(True)
    sl = energy(model(xl))
    paper = grad_reg.gradient_penalty(xl, sl, n_id, m_in, m_out, "paper").loss
    official = grad_reg.gradient_penalty(xl, sl, n_id, m_in, m_out, "official").loss
    assert paper.item() == pytest.approx(paper_ref.item(), abs=1e-10)
    assert official.item() == pytest.approx(paper_ref.item() / n, abs=1e-10)


def test_double_backprop_matches_finite_differences():
    torch.manual_seed(1)
    model = (
        TinyNet(c_in=2, width=3, act=nn.Tanh()).double().train()
    )  # smooth, so finite differences are valid
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    names = ["conv.weight", "bn.weight", "head.weight"]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def l_grad(*ws):
        p = {**params, **dict(zip(names, ws))}
        xl = x.clone().requires_grad_(True)
        s = energy(functional_call(model, p, (xl,)))
        # margins with every row active: no hinge kink near the evaluation point
        return grad_reg.gradient_penalty(xl, s, 2, 100.0, -100.0, "official").loss

    inputs = tuple(params[k].clone().requires_grad_(True) for k in names)
    assert l_grad(*inputs).item() > 0
    assert torch.autograd.gradcheck(l_grad, inputs, eps=1e-6, atol=1e-6)


def test_all_rows_inactive_gives_zero_and_finite_grads(setup):
    model, x_id, y_id, x_aux, _, _ = setup
    method = methods.create("greg", m_in=-1e6, m_out=1e6)
    out = method.compute_loss(model, {"x_id": x_id, "y_id": y_id, "x_aux": x_aux})
    assert out["grad"].item() == 0.0 and out["grad_row_norm"].item() == 0.0
    out["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_zero_gradient_row_while_active_no_nan():
    # weights 0 -> logits = bias, S is constant in x: grad S = 0 exactly although every hinge is active
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.zero_()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s = energy(model(x))
    pen = grad_reg.gradient_penalty(x, s, 2, 100.0, -100.0, "official")
    assert pen.loss.item() == 0.0
    pen.loss.backward()
    assert torch.isfinite(model.weight.grad).all() and torch.isfinite(model.bias.grad).all()
    # d/dW ||dS/dx|| at W = 0 is a subgradient; vector_norm's backward gives 0 there
    assert model.weight.grad.abs().max().item() == 0.0
    # the naive norm is what this guards against
    model.zero_grad()
    xl = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(energy(model(xl)).sum(), xl, create_graph=True)
    g.pow(2).sum(1).sqrt().mean().backward()
    assert torch.isnan(model.weight.grad).any()


def test_score_input_grad_norm_hand_and_mode_restored():
    model = IdentityNet()
    a = math.log(3.0)
    x = torch.tensor([[0.0, 0.0], [a, 0.0]])
    expected = (math.sqrt(0.5) + math.sqrt(0.625)) / 2
    assert diagnostics.score_input_grad_norm(model, x, "energy") == pytest.approx(expected, rel=1e-6)
    # msp, S = -max softmax = -p_0 off ties: grad = -p_0 (e_0 - p), norm p_0 p_1 sqrt(2) for K = 2.
    # [ln3, 0]: p = (.75, .25); [ln4, 0]: p = (.8, .2). (At the tie [0, 0] amax splits the gradient: 0.)
    x = torch.tensor([[a, 0.0], [math.log(4.0), 0.0], [0.0, 0.0]])
    expected_msp = (0.75 * 0.25 * math.sqrt(2) + 0.8 * 0.2 * math.sqrt(2) + 0.0) / 3
    assert diagnostics.score_input_grad_norm(model, x, "msp") == pytest.approx(expected_msp, rel=1e-6)


def test_score_input_grad_norm_eval_mode_no_param_grads(setup):
    model, x_id, _, x_aux, _, _ = setup
    x = torch.cat([x_id, x_aux])
    model.train()
    model.bn.eval()  # a frozen BN must stay frozen after the call
    running = model.bn.running_mean.clone()
    with torch.no_grad():  # the trainer may call it anywhere
        value = diagnostics.score_input_grad_norm(model, x)
    assert model.training and not model.bn.training and model.conv.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.bn.running_mean, running)
    model.eval()
    ref = jacobian(lambda xx: energy(model(xx)).sum(), x).flatten(1).norm(dim=1).mean()
    assert value == pytest.approx(ref.item(), rel=1e-9)



def test_score_input_grad_rows_go_in_chunks_with_the_same_norms(setup, monkeypatch):
    # large images go a few rows at a time (1584 ImageNet candidates in one graph took over 50 GB); eval mode
    # makes the rows independent, so the chunked norms are the one-graph norms
    model, x_id, _, x_aux, _, _ = setup
    x = torch.cat([x_id, x_aux])
    whole = diagnostics.score_input_grad_rows(model, x)
    pixels = x.shape[-1] * x.shape[-2]
    monkeypatch.setattr(diagnostics, "GRAD_PIXELS", 3 * pixels)  # 3 rows per chunk
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    chunked = diagnostics.score_input_grad_rows(model, x)
    hook.remove()
    assert seen == [3] * (len(x) // 3) + ([len(x) % 3] if len(x) % 3 else [])
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-9)
    # the trainer's diagnostic: at most an ID batch of rows per graph (here 2 ID rows, 5 candidates)
    monkeypatch.setattr(diagnostics, "GRAD_PIXELS", 2**19)
    seen.clear()
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    rec = diagnostics.score_grad_norms(model, {"x_id": x[:2], "x_aux": x[2:7]}, "energy")
    hook.remove()
    assert seen == [2, 2, 2, 1]
    assert rec["grad_norm_aux"] == pytest.approx(whole[2:7].mean().item(), rel=1e-6)


def test_margin_resolution_and_errors():
    assert grad_reg.resolve_margins("energy", None, None) == (-25.0, -7.0)
    assert grad_reg.resolve_margins("msp", None, -0.3) == (-0.9, -0.3)
    assert grad_reg.resolve_margins("energy", None, None, fallback=(-23.0, -5.0)) == (-23.0, -5.0)
    with pytest.raises(ValueError, match="grad_m_in"):
        grad_reg.resolve_margins("max_logit", None, None)
    assert grad_reg.resolve_margins("max_logit", -10, -2) == (-10.0, -2.0)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="require grad"):
        grad_reg.gradient_penalty(x, x.sum(1), 1, 0.0, 0.0)
