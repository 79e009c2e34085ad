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

def test_field_is_float32_under_autocast():
    "A bf16 training step's autocast does not reach the field: loss, gradient and V equal their float32 values."
    gen, pos, unc = torch.randn(6, 8, 16, generator=g), torch.randn(6, 8, 16, generator=g) + 0.5, torch.randn(6, 4, 16, generator=g)
    std_like = torch.rand(6, 8, 16, generator=g) * 0.01 + 3.0     # an offset that dwarfs the spread
    w = torch.rand(6, 4, generator=g) * 3
    for feats in (gen, std_like):
        out = []
        for bf16 in (False, True):
            x = feats.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = feature_drifting_loss(x, pos, unc, w)
                V = compute_V(feats[0], pos[0], tau=0.5)
            loss.backward()
            out.append((loss.detach(), x.grad, V))
        for a, b in zip(*out):
            assert b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)

def test_global_batch_needs_torch_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        feature_drift(torch.randn(2, 4, 3), torch.randn(2, 4, 3), global_batch=True)

def _half_of_the_batch(rank, store, data):
    "One of two gloo processes: the loss on its half of the problems, normalised over both halves."
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        gen, pos, unc, w = (t.chunk(2)[rank] for t in data)
        out = {}
        for global_batch in (True, False):
            x = gen.clone().requires_grad_()
            loss, info = feature_drifting_loss(x, pos, unc, w, global_batch=global_batch)
            loss.backward()
            V, _ = feature_drift(gen, pos, unc, w, global_batch=global_batch)
            out[global_batch] = dict(loss=loss.detach(), grad=x.grad, V=V, S=info["mean_dist"], rms=info["drift_norm"])
        out["groups"] = feature_drift(gen, pos, unc, w, global_batch=True, groups=[1, 3])   # two features per process
        torch.save(out, f"{store}.{rank}")
    finally:
        dist.destroy_process_group()

def rel(a, b): return ((a - b).norm() / b.norm()).item()

def test_global_batch_two_processes_equal_one(tmp_path):
    "Two processes with global_batch=True, each holding half of the problems, compute the one-process field."
    import torch.multiprocessing as mp
    g2 = torch.Generator().manual_seed(5)
    B = 8
    data = (torch.randn(B, 8, 12, generator=g2), torch.randn(B, 10, 12, generator=g2) + torch.linspace(0, 2, B)[:, None, None],
            torch.randn(B, 4, 12, generator=g2), torch.rand(B, 4, generator=g2) * 3)
    store = tmp_path / "store"
    mp.spawn(_half_of_the_batch, args=(str(store), data), nprocs=2, join=True)
    halves = [torch.load(f"{store}.{r}", weights_only=True) for r in range(2)]
    x = data[0].clone().requires_grad_()
    loss, info = feature_drifting_loss(x, *data[1:])
    loss.backward()
    V, _ = feature_drift(*data)
    for r, h in enumerate(halves):
        got = h[True]
        assert rel(got["V"], V.chunk(2)[r]) < 1e-5
        assert rel(got["grad"] / 2, x.grad.chunk(2)[r]) < 1e-5             # DDP averages the two processes' gradients
        torch.testing.assert_close(got["S"], info["mean_dist"], rtol=1e-6, atol=0)
        torch.testing.assert_close(got["rms"], info["drift_norm"], rtol=1e-5, atol=0)
    torch.testing.assert_close((halves[0][True]["loss"] + halves[1][True]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=0)
    # without the reduction each half normalises on its own and the field differs
    assert rel(halves[0][False]["V"], V.chunk(2)[0]) > 1e-3
    # features batched in one call (groups) are reduced over the processes each on its own: problems 0, 4 and 1-3, 5-7
    order = [0, 4, 1, 2, 3, 5, 6, 7]
    Vg, ig = feature_drift(*(d[order] for d in data), groups=[2, 6])
    for r, h in enumerate(halves):
        Vh, ih = h["groups"]
        assert rel(Vh, Vg[[r, 2 + 3 * r, 3 + 3 * r, 4 + 3 * r]]) < 1e-5
        torch.testing.assert_close(ih["drift_norm"], ig["drift_norm"], rtol=1e-5, atol=0)
