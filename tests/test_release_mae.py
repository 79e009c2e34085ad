"""The authors' released MAE encoders load into drifting_nb's ResNetEncoder/MAE and give their activation dict
(SPEC 6, 12; nbs/12_release.ipynb). Fixtures: tests/fixtures/release/mae_*, written by the release's own JAX code
(tools/release_fixtures.py)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from drifting_nb.features import ResNetEncoder, mae_activations
from drifting_nb.mae import MAE
from drifting_nb.release import load_mae, flatten, read_msgpack

FIXTURES = Path(__file__).parent / "fixtures" / "release"


@pytest.mark.parametrize("name", ["mae_latent", "mae_pixel"])
def test_activation_dict_matches_the_release(name):
    model = load_mae(FIXTURES / name)
    io = np.load(FIXTURES / name / "io.npz")
    x = torch.from_numpy(io["x"]).permute(0, 3, 1, 2)            # the release's BHWC -> BCHW
    with torch.no_grad(): ours = mae_activations(model, x)
    keys = [str(k) for k in io["keys"]]
    assert list(ours) == keys                                     # same keys, same order
    errs = {}
    for k in keys:
        theirs = io[f"act/{k}"]
        assert ours[k].shape == theirs.shape, k
        errs[k] = float(np.abs(ours[k].numpy() - theirs).max() / np.abs(theirs).max())
    worst = max(errs, key=errs.get)
    print(f"{name}: worst {worst} {errs[worst]:.2e}")
    assert errs[worst] <= 1e-4, (worst, errs[worst])


def _copy(tmp_path, name="mae_latent", config=None):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    if config:
        meta = json.loads((d / "metadata.json").read_text())
        meta["model_config"].update(config)
        (d / "metadata.json").write_text(json.dumps(meta))
    return d


def _write_params(folder, flat):
    import msgpack
    tree = {}
    for k, a in flat.items():
        *mods, leaf = k.split("/")
        node = tree
        for m in mods: node = node.setdefault(m, {})
        node[leaf] = msgpack.ExtType(1, msgpack.packb((list(a.shape), a.dtype.name, a.tobytes())))
    (folder / "ema_params.msgpack").write_bytes(msgpack.packb(tree))


def test_truncated_msgpack_is_named(tmp_path):
    d = _copy(tmp_path)
    raw = (d / "ema_params.msgpack").read_bytes()
    (d / "ema_params.msgpack").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="truncated"):
        load_mae(d)


def test_unsupported_option_is_named(tmp_path):
    with pytest.raises(ValueError, match="gn_max_groups"):
        load_mae(_copy(tmp_path, config={"gn_max_groups": 16}))
    with pytest.raises(ValueError, match="dropout_prob"):
        load_mae(_copy(tmp_path, "mae_pixel", config={"dropout_prob": 0.1}))
    # the released configs' training switches load
    assert isinstance(load_mae(_copy(tmp_path / "b", config={"use_bf16": True, "dropout_prob": 0.0})), ResNetEncoder)


def test_misshaped_and_missing_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"encoder/conv1/kernel \(3, 3, 4, 4\)"):
        load_mae(_copy(tmp_path, config={"in_channels": 3}))
    d = _copy(tmp_path / "b")
    flat = flatten(read_msgpack(d / "ema_params.msgpack"))
    flat["encoder/stages_2/layers_3/gn2/scale"] = np.ones(5, np.float32)
    _write_params(d, flat)
    with pytest.raises(ValueError, match="encoder/stages_2/layers_3/gn2/scale"):
        load_mae(d)
    del flat["encoder/stages_2/layers_3/gn2/scale"]
    _write_params(d, flat)
    with pytest.raises(ValueError, match="lacks 1 parameters.*encoder/stages_2/layers_3/gn2/scale"):
        load_mae(d)


def test_decoder_and_head_load(tmp_path):
    "An artifact with decoder/ and fc/ (as the released ones) loads into our MAE: written in the release's layout."
    from drifting_nb.release import _release_names
    torch.manual_seed(0)
    mine = MAE(ResNetEncoder(in_channels=4, width=32, blocks=(1, 1, 2, 1), patch=1), num_classes=3).eval()
    sd = mine.state_dict()
    flat = {}
    for p, key in _release_names(mine).items():
        t = sd[key]
        flat[p] = (t.permute(2, 3, 1, 0) if t.dim() == 4 else t.t() if t.dim() == 2 else t).contiguous().numpy()
    assert sorted(_release_names(mine).values()) == sorted(sd)         # every weight named once
    d = _copy(tmp_path, config=dict(num_classes=3, base_channels=32, layers=[1, 1, 2, 1]))
    _write_params(d, flat)
    back = load_mae(d)
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        (r1, l1), (r2, l2) = mine(x), back(x)
    assert isinstance(back, MAE) and torch.equal(r1, r2) and torch.equal(l1, l2)
    assert not any(p.requires_grad for p in back.parameters())
    with torch.no_grad():
        assert list(mae_activations(back, x)) == list(mae_activations(mine.encoder, x))


def test_training_runs_on_a_released_encoder(tmp_path):
    "--encoder-path with a release artifact folder: the run's phi is 'global' + the release's activation dict."
    from drifting_nb.data import make_fake_imagefolder
    from drifting_nb.train import get_config, train, build_phi, parse_args, resolve_config
    make_fake_imagefolder(tmp_path / "imgs" / "train", num_classes=3, per_class=4, size=(20, 20))
    art = str(FIXTURES / "mae_pixel")                              # 3 channels, input patch 4: 16x16 images -> 4x4
    preset, over, _ = parse_args(["--preset", "tiny-pixel", "--encoder-path", art, "--data-dir", str(tmp_path / "imgs"),
                                  "--output-dir", str(tmp_path / "run"), "--max-steps", "2"])
    cfg = resolve_config(preset, over)
    phi = build_phi(cfg, "cpu")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(): f, ref = phi(x), mae_activations(load_mae(art), x)
    assert list(f) == ["global"] + list(ref)
    summary = train(cfg)
    assert not (tmp_path / "run" / "encoder").exists()             # nothing pretrained: the released encoder is used
    assert summary is not None


def test_parameter_counts_equal_the_releases():
    "The released MAE configs built here (meta device) have the parameter counts the release's code computes."
    from drifting_nb.release import build_mae
    counts = json.loads((FIXTURES / "mae_param_counts.json").read_text())
    for name, mc in counts["configs"].items():
        with torch.device("meta"): m = build_mae(mc)
        ours = {"encoder": m.encoder, "decoder": m.decoder, "fc": m.head}
        assert {k: sum(p.numel() for p in v.parameters()) for k, v in ours.items()} == counts["counts"][name], name
