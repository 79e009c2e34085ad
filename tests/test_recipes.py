"The ImageNet presets train what the authors' release trained: every setting against its configs (numbers of record)."
import json, math
from pathlib import Path
import pytest
import torch

from drifting_nb.train import get_config, queue_push_per_process, lr_lambda, RELEASE_CFG_LIST

CONFIGS = json.loads((Path(__file__).parent / "fixtures" / "release" / "configs.json").read_text())
# preset -> (released config, hosts the authors ran it on: 64 TPU v6e for the ablation, 128 for the final models)
PRESET_OF = {"imagenet-latent-ablation": ("gen/latent_ablation", 16), "imagenet-latent-b2": ("gen/latent_sota_B", 32),
             "imagenet-latent-l2": ("gen/latent_sota_L", 32), "imagenet-pixel-b16": ("gen/pixel_sota_B", 32),
             "imagenet-pixel-l16": ("gen/pixel_sota_L", 32)}


@pytest.mark.parametrize("preset", list(PRESET_OF))
def test_preset_is_the_released_config(preset):
    name, hosts = PRESET_OF[preset]
    rel, cfg = CONFIGS[name], get_config(preset)
    opt, tr, fd, mdl = rel["optimizer"], rel["train"], rel["train"]["forward_dict"], rel["model"]
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_steps) == (opt["lr_schedule"]["learning_rate"], opt["weight_decay"],
                                                            opt["lr_schedule"]["warmup_steps"])
    assert (cfg.beta1, cfg.beta2) == (opt["adam_b1"], opt["adam_b2"]) and opt["lr_schedule"]["lr_schedule"] == "const"
    assert (cfg.max_steps, cfg.Nc, cfg.Npos, cfg.Nneg, cfg.Nunc) == (tr["total_steps"], tr["train_batch_size"],
                                                                   tr["pos_per_sample"], fd["gen_per_label"], tr["neg_per_sample"])
    assert (cfg.queue_per_class, cfg.queue_global) == (tr["positive_bank_size"], tr["negative_bank_size"])
    assert cfg.queue_push_global == tr["push_per_step"] * hosts              # per host in the release
    assert (cfg.alpha_k, cfg.alpha_p_one, 1.0, cfg.alpha_max) == (fd["neg_cfg_pw"], fd.get("no_cfg_frac", 0.0),
                                                                  fd["cfg_min"], fd["cfg_max"])
    assert tuple(cfg.taus) == tuple(sorted(rel["train"]["loss_kwargs"]["R_list"]))
    assert cfg.ema_decays[0] == tr["ema_decay"] and cfg.eval_every == tr["eval_per_step"]
    assert tuple(cfg.eval_alphas) == tuple(tr["cfg_list"]) and cfg.eval_samples == 50_000
    assert cfg.space == ("latent" if rel["dataset"]["use_latent"] else "pixel")
    assert cfg.augment == ("rrc" if rel["dataset"]["use_aug"] else "center")
    if cfg.space == "latent": assert cfg.vae == "stabilityai/sd-vae-ft-mse"
    assert cfg.encoder_path == rel["feature"]["mae_path"].removeprefix("hf://")
    assert cfg.extra_encoder.startswith("convnextv2:facebook/convnextv2-base-22k-224") == rel["feature"]["use_convnext"]
    assert cfg.generator_kw.get("attn_fp32", True) == mdl["attn_fp32"]
    assert cfg.grad_clip == 2.0


def test_release_cfg_list():
    assert RELEASE_CFG_LIST == tuple(CONFIGS["gen/latent_sota_L"]["train"]["cfg_list"])


def test_queue_push_splits_over_processes():
    cfg = get_config("imagenet-latent-b2")
    assert [queue_push_per_process(cfg, n) for n in (1, 8, 32, 64)] == [4096, 512, 128, 64]
    assert queue_push_per_process(get_config("digits"), 4) == get_config("digits").queue_push   # per process as given


def test_warmup_is_the_releases_schedule():
    "optax.linear_schedule(1e-6, lr, warmup) joined with a constant: update 0 uses 1e-6, update `warmup` on uses lr."
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(get_config("imagenet-latent-b2", lr=4e-4, warmup_steps=10)))
    lrs = []
    for _ in range(13): lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    want = [1e-6 + (4e-4 - 1e-6) * min(s, 10) / 10 for s in range(13)]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(lrs, want))
