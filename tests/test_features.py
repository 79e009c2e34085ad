"""The feature encoder, the multi-scale feature set and the feature-space loss (SPEC 3, A.5; nbs/03_features.ipynb)."""
import functools
import json

import pytest
import torch
import torch.nn as nn

from drifting_nb.features import (build_encoder, extract_features, map_stats, multi_feature_drifting_loss,
                                  load_resnet50, with_vae_decoder, merge_feature_fns,
                                  save_encoder, load_encoder, TorchvisionResNetFeatures)

MAPS = ["conv1", "layer1", "layer2", "layer3", "layer4", "layer1_blk2", "layer2_blk2", "layer2_blk4", "layer3_blk2",
        "layer3_blk4", "layer3_blk6", "layer4_blk2"]


@pytest.mark.parametrize("kind,shape", [("latent", (4, 32, 32)), ("pixel", (3, 256, 256))])
def test_feature_dict_keys_and_sizes(kind, shape):
    enc = build_encoder(kind, width=8).requires_grad_(False)
    x = torch.randn(2, *shape)
    maps = enc.feature_maps(x)
    assert list(maps) == MAPS
    sizes = {"conv1": 32, "layer1": 32, "layer2": 16, "layer3": 8, "layer4": 4}
    widths = {"conv1": 8, "layer1": 8, "layer2": 16, "layer3": 32, "layer4": 64}
    feats = extract_features(enc, x)
    assert list(feats)[:2] == ["global", "norm_x"]
    for name, m in maps.items():
        h, c = sizes[name.split("_")[0]], widths[name.split("_")[0]]
        assert m.shape == (2, c, h, h)
        assert feats[name].shape == (2, h * h, c)
        assert feats[f"{name}_mean"].shape == feats[f"{name}_std"].shape == (2, 1, c)
        assert feats[f"{name}_mean_2"].shape == feats[f"{name}_std_2"].shape == (2, h * h // 4, c)
        assert feats[f"{name}_mean_4"].shape == feats[f"{name}_std_4"].shape == (2, h * h // 16, c)
    assert feats["norm_x"].shape == (2, 1, shape[0] * enc.patch ** 2)      # of the patchified input
    assert feats["global"].shape == (2, 1, shape[0] * shape[1] * shape[2])
    assert len(feats) == 2 + 12 * 7
    assert all(f.dim() == 3 and f.shape[0] == 2 for f in feats.values())


def test_feature_values():
    m = torch.randn(3, 5, 8, 8)
    f = map_stats("m", m)
    torch.testing.assert_close(f["m"].reshape(3, 8, 8, 5).permute(0, 3, 1, 2), m)
    torch.testing.assert_close(f["m_mean"][:, 0], m.mean((2, 3)))
    torch.testing.assert_close(f["m_std"][:, 0], (m.var((2, 3), correction=0) + 1e-6).sqrt())
    # 4x4 patch (1, 0): rows 4..7, columns 0..3 (patches in row-major order)
    torch.testing.assert_close(f["m_mean_4"][:, 2], m[:, :, 4:8, 0:4].mean((2, 3)))
    torch.testing.assert_close(f["m_std_4"][:, 2], (m[:, :, 4:8, 0:4].var((2, 3), correction=0) + 1e-6).sqrt())
    rms = extract_features(build_encoder(width=8), torch.full((1, 4, 32, 32), -3.0))["norm_x"]
    torch.testing.assert_close(rms, torch.full((1, 1, 4), 3.0), atol=1e-5, rtol=1e-5)


def test_patchify_order_is_the_releases():
    "Channel (i*p + j)*c + k of a patch is its pixel (i, j) in colour k (einops 'b (h1 h2) (w1 w2) c -> b h1 w1 (h2 w2 c)')."
    enc = build_encoder("pixel", width=4, patch=4)
    x = torch.randn(2, 3, 8, 8)
    xp = enc.patchify(x)
    for i, j, k in [(0, 0, 0), (1, 2, 1), (3, 3, 2)]:
        torch.testing.assert_close(xp[:, (i * 4 + j) * 3 + k], x[:, k, i::4, j::4])
    torch.testing.assert_close(enc.unpatchify(xp), x)


def test_ablation_switches_and_small_maps():
    enc = build_encoder(width=8)
    x = torch.randn(1, 4, 32, 32)
    n = {fs: len(extract_features(enc, x, fs, include_global=False)) for fs in ("a-b", "a-c", "a-d")}
    assert n == {"a-b": 1 + 12 * 3, "a-c": 1 + 12 * 5, "a-d": 1 + 12 * 7}
    assert "global" not in extract_features(enc, x, include_global=False)
    assert list(extract_features(enc, x, every_k_block=None))[-7:] == [f"layer4{s}" for s in
                                                                          ("", "_mean", "_std", "_mean_2", "_mean_4", "_std_2", "_std_4")]
    with pytest.raises(ValueError, match="valid"):
        extract_features(enc, x, "a-e")
    # digits-sized input: a 1x1 map keeps its (constant) std as released; a 2x2 map has 2x2 but no 4x4 patches
    digits = build_encoder(width=8, in_channels=1)
    f = extract_features(digits, torch.randn(2, 1, 8, 8))
    kinds = lambda name: sorted(k[len(name):] for k in f if k.startswith(name) and "blk" not in k[len(name):])
    assert kinds("layer4") == ["", "_mean", "_std"]
    assert kinds("layer3") == ["", "_mean", "_mean_2", "_std", "_std_2"]
    assert kinds("conv1") == ["", "_mean", "_mean_2", "_mean_4", "_std", "_std_2", "_std_4"]
    torch.testing.assert_close(f["layer4_std"], torch.full((2, 1, 64), 1e-3))
    assert all(torch.isfinite(v).all() for v in f.values())


def test_std_gradient_finite_on_constant_patches():
    m = torch.zeros(2, 3, 8, 8, requires_grad=True)          # a dead ReLU region: constant patches
    sum(v.sum() for v in map_stats("m", m).values()).backward()
    assert torch.isfinite(m.grad).all()


def test_release_group_norm_and_stage_norms():
    enc = build_encoder(width=16)
    assert [n.num_groups for n in enc.norms] == [16, 32, 32, 32] and all(n.eps == 1e-6 for n in enc.norms)
    assert enc.stem[1].num_groups == 16 and isinstance(enc.stages[0][0].shortcut, nn.Identity)
    assert not isinstance(enc.stages[1][0].shortcut, nn.Identity)
    # the stage's GroupNorm feeds the next stage: layer{i} is the normalised last block output
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        m = enc.feature_maps(x, every_k_block=3)
        blk = enc.stages[0](enc.stem(x))
    torch.testing.assert_close(m["layer1_blk3"], blk)
    torch.testing.assert_close(m["layer1"], enc.norms[0](blk))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"expected input \[n, 4, H, W\]"):
        build_encoder(width=8).feature_maps(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="divisible by the patch size 8"):
        build_encoder("pixel", width=8).feature_maps(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="valid kinds"):
        build_encoder("audio")


class StandIn(nn.Module):
    "A small generator: noise [n,8] -> latents [n,4,16,16]."
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 4 * 16 * 16))
    def forward(self, z): return self.net(z).reshape(-1, 4, 16, 16)


def test_feature_loss_backpropagates_into_generator():
    torch.manual_seed(0)
    enc = build_encoder(width=8).requires_grad_(False)
    phi = functools.partial(extract_features, enc)
    G = StandIn()
    Nc, Nneg, Npos, Nunc = 3, 6, 5, 4
    gen = G(torch.randn(Nc * Nneg, 8)).reshape(Nc, Nneg, 4, 16, 16)
    pos = torch.randn(Nc, Npos, 4, 16, 16, requires_grad=True)
    unc = torch.randn(Nc, Nunc, 4, 16, 16, requires_grad=True)
    loss, info = multi_feature_drifting_loss(phi, gen, pos, unc, unc_weight=torch.tensor([0.0, 0.5, 2.0]))
    loss.backward()
    keys = list(phi(torch.randn(1, 4, 16, 16)))
    assert [k for k in info if not k.startswith("drift/")] == keys
    assert sorted(k for k in info if k.startswith("drift/")) == sorted(f"drift/{k}" for k in keys)
    assert abs(loss.item() - sum(info[k] for k in keys)) < 1e-3 * loss.item()
    for p in G.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()
    assert pos.grad is None and unc.grad is None
    assert all(p.grad is None for p in enc.parameters())


def test_feature_loss_training_step_moves_samples_toward_data():
    """A few steps of gradient descent on free samples move them toward the data and lower the raw-feature drift.
    Width 64: two channels per GroupNorm group, as the released widths have several (at widths <= 32 the release's
    rule gives one-channel groups, and a random encoder is then blind to a brightness offset)."""
    torch.manual_seed(0)
    phi = functools.partial(extract_features, build_encoder(width=64, in_channels=1).requires_grad_(False),
                            feature_set="a-b", every_k_block=None)
    pos = torch.randn(2, 8, 1, 8, 8) * 0.5 + 1.0
    x = torch.nn.Parameter(torch.randn(2, 8, 1, 8, 8))
    opt = torch.optim.Adam([x], lr=0.05)
    drifts, start = [], x.detach().mean()
    for _ in range(15):
        loss, info = multi_feature_drifting_loss(phi, x, pos)
        drifts.append(info["drift/global"])
        opt.zero_grad(); loss.backward(); opt.step()
    assert x.detach().mean() > start + 0.1                     # the samples moved toward the data (mean 1)
    assert drifts[-1] < drifts[0]


def test_joint_and_separate_phi_agree_and_cfg_weight_matters():
    torch.manual_seed(1)
    phi = functools.partial(extract_features, build_encoder(width=8).requires_grad_(False), feature_set="a-b")
    gen = torch.randn(2, 5, 4, 16, 16, requires_grad=True)
    pos, unc = torch.randn(2, 5, 4, 16, 16), torch.randn(2, 3, 4, 16, 16)
    grads = []
    for joint in (True, False):
        gen.grad = None
        loss, _ = multi_feature_drifting_loss(phi, gen, pos, unc, 1.5, joint=joint)
        loss.backward()
        grads.append((loss.detach(), gen.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-3, atol=1e-6)
    l0, _ = multi_feature_drifting_loss(phi, gen, pos, unc, 0.0)
    l3, _ = multi_feature_drifting_loss(phi, gen, pos, unc, 3.0)
    assert not torch.isclose(l0, l3)


def test_feature_loss_shape_errors():
    phi = functools.partial(extract_features, build_encoder(width=8))
    gen = torch.randn(2, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="pos"):
        multi_feature_drifting_loss(phi, gen, torch.randn(3, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="unc"):
        multi_feature_drifting_loss(phi, gen, torch.randn(2, 3, 4, 16, 16), torch.randn(2, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="unc_weight"):
        multi_feature_drifting_loss(phi, gen, torch.randn(2, 3, 4, 16, 16), torch.randn(2, 3, 4, 16, 16), torch.ones(5))


def _moco_file(path, r50):
    sd = r50.state_dict()
    ckpt = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    ckpt.update({f"module.encoder_k.{k}": v + 1 for k, v in sd.items()})       # the key encoder must not be used
    ckpt["module.queue"] = torch.randn(128, 16)
    ckpt["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": ckpt, "optimizer": {}}, path)


def test_moco_checkpoint_loader(tmp_path):
    import torchvision
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50(weights=None)
    r50.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))   # MoCo-v2 MLP head
    _moco_file(tmp_path / "moco.pth.tar", r50)
    enc = load_resnet50(tmp_path / "moco.pth.tar")
    got = enc.model.state_dict()
    for k, v in r50.state_dict().items():
        if not k.startswith("fc."): assert torch.equal(got[k], v), k
    # SimCLR-style plain torchvision dict (with a linear fc) also loads
    plain = torchvision.models.resnet50(weights=None)
    torch.save(plain.state_dict(), tmp_path / "simclr.pth")
    assert torch.equal(load_resnet50(tmp_path / "simclr.pth").model.conv1.weight, plain.conv1.weight)
    # and the features come out in the shared format
    with torch.no_grad(): f = extract_features(enc, torch.rand(1, 3, 64, 64) * 2 - 1, include_global=False)
    assert f["s4b3"].shape == (1, 4, 2048) and f["s1b2"].shape == (1, 256, 256) and f["s4b3_mean_2"].shape == (1, 1, 2048)


def test_mismatched_checkpoint_is_refused(tmp_path):
    import torchvision
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}},
               tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not a ResNet-50 backbone checkpoint.*missing keys"):
        load_resnet50(tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_resnet50(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_resnet50(tmp_path / "missing.pth")


def _tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=4, sample_size=32)


def test_pixel_encoder_judges_latents_through_vae_decoder():
    vae = _tiny_vae()
    r50 = TorchvisionResNetFeatures().eval().requires_grad_(False)
    phi = with_vae_decoder(functools.partial(extract_features, r50, feature_set="a-b", include_global=False), vae, chunk_size=2)
    G = StandIn()
    gen = G(torch.randn(2 * 3, 8)).reshape(2, 3, 4, 16, 16)[..., :4, :4]   # latents [2,3,4,4,4] -> images 32x32
    loss, info = multi_feature_drifting_loss(phi, gen, torch.randn(2, 3, 4, 4, 4))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    assert all(p.grad is None for p in vae.parameters())
    assert "s4b3_std" in info and "s4b3_mean_2" not in info


def test_merge_and_save_load(tmp_path):
    enc = build_encoder(width=8)
    phi = merge_feature_fns({"a": functools.partial(extract_features, enc),
                             "b": functools.partial(extract_features, enc, feature_set="a-b", include_global=False)})
    f = phi(torch.randn(1, 4, 32, 32))
    assert "a/global" in f and "b/conv1" in f and "b/conv1_mean_2" not in f and "b/global" not in f
    save_encoder(enc, tmp_path / "enc", step=3)
    back = load_encoder(tmp_path / "enc" / "encoder.safetensors")
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(back(x), enc.eval()(x))
    with pytest.raises(FileNotFoundError, match="save_encoder"):
        load_encoder(tmp_path)
    # an encoder saved before drifting_nb adopted the release's architecture is refused, saying so
    meta = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    meta["config"] = dict(in_channels=4, width=8, blocks=[3, 4, 6, 3], patch=1, max_groups=32, every=2)
    (tmp_path / "enc" / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="older drifting_nb architecture"):
        load_encoder(tmp_path / "enc")


def _fixture_features():
    "The per-key drift fixture: inputs by key and the drift each key got alone before keys were batched (18a0c59)."
    from safetensors.torch import load_file
    from pathlib import Path
    t = load_file(str(Path(__file__).parent / "fixtures" / "per_key_drift.safetensors"))
    keys = [k[4:] for k in t if k.startswith("gen.")]
    return t, keys


def test_batched_features_equal_each_feature_alone():
    "Features batched by width (one call, groups) get the drift each got alone in the old one-call-per-feature loss."
    from drifting_nb.drift import feature_drift
    from drifting_nb.features import _problems, key_groups
    t, keys = _fixture_features()
    Nc, Nneg = 3, 8
    Npos = 10
    f_gen = {k: t[f"gen.{k}"] for k in keys}
    groups = key_groups(f_gen)
    assert len(groups) == 3 and sorted(map(len, groups)) == [1, 1, 4]    # widths 8 (4 keys), 16 and 1
    for name, kw in (("xy", {}), ("floor6", dict(min_affinity=1e-6))):
        for ks in groups:
            parts = []
            for k in ks:
                L, r = t[f"gen.{k}"].shape[1], t[f"real.{k}"]
                parts.append((_problems(t[f"gen.{k}"], Nc, Nneg), _problems(r[:Nc * Npos], Nc, Npos),
                              _problems(r[Nc * Npos:], Nc, 4), t["unc_weight"].repeat_interleave(L)[:, None].expand(-1, 4)))
            cat = [torch.cat([p[i] for p in parts]) for i in range(4)]
            V, info = feature_drift(*cat, groups=[p[0].shape[0] for p in parts], **kw)
            for k, v, rms in zip(ks, V.split([p[0].shape[0] for p in parts]), info["drift_norm"]):
                want = t[f"V.{name}.{k}"]
                assert rel(v, want) < 1e-5, (name, k, rel(v, want))
                torch.testing.assert_close(rms, t[f"drift_norm.{name}.{k}"], rtol=1e-5, atol=0)


def rel(a, b): return ((a - b).norm() / b.norm()).item()


def test_multi_feature_loss_batched_equals_per_feature():
    "multi_feature_drifting_loss: each feature's loss and gradient are those of the old per-feature calls."
    t, keys = _fixture_features()
    Nc, Nneg = 3, 8
    leaves = {k: t[f"gen.{k}"].clone().requires_grad_() for k in keys}
    def phi(x):   # x holds row indices: the generated rows (24) or the real ones (42)
        i = x.reshape(len(x)).long()
        return {k: (leaves[k] if len(x) == Nc * Nneg else t[f"real.{k}"])[i] for k in keys}
    gen = torch.arange(Nc * Nneg, dtype=torch.float32).reshape(Nc, Nneg, 1)
    real = torch.arange(Nc * 14, dtype=torch.float32)
    pos, unc = real[:30].reshape(Nc, 10, 1), real[30:].reshape(Nc, 4, 1)
    out = {}
    for group_elems in (0, 10 ** 9):                            # one call per feature, all features of a width in one
        for v in leaves.values(): v.grad = None
        loss, info = multi_feature_drifting_loss(phi, gen, pos, unc, t["unc_weight"], joint=False, group_elems=group_elems)
        loss.backward()
        out[group_elems] = (info, {k: v.grad.clone() for k, v in leaves.items()})
    for k in keys:
        want = t[f"V.xy.{k}"].reshape(Nc, -1, *t[f"V.xy.{k}"].shape[1:]).transpose(1, 2).reshape(t[f"gen.{k}"].shape)
        for info, grads in out.values():
            test_loss = (want ** 2).mean().item()                  # the loss of a feature is mean(V**2)
            assert abs(info[k] - test_loss) <= 1e-5 * test_loss, (k, info[k], test_loss)
            assert rel(grads[k] / grads[k].norm(), -want / want.norm()) < 1e-5, k   # the gradient is -V, scaled

def test_step_stats_make_micro_batches_equal_one_batch():
    """A step run as micro-batches with StepStats (sums pass, ms pass, loss pass) has the one-batch loss and gradients
    to 1e-5; each micro-batch normalised on its own (what grad_accum did before) is percents away."""
    import functools
    from drifting_nb.features import build_encoder, extract_features, multi_feature_drifting_loss, StepStats
    torch.manual_seed(0)
    Nc, Nneg, Npos, Nunc = 4, 6, 5, 3
    phi = functools.partial(extract_features, build_encoder("latent", width=8).requires_grad_(False))
    net, z = torch.nn.Linear(16, 4 * 32 * 32), torch.randn(Nc * Nneg, 16)
    pos, unc, w = torch.randn(Nc, Npos, 4, 32, 32), torch.randn(Nc, Nunc, 4, 32, 32), torch.rand(Nc) * 3
    gen = lambda sl: net(z[sl.start * Nneg:sl.stop * Nneg]).view(sl.stop - sl.start, Nneg, 4, 32, 32)
    loss_of = lambda sl, stats=None: multi_feature_drifting_loss(phi, gen(sl), pos[sl], unc[sl], w[sl], joint=False, stats=stats)
    def grads():
        g = [p.grad.clone() for p in net.parameters()]
        net.zero_grad()
        return g
    loss, _ = loss_of(slice(0, Nc)); loss.backward(); g_one = grads()
    micro = [slice(0, 2), slice(2, 4)]
    st = StepStats()
    with torch.no_grad():
        for _ in range(2):
            for sl in micro: assert loss_of(sl, st) == (None, {})
            st.next_phase()
    total = 0.0
    for sl in micro:
        l, _ = loss_of(sl, st); l.backward(); total += l.item()
    g_micro = grads()
    assert abs(total - loss.item()) < 1e-5 * loss.item()
    assert all(((a - b).abs().max() / a.abs().max()).item() < 1e-5 for a, b in zip(g_one, g_micro))
    for sl in micro: loss_of(sl)[0].backward()                 # statistics of each micro-batch alone
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(g_one, grads())) > 1e-3
    with pytest.raises(RuntimeError, match="complete"): st.add(["global"], torch.zeros(1, 2))
