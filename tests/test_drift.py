"Properties of the drifting field a user relies on (the notebook 00_drift shows them at length)."
import math
import pytest
import torch
from drifting_nb.drift import (compute_V, drifting_loss, feature_drift, feature_drifting_loss, alpha_to_weight,
                               sample_alpha, NORMALIZATIONS)

g = torch.Generator().manual_seed(0)

@pytest.mark.parametrize("normalize", NORMALIZATIONS)
def test_batched_antisymmetry_and_equilibrium(normalize):
    x, p, q = torch.randn(4, 20, 5, generator=g), torch.randn(4, 30, 5, generator=g) + 1, torch.randn(4, 25, 5, generator=g)
    torch.testing.assert_close(compute_V(x, p, q, tau=0.7, normalize=normalize),
                               -compute_V(x, q, p, tau=0.7, normalize=normalize), atol=1e-5, rtol=1e-4)
    Vpp = compute_V(x, p, p.clone(), tau=0.7, normalize=normalize)
    assert Vpp.abs().max() < 1e-5 * max(1.0, compute_V(x, p, q, tau=0.7, normalize=normalize).abs().max())
    # batched == one problem at a time
    torch.testing.assert_close(compute_V(x, p, q, tau=0.7, normalize=normalize)[2],
                               compute_V(x[2], p[2], q[2], tau=0.7, normalize=normalize), atol=1e-6, rtol=1e-5)

def test_bad_normalize_is_named():
    with pytest.raises(ValueError, match="normalize"):
        compute_V(torch.randn(3, 2), torch.randn(3, 2), normalize="rows")

def test_loss_gradient_is_minus_two_V():
    x = torch.randn(10, 3, generator=g).requires_grad_()
    p = torch.randn(12, 3, generator=g)
    drifting_loss(x, p, tau=0.3).backward()
    torch.testing.assert_close(x.grad, -2 * compute_V(x.detach(), p, tau=0.3) / x.numel())

def test_feature_loss_scale_invariance_and_cfg_weights():
    gen, pos, unc = torch.randn(6, 8, 16, generator=g), torch.randn(6, 8, 16, generator=g) + 0.5, torch.randn(6, 4, 16, generator=g)
    w = torch.full((6, 4), 2.0)
    V1, i1 = feature_drift(gen, pos, unc, w)
    V2, i2 = feature_drift(5 * gen, 5 * pos, 5 * unc, w)
    torch.testing.assert_close(V1, V2, atol=1e-3, rtol=1e-3)
    # a larger CFG weight pushes the samples harder away from the unconditional negatives
    toward_unc = unc.mean(1, keepdim=True) - gen
    pulls = [(feature_drift(gen, pos, unc, w, drift_norm=False)[0] * toward_unc).sum(-1).mean() for w in (0.0, 2.0, 8.0)]
    assert pulls[0] > pulls[1] > pulls[2], pulls

def test_feature_loss_moves_samples_toward_data():
    "A few gradient steps on the features themselves reduce the distance to the positives."
    gen = torch.randn(4, 32, 8, generator=g).requires_grad_()
    pos = torch.randn(4, 32, 8, generator=g) + 3.0
    opt = torch.optim.SGD([gen], lr=50.0)
    d0 = (gen.mean(1) - pos.mean(1)).norm()
    for _ in range(50):
        opt.zero_grad(); feature_drifting_loss(gen, pos)[0].backward(); opt.step()
    assert (gen.mean(1) - pos.mean(1)).norm() < 0.3 * d0

def test_alpha_weight_and_sampling():
    a = sample_alpha(50_000, k=5, generator=torch.Generator().manual_seed(3))
    assert 1.0 <= a.min() and a.max() <= 4.0
    # E[alpha] for p ~ a^-5 on [1,4]: (4/3)(1-4^-3)/(1-4^-4)
    expect = (4 / 3) * (1 - 4 ** -3) / (1 - 4 ** -4)
    assert abs(a.mean().item() - expect) < 0.01
    w = alpha_to_weight(a, 64, 32)
    gamma = 32 * w / (63 + 32 * w)
    torch.testing.assert_close(1 / (1 - gamma), a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError): alpha_to_weight(2.0, 64, 0)
