"""The training objective under both prediction types (diffusion.Objective)."""
import pytest
import torch

from defectlab import model
from defectlab.diffusion import Objective
from defectlab.errors import DefectlabError


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
