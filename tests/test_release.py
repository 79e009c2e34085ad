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


# RoPE precision (issue 24): the released latent generators run with use_bf16 and attn_fp32 false, where the release
# builds its RoPE tables and rotates q, k in bfloat16. rope_bf16.npz and gen_bf16/ hold what the release's own code
# computes (tools/release_rope_fixtures.py).
ROPE = FIX / "rope_bf16.npz"
ROPE_SETTINGS = {"f32": torch.float32, "bf16_ropef32": torch.float32, "bf16_ropebf16": torch.bfloat16}


@pytest.mark.parametrize("hd", [16, 64])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_rope_tables_are_the_releases(hd, dtype):
    from drifting_nb.generator import rope_1d
    io = np.load(ROPE)
    cos, sin = rope_1d(hd, 272, dtype=torch.float32 if dtype == "f32" else torch.bfloat16)
    for ours, name in ((cos, "cos"), (sin, "sin")):
        theirs = torch.from_numpy(io[f"{name}{hd}_{dtype}"])                     # [272, hd/2], repeated in the layout
        torch.testing.assert_close(ours.float(), torch.cat([theirs, theirs], 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("setting", list(ROPE_SETTINGS))
def test_rope_rotates_q_and_k_as_the_release(setting):
    "Given the release's own q, k after QK-norm, our rotation in the setting's dtype gives its rotated q, k."
    from drifting_nb.generator import apply_rope, rope_1d
    io = np.load(ROPE)
    dt = ROPE_SETTINGS[setting]
    tables = rope_1d(16, 272, dtype=dt)
    for x in ("q", "k"):
        before = torch.from_numpy(io[f"attn/{setting}/{x}_norm"]).transpose(1, 2)  # [N,H,L,hd], bf16 values in bf16 runs
        got = apply_rope(before.to(dt), *tables)
        assert got.dtype == dt
        want = torch.from_numpy(io[f"attn/{setting}/{x}"]).transpose(1, 2)
        torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-5)


def _release_attention(io, attn_fp32=True):
    from drifting_nb.generator import Attention
    att = Attention(16, 1, attn_fp32=attn_fp32)
    p = lambda k: torch.from_numpy(io[f"attn/p/{k}"])
    with torch.no_grad():
        att.qkv.weight.copy_(p("TorchLinear_0/Dense_0/kernel").T); att.qkv.bias.copy_(p("TorchLinear_0/Dense_0/bias"))
        att.proj.weight.copy_(p("TorchLinear_1/Dense_0/kernel").T); att.proj.bias.copy_(p("TorchLinear_1/Dense_0/bias"))
        att.q_norm.weight.copy_(p("q_norm/weight")); att.k_norm.weight.copy_(p("k_norm/weight"))
    return att


def test_attention_layer_matches_the_release():
    "float32: the whole layer to 1e-5; bf16 (either RoPE): within bf16 rounding (the release's bf16 matmuls and "
    "softmax are not torch's; what can be compared exactly is the rotation above)."
    from drifting_nb.generator import rope_1d
    io = np.load(ROPE)
    x = torch.from_numpy(io["attn/x"])
    with torch.no_grad():
        got = _release_attention(io)(x, rope_1d(16, 272))
        want = io["attn/f32/out"]
        assert np.abs(got.numpy() - want).max() <= 1e-5 * np.abs(want).max()
        for setting, fp32 in (("bf16_ropef32", True), ("bf16_ropebf16", False)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = _release_attention(io, fp32)(x, rope_1d(16, 272, dtype=ROPE_SETTINGS[setting]))
            want = io[f"attn/{setting}/out"]
            assert np.abs(got.float().numpy() - want).max() <= 0.02 * np.abs(want).max(), setting


def test_released_bf16_generator_gets_bf16_rope_from_its_metadata():
    io = np.load(FIX / "gen_bf16" / "io.npz")
    model = load_generator(FIX / "gen_bf16")
    meta = json.loads((FIX / "gen_bf16" / "metadata.json").read_text())["model_config"]
    assert meta["use_bf16"] and not meta["attn_fp32"] and model.rope_fp32 is False
    assert load_generator(FIX / "gen_latent").rope_fp32 is True                 # float32 releases: float32 RoPE
    args = (torch.from_numpy(io["x"]).permute(0, 3, 1, 2), torch.from_numpy(io["c"]).long(),
            torch.from_numpy(io["cfg_scale"]), torch.from_numpy(io["noise_labels"]).long())
    scale = np.abs(io["out_f32"]).max()
    with torch.no_grad():
        f32 = model(*args).numpy().transpose(0, 2, 3, 1)                       # no autocast: float32 throughout
        assert np.abs(f32 - io["out_f32"]).max() <= 1e-5 * scale
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.rope_tables("cpu")[0].dtype == torch.bfloat16
            bf16 = model(*args).float().numpy().transpose(0, 2, 3, 1)
    # the release's whole network is bf16 (residual stream, adaLN, MLP); under autocast ours is not: samples agree
    # to bf16 precision, not bit for bit
    assert np.abs(bf16 - io["out"]).max() <= 0.03 * scale
