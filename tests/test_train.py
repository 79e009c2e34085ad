"The training system end to end at tiny size: both data spaces, two processes, exact resume after SIGKILL, bad input."
import json, math, os, signal, subprocess, sys, time, errno, warnings
from pathlib import Path
import pytest
import torch
from drifting_nb.train import get_config, train, load_run, list_checkpoints, resolve_config, parse_args
from drifting_nb.data import make_fake_imagefolder
from drifting_nb.record import load_record

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}

def _rows(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]

def _losses(out):
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}

def test_cli_names_valid_presets_and_keys():
    with pytest.raises(ValueError, match="imagenet-latent-b2"): resolve_config("imagenet-latent-b3", {})
    with pytest.raises(ValueError, match="valid keys"): resolve_config("digits", {"Ncc": "3"})
    p, over, resume = parse_args(["--preset", "tiny-pixel", "--lr", "0.5", "--resume"])
    assert (p, resolve_config(p, over).lr, resume) == ("tiny-pixel", 0.5, True)
    out = subprocess.run([sys.executable, "-m", "drifting_nb.train", "--help"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0 and "imagenet-pixel-l16" in out.stdout and "Npos" in out.stdout

def test_pixel_run_writes_everything_and_samples(folder, tmp_path):
    cfg = get_config("tiny-pixel", data_dir=str(folder), output_dir=str(tmp_path / "run"))
    summary = train(cfg)
    out = Path(cfg.output_dir)
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, cfg.max_steps + 1))
    assert all(k in rows[-1] for k in ("loss", "grad_norm", "lr", "alpha_mean", "imgs_per_s", "features"))
    assert (out / "samples" / "step_00000003.png").is_file() and (out / "ema_0.999.safetensors").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    assert list((out / "tb").rglob("events.out.tfevents*")), "no TensorBoard log"
    assert (out / "encoder" / "encoder.safetensors").is_file()           # pretrained in the run (notebook 04)
    run = load_run(out)
    imgs = run.sample(torch.tensor([0, 1, 2]), alpha=1.5)
    assert imgs.shape == (3, 16, 16, 3) and imgs.dtype == torch.uint8

def test_latent_run_with_a_tiny_vae(encoder, folder, tmp_path):
    from drifting_nb.latents import cache_latents
    from drifting_nb.data import tiny_vae
    cache = tmp_path / "latents"
    cache_latents(folder, cache, vae=tiny_vae(), image_size=32, batch_size=8, shard_size=16, num_workers=0, progress=False)
    cfg = get_config("tiny-latent", data_dir=str(cache), output_dir=str(tmp_path / "run"), max_steps=3, encoder="none")
    train(cfg)
    imgs = load_run(cfg.output_dir).sample(torch.tensor([2, 0]), alpha=1.0)
    assert imgs.shape == (2, 32, 32, 3)                               # latents decoded to pixels

def test_two_processes(encoder, folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "drifting_nb.train", "--preset", "tiny-pixel", "--data-dir", str(folder),
           "--output-dir", str(out), "--Nc", "2", "--max-steps", "3", "--ckpt-every", "3", "--encoder-path", encoder]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ck = list_checkpoints(out)[-1]
    from drifting_nb.runtime import load_state
    shards = [load_state(ck / f"rank_{r}.safetensors")["queue"]["classes"].tolist() for r in (0, 1)]
    assert shards == [[0, 2], [1]]                                     # each process keeps the FIFOs of its own classes
    assert json.loads((ck / "meta.json").read_text())["num_processes"] == 2
    assert _rows(out)[-1]["effective_batch"] == 2 * 4

def test_sigkill_then_resume_gives_the_same_losses(encoder, folder, tmp_path):
    base = [sys.executable, "-m", "drifting_nb.train", "--preset", "tiny-pixel", "--data-dir", str(folder),
            "--max-steps", "10", "--ckpt-every", "2", "--sample-every", "0", "--encoder-path", encoder]
    ref = tmp_path / "ref"
    subprocess.run(base + ["--output-dir", str(ref)], check=True, env=ENV, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--output-dir", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 240:                                      # kill once a checkpoint exists and it ran past it
        if list_checkpoints(out) and (out / "metrics.jsonl").is_file() and \
                max(_losses(out), default=0) > int(list_checkpoints(out)[0].name[5:]):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    killed_at = max(_losses(out))
    assert killed_at < 10, "the run finished before it could be killed"
    ck = int(list_checkpoints(out)[-1].name[5:])
    subprocess.run(base + ["--output-dir", str(out), "--resume"], check=True, env=ENV, capture_output=True, timeout=300)
    a, b = _losses(ref), _losses(out)
    assert sorted(b) == list(range(1, 11))
    for s in range(ck + 1, 11): assert a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-7), (s, a[s], b[s])

def test_missing_and_empty_data(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "r1")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "r2")))
    make_fake_imagefolder(tmp_path / "holes" / "train", num_classes=3, per_class=4, size=(20, 20))
    (tmp_path / "holes" / "train" / "class_without_images").mkdir()
    with pytest.raises(FileNotFoundError, match="class_without_images"):
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(tmp_path / "holes"), output_dir=str(tmp_path / "r3")))
    with pytest.raises(ValueError, match="--data-dir"):
        train(get_config("tiny-pixel", output_dir=str(tmp_path / "r4")))

def test_corrupt_images_are_skipped_and_counted(encoder, tmp_path):
    root = tmp_path / "data"
    make_fake_imagefolder(root / "train", num_classes=3, per_class=12, size=(20, 20))
    files = sorted((root / "train").rglob("*.JPEG"))
    for f in files[::9]: f.write_bytes(f.read_bytes()[:40])             # truncated JPEGs
    cfg = get_config("tiny-pixel", encoder_path=encoder, data_dir=str(root), output_dir=str(tmp_path / "run"), max_steps=3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(cfg)
    assert any("skipping unreadable image" in str(x.message) for x in w)
    assert _rows(cfg.output_dir)[-1]["skipped_images"] > 0

def test_resume_refuses_another_model(encoder, folder, tmp_path):
    out = tmp_path / "run"
    train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(out), max_steps=3))
    with pytest.raises(FileExistsError, match="--resume"):
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(out), max_steps=4))
    with pytest.raises(ValueError, match="generator"):
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(out), max_steps=6, generator="S/2"), resume=True)

def test_nan_loss_stops_and_keeps_the_last_checkpoint(encoder, folder, tmp_path):
    out = tmp_path / "run"
    cfg = get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(out), ckpt_every=2)
    with pytest.raises(FloatingPointError, match="step 4.*step_00000002"):
        train(cfg, fault_hook=lambda step, loss: loss * float("nan") if step == 4 else loss)
    ck = list_checkpoints(out)
    assert [p.name for p in ck] == ["step_00000002"]
    assert torch.isfinite(torch.cat([v.flatten() for v in load_run(out).model.state_dict().values()])).all()

def test_default_digits_job_scores_itself(tmp_path):
    "The no-argument job (digits), cut to a few steps: it pretrains its MAE, trains, sweeps alpha and writes its scores."
    out = tmp_path / "digits"
    cmd = [sys.executable, "-m", "drifting_nb.train", "--output-dir", str(out), "--max-steps", "2",
           "--mae-overrides", "{'steps': 3, 'ft_steps': 0, 'batch_size': 32}", "--eval-samples", "100"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["sweep"]) == {str(a) for a in get_config("digits").eval_alphas}
    assert 0 <= scores["acc"] <= 1 and scores["fd"] > scores["fd_floor"] > 0
    assert (out / "cfg_sweep.png").is_file() and (out / "samples_per_class.png").is_file()
    assert (out / "samples_vs_real.png").is_file()
    assert "eval" in _rows(out)[-1]
    diversity = {"spread", "spread_min", "spread_per_class", "pixel_spread", "precision", "recall",   # issue 14
                 "pixel_spread_min", "pixel_fd", "pixel_fd_floor"}                                   # issue 21
    assert "(pixels: " in r.stdout and "real digits" in r.stdout        # the end-of-run line: both spaces, with the reals'
    rec = load_record(out)                                              # the drift, recorded without a flag (issue 22)
    assert rec["steps"] == [0, 2] and rec["images"].shape[:2] == (2, 200)
    assert 0 < (out / "drift.html").stat().st_size < 5e6
    assert diversity <= set(scores) and diversity <= set(_rows(out)[-1]["eval"]) and len(scores["spread_per_class"]) == 10
    # OMP_NUM_THREADS=1 (what `accelerate launch` exports) does not confine a one-process CPU run to one core
    assert f"{max(1, len(os.sched_getaffinity(0)))} CPU thread(s) each" in r.stdout

def test_recording_the_drift_leaves_training_unchanged_and_resumes(encoder, folder, tmp_path):
    "--record-every: frames at 0, every N and the last step; the losses equal a run without it; a resume keeps the frames."
    kw = dict(encoder_path=encoder, data_dir=str(folder), sample_every=0, eval_every=0)
    train(get_config("tiny-pixel", output_dir=str(tmp_path / "plain"), **kw))
    out = tmp_path / "rec"
    train(get_config("tiny-pixel", output_dir=str(out), max_steps=4, record_every=3, record_per_class=2, **kw))
    assert load_record(out)["steps"] == [0, 3, 4]
    train(get_config("tiny-pixel", output_dir=str(out), record_every=3, record_per_class=2, **kw), resume=True)
    rec = load_record(out)
    assert rec["steps"] == [0, 3, 4, 6] and rec["images"].shape == (4, 6, 3, 16, 16) and rec["points"].shape == (4, 6, 2)
    assert rec["images"][-1].float().std() > 0 and not torch.equal(rec["points"][0], rec["points"][-1])
    a, b = _losses(tmp_path / "plain"), _losses(out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for st in a: assert b[st] == pytest.approx(a[st], rel=1e-6, abs=1e-7), st
    page = (out / "drift.html").read_text()
    assert page.count("iVBORw0KGgo") == 4 and "<script>" in page and "http" not in page.split("<script>")[1]

def test_cpu_threads_apply_during_the_run_and_are_restored(encoder, folder, tmp_path):
    seen, before = [], torch.get_num_threads()
    other = 2 if before == 1 else 1                                   # a count the run would not have by itself
    cfg = get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(tmp_path / "run"),
                     max_steps=2, sample_every=0, cpu_threads=other)
    train(cfg, fault_hook=lambda step, loss: seen.append(torch.get_num_threads()) or loss)
    assert seen == [other, other] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="positive thread count"):
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(tmp_path / "r2"), cpu_threads=-2))

ACCUM_SCRIPT = """
import sys, torch
from accelerate import PartialState
from drifting_nb.train import get_config, train
def run(data, out, k, Nc, encoder):
    "Steps 1-3 at k=1 (k=0), or step 4 from their checkpoint (copied to out/b<k>) at k: each process's step-4 gradients."
    kw = dict(data_dir=data, Nc=Nc, num_classes=Nc, sample_every=0, ckpt_every=1, log_every=1, lr=1e-2, warmup_steps=0)
    kw.update(encoder="none") if encoder == "none" else kw.update(encoder_path=encoder)
    if k == 0: return train(get_config("tiny-pixel", output_dir=f"{out}/a", max_steps=3, grad_accum=1, **kw))
    grads = []
    hook = lambda step, model: grads.append([p.grad.detach().clone() for p in model.parameters()])
    train(get_config("tiny-pixel", output_dir=f"{out}/b{k}", max_steps=4, grad_accum=k, **kw), resume=True, grad_hook=hook)
    torch.save(grads[-1], f"{out}/grads{k}_{PartialState().process_index}.pt")
if __name__ == "__main__": run(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
"""

def _accum_runs(folder, tmp_path, k, Nc, encoder, launch=None):
    "Steps 1-3 once, then step 4 at grad_accum 1 and k from copies of that run (ACCUM_SCRIPT, in-process or launched)."
    import shutil
    (tmp_path / "accum.py").write_text(ACCUM_SCRIPT)
    def phase(kk):
        if launch is None:
            sys.path.insert(0, str(tmp_path))
            try:
                import accum
                accum.run(str(folder), str(tmp_path), kk, Nc, encoder)
            finally: sys.path.remove(str(tmp_path)); sys.modules.pop("accum", None)
        else:
            r = subprocess.run(launch + [str(tmp_path / "accum.py"), str(folder), str(tmp_path), str(kk), str(Nc), encoder],
                               capture_output=True, text=True, env=ENV, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    phase(0)
    for kk in (1, k):
        shutil.copytree(tmp_path / "a", tmp_path / f"b{kk}")
        phase(kk)

def _rel_max(a, b):
    "Largest gradient difference relative to the largest gradient entry of each tensor, over a list of tensors."
    return max(((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item() for x, y in zip(a, b))

def _losses_of(out):
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in _rows(out) if "loss" in r}

def test_gradient_accumulation_equals_one_big_batch(encoder, folder, tmp_path):
    """grad_accum=3 runs one class per micro-batch, yet S and the drift norms are the whole step's: the loss and every
    gradient equal the one-batch step to 1e-5 (with per-micro-batch statistics they differ by percents)."""
    _accum_runs(folder, tmp_path, 3, 3, encoder)
    g1, g3 = (torch.load(tmp_path / f"grads{k}_0.pt", weights_only=True) for k in (1, 3))
    assert sum(int(x.abs().max() > 0) for x in g1) > 0.9 * len(g1), "step 4 should move (almost) every weight"
    assert _rel_max(g1, g3) < 1e-5
    one, three = _losses_of(tmp_path / "b1"), _losses_of(tmp_path / "b3")
    assert math.isclose(one[4][0], three[4][0], rel_tol=1e-5) and math.isclose(one[4][1], three[4][1], rel_tol=1e-5)
    rows = _rows(tmp_path / "b3")
    assert rows[-1]["effective_batch"] == 3 * 4
    with pytest.raises(ValueError, match="grad.accum"):
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(tmp_path / "r2"), grad_accum=2))

def test_gradient_accumulation_over_two_processes_equals_one_big_batch(tmp_path):
    "Two gloo processes, two classes each in two micro-batches: the gradients equal the one-micro-batch step to 1e-5."
    data = tmp_path / "data"
    make_fake_imagefolder(data / "train", num_classes=4, per_class=12, size=(24, 20))
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    _accum_runs(data, tmp_path, 2, 4, "none", launch)
    for rank in (0, 1):
        g1, g2 = (torch.load(tmp_path / f"grads{k}_{rank}.pt", weights_only=True) for k in (1, 2))
        assert _rel_max(g1, g2) < 1e-5, rank
    one, two = _losses_of(tmp_path / "b1"), _losses_of(tmp_path / "b2")
    assert math.isclose(one[4][0], two[4][0], rel_tol=1e-5)

def _fake_cifar10(root, per_batch: int = 20):
    "Random images in torchvision's CIFAR-10 layout (cifar-10-batches-py: five data batches, a test batch, the meta)."
    import pickle
    import numpy as np
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                         "labels": [i % 10 for i in range(per_batch)]}, f)
    with open(d / "batches.meta", "wb") as f: pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)

def test_cifar10_preset_end_to_end(tmp_path, monkeypatch):
    """The cifar10 preset at a few steps on a fake CIFAR-10 folder (torchvision's checksums patched out): its MAE
    settings pretrain an encoder on it, then its generator trains and samples 32x32 RGB images. Narrower encoder and
    generator than the preset's (widths only), to keep the test quick on a CPU."""
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    root = tmp_path / "cifar"
    _fake_cifar10(root)
    from drifting_nb.train_mae import make_config, train_mae
    base = get_config("cifar10", data_dir=str(root))
    enc = tmp_path / "enc"
    short = dict(steps=2, warmup_steps=1, ft_steps=1, ft_ramp_steps=1, batch_size=16, num_workers=0, width=8)
    train_mae(make_config(base.mae_preset, {**base.mae_overrides, **short}), enc, data_dir=str(root), progress=False)
    cfg = get_config("cifar10", data_dir=str(root), output_dir=str(tmp_path / "run"), encoder_path=str(enc), max_steps=2,
                     Npos=4, Nneg=4, Nunc=2, queue_per_class=8, queue_global=16, queue_push=32, warmup_steps=1,
                     sample_every=2, ckpt_every=2, log_every=1, generator_kw=dict(hidden_size=64, depth=2, num_heads=2))
    train(cfg)
    rows = _rows(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    imgs = load_run(cfg.output_dir).sample(torch.tensor([0, 9]), alpha=1.5)
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == torch.uint8
    with pytest.raises(ValueError, match="--data-dir"): train(get_config("cifar10", output_dir=str(tmp_path / "r2")))

def test_fid_during_training_for_any_data_set(encoder, folder, tmp_path):
    "--ref-stats turns on FID/IS in the loop over the CFG list (the release evaluates every 5000 steps), logged everywhere."
    import test_evaluate                                              # registers the tiny stand-in for Inception
    from drifting_nb.data import image_folder, to_uint8
    from drifting_nb.evaluate import FidelityFeatures, compute_ref_stats, save_ref_stats
    ds = image_folder(folder, size=16)
    real = to_uint8(torch.stack([ds[i][0] for i in range(len(ds))])).numpy()
    ref = save_ref_stats(tmp_path / "ref.npz", compute_ref_stats(real, FidelityFeatures("test-tiny")))
    cfg = get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(tmp_path / "run"), max_steps=4,
                     sample_every=0, eval_every=2, eval_samples=9, eval_alphas=(1.0, 2.0), ref_stats=str(ref),
                     fid_extractor="test-tiny", eval_batch_size=4)
    summary = train(cfg)
    evals = [r for r in _rows(cfg.output_dir) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r["eval"]["sweep"]) == {"1.0", "2.0"} and r["eval"]["alpha"] in (1.0, 2.0)
        assert all(math.isfinite(s["fid"]) and s["isc_mean"] > 0 and s["num_samples"] == 9 for s in r["eval"]["sweep"].values())
    scores = json.loads((Path(cfg.output_dir) / "scores.json").read_text())
    assert scores["fid"] == min(s["fid"] for s in scores["sweep"].values()) == summary["eval"]["fid"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(next((Path(cfg.output_dir) / "tb").rglob("events.out.tfevents*")).parent)).Reload()
    assert {"eval/fid", "eval/fid@alpha=1.0", "eval/fid@alpha=2.0"} <= set(acc.Tags()["scalars"])

def test_real_feature_table_leaves_the_run_unchanged(encoder, folder, tmp_path):
    "--real-feature-table (the digits preset's): the real samples' features are looked up, the losses stay the same."
    kw = dict(encoder_path=encoder, data_dir=str(folder), max_steps=4, sample_every=0, eval_every=0)   # uint8 queue
    train(get_config("tiny-pixel", output_dir=str(tmp_path / "plain"), **kw))
    train(get_config("tiny-pixel", output_dir=str(tmp_path / "table"), real_feature_table=True, **kw))
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "table")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a: assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a[s], b[s])
    from drifting_nb.train import real_feature_table, REAL_FEATURE_TABLE_MAX
    with pytest.raises(ValueError, match="large data sets"):
        real_feature_table(range(REAL_FEATURE_TABLE_MAX + 1), None, "cpu")

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "uint8"])
def test_real_feature_table_finds_every_queued_sample(folder, dtype):
    "Whatever the queue's storage dtype, the samples it returns are in the table (none is encoded again)."
    from drifting_nb.train import real_feature_table, build_dataset
    from drifting_nb.data import SampleQueue, InfiniteLoader, fill_queue
    cfg = get_config("tiny-pixel", data_dir=str(folder), queue_dtype=dtype)
    ds = build_dataset(cfg)
    queue = SampleQueue(cfg.num_classes, (3, 16, 16), cfg.queue_per_class, cfg.queue_global, dtype=getattr(torch, dtype))
    phi = lambda x: {"pixels": x.reshape(len(x), 1, -1)}
    table = real_feature_table(ds, phi, "cpu", queue=queue)
    loader = InfiniteLoader(ds, cfg.queue_push, seed=0, rank=0, world_size=1)
    fill_queue(queue, loader, cfg.Npos, cfg.Nunc)
    real = torch.cat([queue.draw_pos(torch.arange(3), cfg.Npos).flatten(0, 1), queue.draw_unc(3, cfg.Nunc).flatten(0, 1)])
    got = table(real.float())
    assert table.misses == 0 and table.hits == len(real)
    assert torch.equal(got["pixels"], phi(real.float())["pixels"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU set-up of Accelerate is what this test holds fixed")
def test_a_second_precision_in_one_process_is_refused_clearly(encoder, folder, tmp_path):
    "Accelerate keeps one mixed precision per process (a notebook's kernel): the error names the setting, writes nothing."
    from drifting_nb.runtime import job_accelerator
    job_accelerator(cpu=True, mixed_precision="no")                     # as every other CPU run of this process
    cfg = get_config("tiny-pixel", data_dir=str(folder), output_dir=str(tmp_path / "run"), encoder_path=encoder,
                     mixed_precision="bf16")
    with pytest.raises(RuntimeError, match=r"mixed_precision='no'.*mixed_precision='bf16'.*Restart the kernel"):
        train(cfg)
    assert not (tmp_path / "run" / "config.json").exists() and not list_checkpoints(tmp_path / "run")
    train(get_config("tiny-pixel", data_dir=str(folder), output_dir=str(tmp_path / "run"), encoder_path=encoder,
                     mixed_precision="no", max_steps=2, ckpt_every=2, sample_every=0))   # the process's precision still runs

def test_checkpoints_without_the_queue_refill_it_on_resume(encoder, folder, tmp_path, capsys):
    """queue_in_checkpoint=False (the ImageNet presets, as the release): the checkpoint holds no sample queue, a resume
    refills it from the data and says so; weights, optimizer and step continue."""
    from drifting_nb.runtime import load_state
    kw = dict(encoder_path=encoder, data_dir=str(folder), output_dir=str(tmp_path / "run"), sample_every=0,
              ckpt_every=3, queue_in_checkpoint=False)
    train(get_config("tiny-pixel", max_steps=3, **kw))
    ck = list_checkpoints(tmp_path / "run")[-1]
    state = load_state(ck / "rank_0.safetensors")
    assert "queue" not in state and "loader" in state              # the data order continues; the queue is refilled
    capsys.readouterr()
    train(get_config("tiny-pixel", max_steps=5, **kw), resume=True)
    assert "refilled" in capsys.readouterr().out
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4, 5]

def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(encoder, folder, tmp_path):
    "train asks the plan first: a GPU far too small for the step is refused with what to change, and no folder is made."
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="does not fit.*--gpu-memory") as e:
        train(get_config("tiny-pixel", encoder_path=encoder, data_dir=str(folder), output_dir=str(out), gpu_memory=0.01))
    assert not out.exists(), "a refused run wrote to its output folder"
    print(e.value)
