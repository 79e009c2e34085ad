"The authors' released generators load into drifting_nb and give the outputs the release's own JAX code computed."
import json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch

from drifting_nb.release import generator_kwargs, load_generator, read_artifact, read_msgpack, release_parity, resolve_artifact

FIX = Path(__file__).parent / "fixtures" / "release"
GENS = ["gen_latent", "gen_pixel", "gen_plain", "gen_classic"]


@pytest.mark.parametrize("name", GENS)
def test_generator_matches_the_release(name):
    assert release_parity(FIX / name) <= 1e-4


def test_generator_is_called_like_the_release():
    io = np.load(FIX / "gen_latent" / "io.npz")
    model = load_generator(FIX / "gen_latent")
    assert not model.training and model.num_style_tokens == io["noise_labels"].shape[1]
    x = torch.from_numpy(io["x"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(x, torch.from_numpy(io["c"]).long(), torch.from_numpy(io["cfg_scale"]), torch.from_numpy(io["noise_labels"]).long())
        other = model(x, torch.from_numpy(io["c"]).long(), torch.from_numpy(io["cfg_scale"]) + 1, torch.from_numpy(io["noise_labels"]).long())
    assert out.shape == x.shape and not torch.allclose(out, other)    # alpha steers the released network


def copy(tmp_path, name="gen_plain"):
    d = tmp_path / name
    shutil.copytree(FIX / name, d)
    return d


def test_folder_without_metadata(tmp_path):
    d = copy(tmp_path)
    (d / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="metadata.json"): load_generator(d)


def test_truncated_msgpack(tmp_path):
    d = copy(tmp_path)
    raw = (d / "ema_params.msgpack").read_bytes()
    (d / "ema_params.msgpack").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match="truncated"): load_generator(d)


def test_unsupported_option_is_named(tmp_path):
    d = copy(tmp_path)
    meta = json.loads((d / "metadata.json").read_text())
    meta["model_config"]["use_moe"] = True
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="use_moe"): load_generator(d)


def test_misshaped_weights_name_the_parameter(tmp_path):
    d = copy(tmp_path)
    meta = json.loads((d / "metadata.json").read_text())
    meta["model_config"]["num_classes"] = 11                        # the class table holds 6 rows
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="class_embed.weight"): load_generator(d)


def test_missing_weights_are_named(tmp_path):
    d = copy(tmp_path)
    meta = json.loads((d / "metadata.json").read_text())
    meta["model_config"]["depth"] = 2                              # the artifact has one block
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(KeyError, match="blocks_1"): load_generator(d)


def test_names_and_hub_errors():
    with pytest.raises(ValueError, match="released"): resolve_artifact("latent_XL_sota")
    with pytest.raises(ValueError, match="not a 'gen'"): resolve_artifact("mae_latent_640", kind="gen")


def test_offline_name_says_which_folder_to_download(monkeypatch, tmp_path):
    import huggingface_hub
    def offline(*a, **k): raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="models/gen/jax/latent_L_sota"): load_generator("latent_L_sota")


def test_release_configs_translate():
    kw = generator_kwargs(dict(cond_dim=1024, input_size=32, in_channels=4, patch_size=2, hidden_size=1024, depth=24,
                               num_heads=16, mlp_ratio=4.0, out_channels=4, use_qknorm=True, use_swiglu=True,
                               use_rope=True, use_rmsnorm=True, n_cls_tokens=16, noise_classes=64, noise_coords=32,
                               use_bf16=True, attn_fp32=False, num_classes=1000))
    from drifting_nb.generator import DiT, count_params
    with torch.device("meta"): m = DiT(**kw)
    assert sum(p.numel() for p in m.parameters()) == count_params("L/2") == \
        json.loads((FIX / "param_counts.json").read_text())["L/2"]
