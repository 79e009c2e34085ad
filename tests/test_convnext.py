"""The pixel recipes' ConvNeXt-V2 features as the authors' release computes them (SPEC 12; nbs/03_features.ipynb).

tests/fixtures/convnext holds a tiny random transformers ConvNeXt-V2 in the hub's layout and the features the release's
own JAX code computed from it (written by tools/convnext_fixtures.py)."""
import json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from drifting_nb.features import ConvNeXtV2Features, convnextv2_features, merge_feature_fns

FIX = Path(__file__).parent / "fixtures" / "convnext"


@pytest.fixture(scope="module")
def enc():
    return convnextv2_features(FIX)


@pytest.mark.parametrize("name", ["x256", "x64"])
def test_every_feature_matches_the_release(enc, name):
    io = np.load(FIX / "io.npz")
    x = torch.from_numpy(io[f"{name}/x"].astype(np.float32))       # generated pixels, partly beyond [-1, 1]
    with torch.no_grad(): feats = enc(x)
    keys = list(io[f"{name}/keys"])
    assert list(feats) == keys and len(keys) == 13
    for k in keys:
        ref = io[f"{name}/act/{k}"]
        got = feats[k].numpy()
        assert got.shape == ref.shape, k
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), k


def test_frozen_and_differentiable_in_the_pixels(enc):
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    feats = enc(x)
    sum(f.square().sum() for f in feats.values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(f.dtype == torch.float32 for f in enc(x.detach()).values())


def test_stage_outputs_are_standardised_per_location(enc):
    with torch.no_grad():
        x = torch.rand(1, 3, 48, 48) * 2 - 1
        feats, maps = enc(x), enc.feature_maps(x)
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(8, 56, 56), (16, 28, 28), (24, 14, 14), (32, 7, 7)]
    for i in (1, 2, 3):
        y = maps[f"stage{i}"].flatten(2).transpose(1, 2)
        sigma = y.std(-1, keepdim=True, correction=0)
        torch.testing.assert_close(feats[f"convenxt_stage_{i}"], (y - y.mean(-1, keepdim=True)) / (sigma + 1e-3))
    z = feats["convenxt_stage_2"]
    torch.testing.assert_close(feats["convenxt_stage_2_mean"], z.mean(1, keepdim=True))
    torch.testing.assert_close(feats["convenxt_stage_2_std"], (z.var(1, keepdim=True, correction=0) + 1e-6).sqrt())


def test_global_mean_is_the_pooled_output(enc):
    x = torch.rand(2, 3, 224, 224) * 2 - 1                        # already 224: no resizing
    with torch.no_grad():
        pooled = enc.model(enc.normalize(x)).pooler_output
        got = enc(x)["global_mean"][:, 0]
    torch.testing.assert_close(got, pooled, rtol=1e-3, atol=1e-3 * pooled.abs().max().item())


def test_hub_layout_folder_and_errors(tmp_path):
    with pytest.raises(OSError, match="no ConvNeXt-V2"): convnextv2_features(tmp_path / "missing")
    other = tmp_path / "other"
    shutil.copytree(FIX, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "convnext"}))
    with pytest.raises(ValueError, match="not a ConvNeXt-V2"): convnextv2_features(other)
    from safetensors.torch import load_file, save_file
    part = tmp_path / "part"
    shutil.copytree(FIX, part)
    sd = load_file(part / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "layernorm" not in k}, str(part / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"): convnextv2_features(part)


def test_training_adds_the_convnext_terms_to_the_mae(tmp_path):
    from drifting_nb.features import build_encoder, save_encoder
    from drifting_nb.train import TrainConfig, build_phi
    save_encoder(build_encoder("pixel", width=4), tmp_path / "mae")
    cfg = TrainConfig(space="pixel", encoder_path=str(tmp_path / "mae"), extra_encoder=f"convnextv2:{FIX}")
    phi = build_phi(cfg, "cpu")
    with torch.no_grad(): feats = phi(torch.rand(2, 3, 64, 64) * 2 - 1)
    cnx = [k for k in feats if k.startswith("convnext/")]
    assert len(cnx) == 13 and "convnext/global_mean" in feats and any(k.startswith("mae/") for k in feats)
    with pytest.raises(ValueError, match="convnextv2:"):
        build_phi(TrainConfig(encoder_path=str(tmp_path / "mae"), extra_encoder=f"resnet:{FIX}"), "cpu")


def test_features_are_float32_under_the_callers_bf16_autocast(enc):
    "The release runs ConvNeXt-V2 in float32 (`convnext_bf16` defaults to false): a bf16 step must not change the terms."
    x = (torch.rand(2, 3, 64, 64) * 2.2 - 1.1).requires_grad_()
    with torch.no_grad(): ref = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = enc(x)
        maps = enc.feature_maps(x)
    assert all(m.dtype == torch.float32 for m in maps.values())
    for k, r in ref.items():
        assert got[k].dtype == torch.float32, k
        assert (got[k] - r).abs().max() <= 1e-4 * r.abs().max(), k
    sum(f.square().mean() for f in got.values()).backward()             # still differentiable in the pixels
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
