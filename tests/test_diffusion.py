"""The training objective under both prediction types (diffusion.Objective)."""
import pytest
import torch

from defectlab.core import model
from defectlab.core.diffusion import Objective
from defectlab.base.errors import DefectlabError


def draw(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, 3, 8, 8), generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 250, 500, 800, 999])[:n]
    var = torch.rand(x0.shape, generator=g) * 2 - 1  # the learned-variance half
    return x0, noise, t, var


def test_v_prediction_target_and_implied_noise():
    obj = Objective({**model.dit_schedule(True), "prediction_type": "v_prediction"})
    x0, noise, t, var = draw()
    xt = obj.add_noise(x0, noise, t)
    v = obj.target(x0, noise, t)
    a, s = obj._at("sqrt_abar", t, 4), obj._at("sqrt_1m_abar", t, 4)
    assert torch.allclose(v, a * noise - s * x0)
    assert torch.allclose(obj.eps(v, xt, t), noise, atol=1e-4)  # v and x_t give back the noise
    mse, _ = obj.loss(torch.cat([v, var], 1), x0, xt, noise, t)
    assert torch.allclose(mse, torch.zeros_like(mse))
    wrong, _ = obj.loss(torch.cat([noise, var], 1), x0, xt, noise, t)  # an eps output is not v
    assert (wrong[2:] > 1e-3).all()


def test_variance_bound_sees_the_same_mean_under_both_prediction_types():
    """The bound only trains the variance half: given outputs that mean the same noise, eps and
    v models get the same vb, so the variance head learns the same way under both."""
    eps_obj = Objective(model.dit_schedule(True))
    v_obj = Objective({**model.dit_schedule(True), "prediction_type": "v_prediction"})
    x0, noise, t, var = draw(1)
    xt = eps_obj.add_noise(x0, noise, t)
    guess = noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))  # an imperfect eps
    a, s = eps_obj._at("sqrt_abar", t, 4), eps_obj._at("sqrt_1m_abar", t, 4)
    x0_guess = (xt - s * guess) / a
    as_v = a * guess - s * x0_guess  # the same prediction written as v
    _, vb_eps = eps_obj.loss(torch.cat([guess, var], 1), x0, xt, noise, t)
    _, vb_v = v_obj.loss(torch.cat([as_v, var], 1), x0, xt, noise, t)
    assert torch.allclose(vb_eps, vb_v, rtol=1e-3, atol=1e-4)
    assert vb_eps.abs().sum() > 0


def test_unsupported_prediction_type_is_one_clear_line():
    with pytest.raises(DefectlabError, match="prediction_type 'sample'"):
        Objective({**model.dit_schedule(True), "prediction_type": "sample"})


def test_weighted_loss_is_a_weighted_mean_over_positions():
    from defectlab.core import masks
    obj = Objective({**model.dit_schedule(True), "prediction_type": "v_prediction"})
    x0, noise, t, var = draw(3)
    xt = obj.add_noise(x0, noise, t)
    out = torch.cat([noise, var], 1)  # wrong everywhere: non-zero error at every position
    plain, vb = obj.loss(out, x0, xt, noise, t)
    ones, vb1 = obj.loss(out, x0, xt, noise, t, torch.ones(len(x0), 1, 8, 8))
    assert torch.allclose(plain, ones) and torch.equal(vb, vb1)  # the bound is never weighted
    mask = torch.zeros(len(x0), 1, 16, 16)
    mask[:, :, :4, :4] = 1  # the top-left 2×2 cells of the 8×8 grid, fully covered
    w = masks.loss_weights(mask, (8, 8), 20.0)
    assert w[0, 0, 0, 0] == 21 and w[0, 0, 2, 2] == 1 and w[0, 0, 0, 2] == 1
    weighted, _ = obj.loss(out, x0, xt, noise, t, w)
    err = (noise - obj.target(x0, noise, t)) ** 2
    corner, rest = err[:, :, :2, :2].mean((1, 2, 3)), err.mean((1, 2, 3))
    n_corner = 4 / 64
    expect = (21 * n_corner * corner + (rest - n_corner * corner)) / (21 * n_corner + 1 - n_corner)
    assert torch.allclose(weighted, expect, rtol=1e-5)
    from defectlab.stages import train
    with pytest.raises(DefectlabError, match="mask_loss must be ≥ 0"):
        train._check(train.TrainConfig(epochs=1, lr=1e-3, mask_loss=-1))
