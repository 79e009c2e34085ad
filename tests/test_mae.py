"""MAE pretraining of the feature encoder (SPEC 6, A.3/A.4; nbs/04_mae.ipynb, nbs/04b_train_mae.ipynb)."""
import json
from pathlib import Path

import pytest
import torch

from drifting_nb.features import build_encoder, extract_features, load_encoder
from drifting_nb.mae import MAE, mae_loss, random_patch_mask, cls_lambda, pretrain_small_mae
from drifting_nb.train_mae import main, make_config, parse_args, train_mae, lr_at


@pytest.mark.parametrize("kind,shape,in_ch", [("latent", (4, 32, 32), None), ("pixel", (3, 256, 256), None),
                                              ("latent", (1, 8, 8), 1)])
def test_mae_reconstructs_input_shape(kind, shape, in_ch):
    mae = MAE(build_encoder(kind, width=8, in_channels=in_ch), num_classes=5)
    rec, logits = mae(torch.randn(2, *shape))
    assert rec.shape == (2, *shape) and logits.shape == (2, 5)


def test_mask_blocks_and_rate():
    g = torch.Generator().manual_seed(0)
    m = random_patch_mask(torch.zeros(256, 4, 32, 32), generator=g)
    assert m.shape == (256, 1, 32, 32)
    assert torch.equal(m, m[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert abs(m.mean().item() - 0.5) < 0.01
    mp = random_patch_mask(torch.zeros(4, 3, 256, 256), encoder_patch=8, generator=g)
    assert torch.equal(mp, mp[:, :, ::16, ::16].repeat_interleave(16, 2).repeat_interleave(16, 3))
    with pytest.raises(ValueError, match="not divisible"):
        random_patch_mask(torch.zeros(1, 4, 33, 33))


def test_loss_counts_masked_entries_only():
    mae = MAE(build_encoder(width=8))
    x = torch.randn(2, 4, 16, 16)
    mask = random_patch_mask(x, generator=torch.Generator().manual_seed(0))
    loss, _ = mae_loss(mae, x, mask)
    loss.backward()
    rec = mae(x * (1 - mask))[0].detach()
    expected = (((rec - x) ** 2 * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3))).mean()   # summed over channels, per masked position
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    # the encoder sees zeros where masked: changing masked input values changes nothing
    x2 = x + 5 * mask
    torch.testing.assert_close(mae(x2 * (1 - mask))[0], mae(x * (1 - mask))[0])


def test_mae_loss_falls_on_digits():
    from drifting_nb.data import digits_split
    train = digits_split().train
    run = pretrain_small_mae(train, in_channels=1, width=8, steps=40, batch_size=64, return_all=True)
    hist = run["history"]
    first, last = sum(hist[:6]) / 6, sum(hist[-6:]) / 6
    assert last < 0.8 * first
    assert last < 0.5 * (train.tensors[0] ** 2).mean().item()     # far better than predicting zeros
    enc = run["encoder"]
    assert enc.in_channels == 1 and not enc.training
    assert not any(torch.equal(a, b) for a, b in zip(enc.parameters(), run["mae"].encoder.parameters()) if a.numel() > 8)


def test_cls_finetune_lambda_and_loss():
    assert [cls_lambda(s, 1000, 0.1) for s in (-1, 0, 250, 1000, 2999)] == [0.0, 0.0, 0.025, 0.1, 0.1]
    mae = MAE(build_encoder(width=8), num_classes=3)
    x, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 1, 2, 0])
    loss, info = mae_loss(mae, x, labels=y, lam=0.1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, 0.9 * info["recon"] + 0.1 * info["ce"])
    with pytest.raises(ValueError, match="num_classes"):
        mae_loss(MAE(build_encoder(width=8)), x, labels=y, lam=0.1)


def test_presets_and_overrides():
    assert make_config("pixel-640").kind == "pixel"
    preset, cfg, args = parse_args(["--preset", "tiny", "--max-steps", "3", "width=12", "blocks=1,2,1,1"])
    assert (preset, cfg.width, cfg.blocks, args.max_steps) == ("tiny", 12, (1, 2, 1, 1), 3)
    with pytest.raises(SystemExit):
        parse_args(["--preset", "nope"])
    with pytest.raises(ValueError, match="valid presets: latent-256, latent-640, pixel-640"):
        make_config("nope")
    with pytest.raises(ValueError, match="unknown key 'depth'; valid keys: kind, width"):
        make_config("tiny", {"depth": "3"})


RELEASE = json.loads((Path(__file__).parent / "fixtures" / "release" / "configs.json").read_text())


@pytest.mark.parametrize("preset,name", [("latent-256", "mae/latent_ablation_256"), ("latent-640", "mae/latent_640"),
                                         ("pixel-640", "mae/pixel_640")])
def test_imagenet_presets_are_the_released_configs(preset, name):
    rel, c = RELEASE[name], make_config(preset)
    model, opt, train, data = rel["model"], rel["optimizer"], rel["train"], rel["dataset"]
    sched = opt["lr_schedule"]
    assert (c.width, c.blocks, c.in_channels, c.patch, c.mask_patch) == (
        model["base_channels"], tuple(model["layers"]), model["in_channels"], model["input_patch_size"], model["patch_size"])
    assert (c.steps, c.warmup_steps, c.lr, c.schedule) == (train["total_steps"], sched["warmup_steps"],
                                                           sched["learning_rate"], {"const": "constant"}[sched["lr_schedule"]])
    assert (c.weight_decay, c.betas, c.ema_decay) == (opt["weight_decay"], (opt["adam_b1"], opt["adam_b2"]), train["ema_decay"])
    fwd = train["forward_dict"]
    assert c.mask_prob == fwd["mask_ratio_min"] == fwd["mask_ratio_max"] and fwd["lambda_cls"] == 0.0
    assert (c.ft_steps, c.ft_ramp_steps, c.ft_lambda, c.ft_lr) == (train["finetune_last_steps"], train["warmup_finetune"],
                                                                   train["finetune_cls"], 0.0)   # 0: the same lr
    assert c.grad_clip == 2.0                                        # the release trainer's max_grad_norm
    assert (c.batch_size, c.num_classes, c.image_size, c.kind) == (
        data["batch_size"], data["num_classes"], data["resolution"], "latent" if data["use_latent"] else "pixel")
    assert data["use_aug"] and (c.crop_scale, c.hflip, c.dataset) == ((0.2, 1.0), True, "imagefolder")
    assert c.vae == "stabilityai/sd-vae-ft-mse"


def _rows(run):
    return [json.loads(l) for l in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_is_the_released_one(tmp_path):
    "Every update of a run: linear from 1e-6 to lr over warmup_steps, then constant (optax.linear_schedule + constant)."
    main(["--preset", "tiny", "--output-dir", str(tmp_path), "log_every=1", "warmup_steps=5", "lr=0.002", "steps=12"])
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        s = r["step"] - 1                                            # the update this row logs
        assert r["lr"] == pytest.approx(1e-6 + (0.002 - 1e-6) * min(s, 5) / 5, rel=1e-12, abs=0)
    c = make_config("digits")                                        # the small presets' cosine and fine-tune lr
    lrs = [lr_at(s, c) for s in range(c.steps)]
    assert lrs[c.warmup_steps] == c.lr and lrs[c.steps - c.ft_steps:] == [c.ft_lr] * c.ft_steps
    assert all(a >= b for a, b in zip(lrs[c.warmup_steps:c.steps - c.ft_steps], lrs[c.warmup_steps + 1:c.steps - c.ft_steps]))


def test_finetune_is_the_last_ft_steps_of_the_run(tmp_path):
    "lambda = ft_lambda * min(1, (s - start) / ft_ramp_steps) from start = steps - ft_steps, else 0; same lr throughout."
    out = main(["--preset", "tiny", "--output-dir", str(tmp_path), "log_every=1", "steps=12", "ft_steps=4", "ft_ramp_steps=2"])
    assert out["step"] == 12
    rows = _rows(tmp_path)
    lams = [r["lam"] for r in rows]
    assert lams == pytest.approx([0.0] * 8 + [0.0, 0.05, 0.1, 0.1])
    assert all("ce" in r for r in rows[8:]) and len({r["lr"] for r in rows[2:]}) == 1
    with pytest.raises(ValueError, match="ft_steps"):
        main(["--preset", "tiny", "--output-dir", str(tmp_path / "bad"), "steps=4", "ft_steps=6"])


def big_fields(data_dir=None, cfg=None):
    "Data 1000x larger than RandomFields: a huge loss and gradient (a `module:function` data set)."
    from torch.utils.data import TensorDataset
    from drifting_nb.train_mae import RandomFields
    d = RandomFields(64, (4, 16, 16), cfg.num_classes)
    return TensorDataset(d.x * 1000, d.y)


def test_optimizer_as_released(tmp_path, monkeypatch):
    "AdamW steps with the gradient clipped to global norm 2.0 and weight decay 0.01 on every parameter (GroupNorm too)."
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    seen = []
    def record(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(dict(norm=torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item(),
                         decay={(p.ndim, g["weight_decay"]) for g in opt.param_groups for p in g["params"]}))
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(record)
    try:
        main(["--preset", "tiny", "--output-dir", str(tmp_path), "log_every=1", "steps=4", "ft_steps=2",
              "dataset=test_mae:big_fields"])
    finally:
        handle.remove()
    rows = _rows(tmp_path)
    assert len(seen) == 4 and min(r["grad_norm"] for r in rows) > 100      # logged before clipping
    assert all(s["norm"] == pytest.approx(2.0, rel=1e-4) for s in seen)     # what AdamW receives
    decays = set().union(*(s["decay"] for s in seen))                 # {(parameter ndim, its weight decay)}
    assert decays == {(1, 0.01), (2, 0.01), (4, 0.01)}                    # GroupNorm and biases, head, convs


def test_train_mae_job_saves_resumes_and_loads(tmp_path, capsys):
    run = tmp_path / "run"
    r1 = main(["--preset", "tiny", "--output-dir", str(run), "--max-steps", "10", "--seed", "3"])
    assert r1["step"] == 10 and (run / "checkpoints" / "step_0000010").is_dir()
    r2 = main(["--preset", "tiny", "--output-dir", str(run), "--seed", "3", "--resume"])
    assert r2["step"] == 26                                    # 26 updates, the last 6 fine-tuning
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 27, 2))
    assert rows[0]["lam"] == 0.0 and rows[-1]["lam"] == pytest.approx(0.1) and "ce" in rows[-1]
    assert len(list((run / "checkpoints").iterdir())) == 2     # keep_checkpoints
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["preset"] == "tiny" and meta["step"] == 26
    enc = load_encoder(run)
    assert enc.config["width"] == 8 and not enc.training
    with torch.no_grad(): feats = extract_features(enc, torch.randn(2, 4, 16, 16))
    assert "layer4_mean" in feats and all(torch.isfinite(v).all() for v in feats.values())
    # a checkpoint from another model size is refused
    with pytest.raises(ValueError, match="different model"):
        main(["--preset", "tiny", "--output-dir", str(run), "--resume", "width=16"])


def test_resume_continues_the_same_run(tmp_path):
    "Killed after step 10 and resumed, the run logs the same losses as an uninterrupted one."
    full = main(["--preset", "tiny", "--output-dir", str(tmp_path / "a"), "--seed", "5", "ft_steps=0", "steps=16"])
    main(["--preset", "tiny", "--output-dir", str(tmp_path / "b"), "--seed", "5", "ft_steps=0", "steps=16", "--max-steps", "10"])
    rest = main(["--preset", "tiny", "--output-dir", str(tmp_path / "b"), "--seed", "5", "ft_steps=0", "steps=16", "--resume"])
    a = {r["step"]: r["recon"] for r in full["history"]}
    b = {r["step"]: r["recon"] for r in rest["history"]}
    assert sorted(b) == [12, 14, 16]
    for s in b: assert b[s] == pytest.approx(a[s], rel=1e-5)


def test_latent_mae_encodes_images_with_vae(tmp_path):
    from drifting_nb.data import make_fake_imagefolder, tiny_vae
    make_fake_imagefolder(tmp_path / "imgs", num_classes=2, per_class=4, size=(80, 72))
    tiny_vae().save_pretrained(tmp_path / "vae")
    out = main(["--preset", "tiny", "--output-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "imgs"),
                "--max-steps", "3", "dataset=imagefolder", "image_size=64", f"vae={tmp_path / 'vae'}", "batch_size=4",
                "num_classes=2"])
    assert out["step"] == 3
    enc = load_encoder(tmp_path / "run")
    assert enc.in_channels == 4                                # latents [4, 8, 8] of 64x64 images


def test_missing_data_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match="needs --data-dir"):
        train_mae(make_config("tiny", {"dataset": "imagefolder"}), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_mae(make_config("tiny", {"dataset": "imagefolder"}), tmp_path, data_dir=tmp_path / "nowhere")


def test_two_processes(tmp_path):
    "accelerate launch with 2 CPU processes (gloo): one global batch split in two, checkpoint, resume."
    import os, subprocess, sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    base = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "drifting_nb.train_mae", "--preset", "tiny",
            "--output-dir", str(tmp_path / "run")]
    for extra in (["--max-steps", "4"], ["--max-steps", "6", "--resume"]):
        r = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 processes x 1 x 8" in r.stdout + r.stderr and "resumed from" in r.stdout + r.stderr
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]                # written once, by the main process
    assert load_encoder(tmp_path / "run").config["width"] == 8
