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


def test_sample_and_evaluate_commands_take_a_release(tmp_path):
    from drifting_nb import evaluate as ev, sample as sample_mod
    import test_evaluate                                          # registers the tiny 'test-tiny' feature extractor
    from drifting_nb.data import tiny_vae
    png = tmp_path / "grid.png"
    sample_mod.main(["--release", str(FIX / "gen_pixel"), "--num-samples", "7", "--batch-size", "4", "--device", "cpu",
                     "--out", str(png)])
    assert png.is_file()
    tiny_vae().save_pretrained(tmp_path / "vae")                   # the real SD-VAE is a download: a local stand-in
    out = sample_mod.main(["--release", str(FIX / "gen_latent"), "--vae", str(tmp_path / "vae"), "--num-samples", "3",
                           "--device", "cpu", "--out", str(tmp_path / "s.npz")])
    assert np.load(out)["samples"].shape == (3, 64, 64, 3)
    imgs = (np.random.default_rng(0).random((40, 32, 32, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=imgs)
    ref = tmp_path / "ref.npz"
    ev.main(["--make-ref-stats", str(tmp_path / "real.npz"), "--out", str(ref), "--feature-extractor", "test-tiny"])
    res = ev.main(["--release", str(FIX / "gen_pixel"), "--ref-stats", str(ref), "--num-samples", "12", "--alpha", "1", "2",
                   "--sweep-num-samples", "12", "--feature-extractor", "test-tiny", "--device", "cpu", "--no-prc"])
    assert res["run"] == str(FIX / "gen_pixel") and res["best"]["alpha"] in (1.0, 2.0) and res["best"]["fid"] > 0
    with pytest.raises(SystemExit):                                # --run and --release exclude each other
        sample_mod.main(["--release", "x", "--run", "y", "--num-samples", "1", "--out", str(png)])


def test_training_starts_from_released_weights():
    from drifting_nb.release import init_from_release
    from drifting_nb.train import build_model, get_config
    plain = dict(patch_size=4, hidden_size=32, depth=1, num_heads=2, num_incontext_tokens=0, num_style_tokens=0)
    cfg = get_config("tiny-latent", image_size=64, num_classes=6, generator="T/2", generator_kw=plain,
                     init_from=str(FIX / "gen_plain"))
    model = init_from_release(build_model(cfg), cfg.init_from)                  # what train() does with --init-from
    ref = load_generator(FIX / "gen_plain")
    for k, v in ref.state_dict().items(): assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="hidden_size"):                        # T/2 as it is: not the release's shape
        init_from_release(build_model(get_config("tiny-latent", image_size=64, num_classes=6)), cfg.init_from)
