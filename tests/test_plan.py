"The plan of a run (drifting_nb.plan, notebook 09a): what a user reads before paying for GPUs. Tiny presets only."
import json
from types import SimpleNamespace

import pytest

from drifting_nb import plan as P
from drifting_nb.train import get_config


def ns(preset, **over):
    "A config namespace: a preset's values with overrides (also the DESIGN20 keys the TrainConfig may not have yet)."
    return SimpleNamespace(**{**P.vars_of(get_config(preset)), "grad_accum": 0, "remat": "auto", **over})


def test_json_has_the_keys(capsys):
    plan = P.main(["--preset", "tiny-pixel", "--processes", "1", "--json"])
    got = json.loads(capsys.readouterr().out)
    for k in ("gpu_bytes", "host_bytes_per_process", "host_bytes_per_node", "checkpoint_bytes", "checkpoint_bytes_kept",
              "grad_accum", "remat", "generated_per_micro_batch", "flops_per_step", "step_seconds", "days",
              "loader_images_per_s", "fits", "why"):
        assert k in got, k
    for part in ("generator_activations", "total"): assert part in got["gpu_bytes"]
    assert got["gpu_bytes"]["total"] == pytest.approx(plan["gpu_bytes"]["total"])
    assert got["flops_per_step"]["total"] > 0 and got["step_seconds"] > 0


def test_bad_preset_or_key_is_trains_error():
    with pytest.raises(SystemExit, match="unknown preset"): P.main(["--preset", "nope", "--processes", "1"])
    with pytest.raises(SystemExit, match="unknown config key"): P.main(["--preset", "tiny-pixel", "--no-such-key", "1"])
    with pytest.raises(SystemExit, match="cannot be split over 2 processes"): P.main(["--preset", "tiny-pixel", "--processes", "2"])


def test_activations_scale_with_the_batch():
    "Saved bytes measured at 8 samples match the line through 1 and 2 samples; the plan grows with Nneg."
    cfg = ns("tiny-latent")
    fit = P.affine(lambda n: P.measure_generator(cfg, n, "bf16"))
    assert P.at(fit["saved"], 8) == pytest.approx(P.measure_generator(cfg, 8, "bf16")["saved"], rel=0.05)
    a = P.plan_run(ns("tiny-latent", Nneg=4), 1)["gpu_bytes"]["generator_activations"]
    b = P.plan_run(ns("tiny-latent", Nneg=8), 1)["gpu_bytes"]["generator_activations"]
    assert 1.6 < b / a < 2.05


def test_grad_accum_is_the_smallest_that_fits_and_grows_as_memory_shrinks():
    base = dict(num_classes=8, Nc=8, remat="off", mixed_precision="bf16")   # the same autocast with and without a limit
    totals = {k: P.plan_run(ns("tiny-latent", grad_accum=k, **base), 1)["gpu_bytes"]["total"] for k in (1, 2, 4, 8)}
    assert totals[1] > totals[2] > totals[4] > totals[8]
    picked = []
    for k in (1, 2, 4, 8):                     # memory just enough for k micro-batches (with the plan's headroom)
        mem = totals[k] / 0.9 / P.GiB * 1.001
        plan = P.plan_run(ns("tiny-latent", **base), 1, gpu_memory=mem)
        assert plan["fits"] and plan["grad_accum"] == k
        picked.append(plan["grad_accum"])
    assert picked == sorted(picked)
    assert not P.plan_run(ns("tiny-latent", **base), 1, gpu_memory=totals[8] / 0.9 / P.GiB * 0.9)["fits"]


def test_remat_lowers_generator_activations():
    off = P.plan_run(ns("tiny-latent", remat="off"), 1)["gpu_bytes"]["generator_activations"]
    on = P.plan_run(ns("tiny-latent", remat="on"), 1)["gpu_bytes"]["generator_activations"]
    assert on < off


def _bank(cfg):
    S = 3 * cfg.image_size ** 2                                    # uint8 images
    return cfg.num_classes * cfg.queue_per_class * S + cfg.queue_global * S


def test_pixel_queue_per_node_is_at_most_one_bank():
    cfg = ns("imagenet-pixel-b16", num_workers=0)
    host_p, host_n, *_ = P.host_plan(cfg, 8, 1)
    assert host_n["queues"] <= _bank(cfg)
    assert host_p["queues"] <= _bank(cfg) / 7                       # an eighth of the classes per process
    _, host_n64, *_ = P.host_plan(cfg, 64, 8)
    assert host_n64["queues"] <= _bank(cfg)


def test_checkpoint_holds_at_most_one_bank():
    for procs in (1, 8):
        ck, kept = P.checkpoint_plan(ns("imagenet-pixel-b16", queue_in_checkpoint=True), procs, 1)
        assert 0 < ck["queues"] <= _bank(ns("imagenet-pixel-b16"))
        assert kept >= ck["total"]
    ck, _ = P.checkpoint_plan(ns("imagenet-pixel-b16", queue_in_checkpoint=False), 8, 1)
    assert ck["queues"] == 0 and ck["total"] == ck["model"] + ck["optimizer"] + ck["emas"]


def test_check_plan_names_the_flag_to_change():
    plan = P.plan_run(ns("tiny-latent", grad_accum=1, remat="off"), 1, gpu_memory=0.01)
    assert not plan["fits"]
    with pytest.raises(ValueError, match="--remat on") as e: P.check_plan(plan)
    assert "--grad-accum 3" in str(e.value) and "--processes" in str(e.value)
    assert P.check_plan(P.plan_run(ns("tiny-latent"), 1, gpu_memory=80)) is not None
    assert "DOES NOT FIT" in P.plan_line(plan)
