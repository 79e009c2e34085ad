"""Behaviour the training loop relies on: drifting_nb.data (image folder, crop, VAE, queue, loader,
digits) and drifting_nb.latents (the sharded latent cache)."""
import json, os, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from drifting_nb.data import (ADMCenterCrop, InfiniteLoader, SafeImageFolder, SampleQueue, SDVAE, cifar10,
                              digits_split, fill_queue, image_folder, make_fake_imagefolder, tiny_vae)
from drifting_nb.latents import LatentDataset, cache_latents, main as latents_main, shard_name


# ---------------------------------------------------------------- image folder
def test_imagefolder_labels_follow_sorted_or_given_classes(tmp_path):
    classes = make_fake_imagefolder(tmp_path/"train", num_classes=3, per_class=2, size=20)
    ds = image_folder(tmp_path, size=16)                              # finds the train/ split
    assert ds.classes == sorted(classes) and [y for _, y in ds.samples] == [0, 0, 1, 1, 2, 2]
    (tmp_path/"order.txt").write_text("\n".join(reversed(classes)) + "\n")
    ds = SafeImageFolder(tmp_path/"train", classes=tmp_path/"order.txt")
    assert ds.class_to_idx[classes[0]] == 2 and ds[0][1] == 2


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"): SafeImageFolder(tmp_path/"missing")
    (tmp_path/"empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"): SafeImageFolder(tmp_path/"empty")
    make_fake_imagefolder(tmp_path/"d", num_classes=2, per_class=1, size=20)
    (tmp_path/"d"/"n_hollow").mkdir(); (tmp_path/"d"/"n_hollow"/"notes.txt").write_text("no image")
    with pytest.raises(FileNotFoundError, match="n_hollow"): SafeImageFolder(tmp_path/"d")
    with pytest.raises(FileNotFoundError, match="n_absent"): SafeImageFolder(tmp_path/"d", classes=["n00000000", "n_absent"])
    with pytest.raises(ValueError, match="augment"): image_folder(tmp_path/"d", augment="bogus")


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path):
    make_fake_imagefolder(tmp_path, num_classes=2, per_class=3, size=24)
    files = sorted((tmp_path/"n00000000").iterdir())
    files[0].write_bytes(b"garbage")
    files[1].write_bytes(files[2].read_bytes()[:150])                # truncated JPEG
    ds = image_folder(tmp_path, size=16, split=None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0 and ds.num_skipped == 2
    assert any(str(files[0]) in str(m.message) for m in w)
    ds._skipped.zero_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen = sum(len(y) for _, y in DataLoader(ds, batch_size=2, num_workers=2))
    assert seen == 6 and ds.num_skipped == 3                          # counted inside worker processes too


def test_all_unreadable_is_an_error(tmp_path):
    make_fake_imagefolder(tmp_path, num_classes=1, per_class=3, size=16)
    for f in (tmp_path/"n00000000").iterdir(): f.write_bytes(b"x")
    ds = SafeImageFolder(tmp_path, max_consecutive_failures=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="consecutive"): ds[0]


# ---------------------------------------------------------------- ADM crop
@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (1200, 700), (40, 90), (256, 256), (257, 300)])
def test_adm_crop_is_square_and_centred(hw):
    h, w = hw
    a = np.zeros((h, w, 3), np.uint8)
    a[h // 2 - h // 20: h // 2 + h // 20 + 1, w // 2 - h // 20: w // 2 + h // 20 + 1] = 255   # a centred square
    out = np.asarray(ADMCenterCrop(64)(Image.fromarray(a)))
    assert out.shape == (64, 64, 3)
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert abs(ys.mean() - 31.5) <= 1.5 and abs(xs.mean() - 31.5) <= 1.5


def test_adm_crop_box_halves_large_images_first():
    # 1024x2048 -> BOX halving to 512x1024 (short side 512 >= 2*256 once more -> 256x512), then no resize
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 2048, 3), dtype=np.uint8))
    ref = img.resize((1024, 512), Image.BOX).resize((512, 256), Image.BOX).crop((128, 0, 384, 256))
    assert np.array_equal(np.asarray(ADMCenterCrop(256)(img)), np.asarray(ref))


# ---------------------------------------------------------------- VAE
def test_vae_roundtrip_shapes_gradients_and_local_folder(tmp_path):
    vae = tiny_vae()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (2, 4, 4, 4) and vae.latent_shape(256) == (4, 32, 32)
    assert torch.equal(vae.encode(x), z)                               # mean: deterministic
    zg = z.clone().requires_grad_()
    vae.decode(zg).sum().backward()
    assert zg.grad.abs().sum() > 0 and all(p.grad is None for p in vae.parameters())
    vae.save_pretrained(tmp_path/"vae")
    assert torch.allclose(SDVAE.from_pretrained(tmp_path/"vae").encode(x), z)
    with pytest.raises(FileNotFoundError, match="config.json"): SDVAE.from_pretrained(tmp_path/"nothing_here")


# ---------------------------------------------------------------- latent cache
@pytest.fixture
def tree(tmp_path):
    make_fake_imagefolder(tmp_path/"imgs"/"train", num_classes=3, per_class=5, size=(40, 30))
    tiny_vae().save_pretrained(tmp_path/"vae")
    kw = dict(vae=str(tmp_path/"vae"), image_size=32, batch_size=3, shard_size=4, num_workers=0, progress=False)
    return tmp_path, kw


def test_latent_cache_writes_resumes_and_reads_back(tree):
    tmp, kw = tree
    kw = {**kw, "sample": False}                                        # posterior means: comparable with vae.encode
    s = cache_latents(tmp/"imgs", tmp/"cache", **kw)
    assert (s["num_shards"], s["written"]) == (4, 4)
    assert sorted(p.name for p in (tmp/"cache").iterdir()) == ["index.json"] + [shard_name(k) for k in range(4)]
    mtimes = {k: os.stat(tmp/"cache"/shard_name(k)).st_mtime_ns for k in range(4)}
    (tmp/"cache"/shard_name(3)).unlink()                                # an interrupted shard
    s = cache_latents(tmp/"imgs", tmp/"cache", **kw)
    assert (s["written"], s["done_before"]) == (1, 3)
    assert all(os.stat(tmp/"cache"/shard_name(k)).st_mtime_ns == mtimes[k] for k in range(3))   # done shards untouched
    ds = LatentDataset(tmp/"cache")
    assert (len(ds), ds.num_images, ds.num_classes, ds.latent_shape) == (30, 15, 3, (4, 4, 4))
    assert ds.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    imgs, vae = image_folder(tmp/"imgs", size=32), SDVAE.from_pretrained(tmp/"vae")
    x = imgs[13][0][None]
    with torch.no_grad(): ref = vae.encode(torch.cat([x, x.flip(-1)]))
    assert torch.allclose(ds[13][0], ref[0], atol=2e-3) and torch.allclose(ds[15 + 13][0], ref[1], atol=2e-3)
    assert ds[13][1] == ds[28][1] == 2
    assert len(LatentDataset(tmp/"cache", flips=False)) == 15
    z, y = next(iter(DataLoader(ds, batch_size=30, num_workers=2)))
    assert z.shape == (30, 4, 4, 4) and y.tolist() == ds.labels.tolist() * 2


def test_latent_cache_stores_posterior_samples_as_released(tree):
    "By default each image and its mirror image are stored as one sample of the VAE posterior (the release's cache)."
    tmp, kw = tree
    cache_latents(tmp/"imgs", tmp/"cache", **kw)
    ds = LatentDataset(tmp/"cache")
    assert ds.meta["sample"] is True
    vae = SDVAE.from_pretrained(tmp/"vae")
    x = image_folder(tmp/"imgs", size=32)[6][0][None]
    with torch.no_grad(): post = vae.vae.encode(x).latent_dist
    z = (ds[6][0] / vae.scaling_factor - post.mean[0]) / post.std[0]   # standardised draw
    assert 0.5 < z.std() < 1.5 and z.abs().max() < 6 and not torch.allclose(ds[6][0], post.mean[0] * vae.scaling_factor, atol=1e-3)
    first = ds[6][0].clone()
    (tmp/"cache"/shard_name(1)).unlink()                                # a rewritten shard draws the same sample
    cache_latents(tmp/"imgs", tmp/"cache", **kw)
    assert torch.equal(LatentDataset(tmp/"cache")[6][0], first)


def test_latent_cache_refuses_mismatch_and_reports_damage(tree):
    tmp, kw = tree
    with pytest.raises(FileNotFoundError, match="no latent cache"): LatentDataset(tmp/"cache")
    cache_latents(tmp/"imgs", tmp/"cache", **kw)
    with pytest.raises(ValueError, match="image_size"): cache_latents(tmp/"imgs", tmp/"cache", **{**kw, "image_size": 16})
    make_fake_imagefolder(tmp/"imgs"/"train", num_classes=4, per_class=5, size=(40, 30))   # the data changed
    with pytest.raises(ValueError, match="num_images"): cache_latents(tmp/"imgs", tmp/"cache", **kw)
    (tmp/"cache"/shard_name(1)).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete.*shard_00001"): LatentDataset(tmp/"cache")
    with pytest.raises(SystemExit): latents_main(["--data", str(tmp/"absent"), "--out", str(tmp/"c"), "--vae", str(tmp/"vae")])


def free_port():
    import socket
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def test_latent_cli_two_processes_split_the_shards(tree):
    tmp, kw = tree
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "drifting_nb.latents", "--data", str(tmp/"imgs"), "--out", str(tmp/"cache"), "--vae", str(tmp/"vae"),
           "--image-size", "32", "--batch-size", "3", "--shard-size", "4", "--num-workers", "0"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors import safe_open
    writers = [safe_open(str(tmp/"cache"/shard_name(k)), "pt").metadata()["writer"] for k in range(4)]
    assert writers == ["0/2", "1/2", "0/2", "1/2"]
    cache_latents(tmp/"imgs", tmp/"single", **kw)
    a, b = LatentDataset(tmp/"cache"), LatentDataset(tmp/"single")
    assert all(torch.allclose(a[i][0], b[i][0], atol=1e-3) for i in range(len(a)))   # thread counts differ: not bitwise


# ---------------------------------------------------------------- sample queue
def numbered(n, start=0): return torch.arange(start, start + n, dtype=torch.float32).view(n, 1)

def test_queue_is_fifo_per_class_and_globally():
    q = SampleQueue(num_classes=2, sample_shape=(1,), per_class=4, global_size=5)
    for step in range(3):                                                  # 3 steps of 6 samples, classes 0,1,0,1,...
        q.push(numbered(6, 6 * step), torch.arange(6) % 2)
    assert q.class_samples(0).flatten().tolist() == [10., 12., 14., 16.]
    assert q.class_samples(1).flatten().tolist() == [11., 13., 15., 17.]
    assert sorted(q.unc.flatten().tolist()) == [13., 14., 15., 16., 17.]
    q.push(numbered(9, 100), torch.zeros(9, dtype=torch.long))             # one push larger than a FIFO
    assert q.class_samples(0).flatten().tolist() == [105., 106., 107., 108.]
    assert q.class_samples(1).flatten().tolist() == [11., 13., 15., 17.]


def test_queue_draws_without_replacement_and_readiness():
    q = SampleQueue(num_classes=3, sample_shape=(1,), per_class=8, global_size=12, seed=0)
    q.push(numbered(12), torch.arange(12) % 3)                             # 4 per class
    assert q.ready(4, labels=[0, 2]) and not q.ready(5) and q.ready(4, n_unc=12) and not q.ready(1, n_unc=13)
    for _ in range(20):
        pos = q.draw_pos(torch.tensor([0, 1, 2, 2]), 4)[..., 0]
        assert pos.shape == (4, 4)
        for row, c in zip(pos.tolist(), [0, 1, 2, 2]):
            assert sorted(row) == [float(v) for v in range(c, 12, 3)]  # all 4 of the class, each once
        unc = q.draw_unc(3, 12)[..., 0]
        assert all(sorted(r) == list(map(float, range(12))) for r in unc.tolist())
    with pytest.raises(ValueError, match=r"\[1\]"):
        SampleQueue(3, (1,), per_class=8).draw_pos([1], 2)
    with pytest.raises(ValueError, match="labels"): q.push(numbered(1), torch.tensor([3]))


def test_queue_draws_are_uniform_over_the_class():
    q = SampleQueue(num_classes=1, sample_shape=(1,), per_class=10, seed=3)
    q.push(numbered(10), torch.zeros(10, dtype=torch.long))
    counts = torch.bincount(q.draw_pos(torch.zeros(4000, dtype=torch.long), 3)[..., 0].long().flatten(), minlength=10)
    assert counts.min() > 1000 and counts.max() < 1400                      # expected 1200 each


def test_queue_state_roundtrip_is_exact(tmp_path):
    def make(seed): return SampleQueue(num_classes=5, sample_shape=(2, 3), per_class=6, global_size=20, seed=seed)
    a = make(0)
    for i in range(7): a.push(torch.randn(8, 2, 3), torch.randint(0, 5, (8,)))
    a.draw_pos([1, 2], 2)
    torch.save(a.state_dict(), tmp_path/"q.pt")
    b = make(99); b.load_state_dict(torch.load(tmp_path/"q.pt"))
    for i in range(3):
        x, y = torch.randn(8, 2, 3), torch.randint(0, 5, (8,))
        a.push(x, y); b.push(x, y)
        assert torch.equal(a.draw_pos([0, 4, 4], 3), b.draw_pos([0, 4, 4], 3))
        assert torch.equal(a.draw_unc(2, 10), b.draw_unc(2, 10))
    with pytest.raises(ValueError, match="per_class"):
        SampleQueue(5, (2, 3), per_class=7, global_size=20).load_state_dict(a.state_dict())


def test_fill_queue_until_ready_or_explain():
    d = digits_split()
    q = SampleQueue(10, (1, 8, 8), per_class=128, global_size=1000)
    used = fill_queue(q, InfiniteLoader(d.train, batch_size=64, seed=0), n_pos=64, n_unc=32)
    assert q.ready(64, 32) and used * 64 == int(q.pushed.sum())
    with pytest.raises(RuntimeError, match="fewer than 16"):
        fill_queue(SampleQueue(10, (1, 8, 8)), iter([(d.x_train[:32], d.y_train[:32])]), n_pos=16)
    with pytest.raises(ValueError): fill_queue(SampleQueue(10, (1, 8, 8), per_class=8), iter([]), n_pos=16)


# ---------------------------------------------------------------- loader
def test_infinite_loader_epochs_and_exact_resume():
    ds = TensorDataset(torch.arange(50), torch.arange(50) % 5)
    dl = InfiniteLoader(ds, batch_size=8, seed=1)
    epoch0 = torch.cat([next(dl)[0] for _ in range(dl.batches_per_epoch)])
    assert len(set(epoch0.tolist())) == 48 and (dl.epoch, dl.batch) == (1, 0)
    epoch1 = torch.cat([next(dl)[0] for _ in range(dl.batches_per_epoch)])
    assert not torch.equal(epoch0, epoch1)
    for _ in range(3): next(dl)
    state = json.loads(json.dumps(dl.state_dict()))                      # survives a checkpoint as JSON
    expected = [next(dl)[0] for _ in range(10)]
    resumed = InfiniteLoader(ds, batch_size=8, seed=1, num_workers=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, (next(resumed)[0] for _ in range(10))))
    with pytest.raises(ValueError, match="seed"): InfiniteLoader(ds, batch_size=8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one batch"): InfiniteLoader(ds, batch_size=64)


def test_infinite_loader_ranks_are_disjoint():
    ds = TensorDataset(torch.arange(21), torch.zeros(21, dtype=torch.long))
    parts = [set(InfiniteLoader(ds, 2, seed=0, rank=r, world_size=3).indices(4).tolist()) for r in range(3)]
    assert all(len(p) == 7 for p in parts) and len(set.union(*parts)) == 21


# ---------------------------------------------------------------- small data sets
def test_digits_split_is_stratified_disjoint_and_deterministic():
    d = digits_split()
    assert (len(d.y_train), len(d.y_test)) == (1437, 360)
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_train.min() == -1 and d.x_train.max() == 1
    assert set(d.y_train.tolist()) == set(d.y_test.tolist()) == set(range(10))
    assert torch.bincount(d.y_test).min() >= 35
    assert not set(d.idx_train) & set(d.idx_test) and len(set(d.idx_train) | set(d.idx_test)) == 1797
    assert np.array_equal(digits_split().idx_test, d.idx_test) and not np.array_equal(digits_split(seed=1).idx_test, d.idx_test)
    x, y = d.train[0]
    assert x.shape == (1, 8, 8) and y.dtype == torch.long


def test_cifar10_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"): cifar10(tmp_path)
