"""What survives what: runs that are killed, fill the disk, or come from someone else, and values no run can use.
Each test is a tiny run (the `tiny-pixel` preset, a few steps) or a call that is refused before anything runs."""
import json, os, shutil, signal, subprocess, sys, time, tracemalloc, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from drifting_nb.train import get_config, train, main as train_main, resolve_config, parse_args
from drifting_nb.run import list_checkpoints, latest_checkpoint, load_run, read_metrics, verify_checkpoint
from drifting_nb.runtime import RunLock, RunFolderBusy

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}

SMALL = dict(hidden_size=32, depth=1, num_heads=2)                      # a narrow T/2: checkpoints of about 1 MB

def _cfg(folder, out, **kw):
    "tiny-pixel with a narrow generator and the drift on the raw samples (encoder none): these tests are about files."
    return get_config("tiny-pixel", data_dir=str(folder), encoder="none", output_dir=str(out), sample_every=0,
                      **{"generator_kw": SMALL, **kw})

def _steps(out): return [r["step"] for r in read_metrics(out) if "loss" in r]

class Payload:
    "Unpickling this makes a folder: proof that a file was unpickled."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.mkdir, (self.marker,))

@pytest.fixture(scope="module")
def run3(folder, tmp_path_factory):
    "A run of 3 steps with one checkpoint, copied by the tests that damage it."
    out = tmp_path_factory.mktemp("run3") / "run"
    train(_cfg(folder, out, max_steps=3, ckpt_every=3))
    return out

# 1. a received run folder: resuming it never unpickles anything

def test_resume_never_unpickles_a_planted_payload(run3, folder, tmp_path):
    ck = list_checkpoints(run3)[-1].name
    legacy = ["rank_0.pt", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "scaler.pt"]
    targets = sorted(p.name for p in (run3 / "checkpoints" / ck).iterdir()) + ["legacy"]
    for name in targets:                                               # one file at a time
        out, marker = tmp_path / f"run_{name}", tmp_path / f"ran_{name}"
        shutil.copytree(run3, out)
        for n in (legacy if name == "legacy" else [name]):             # every file Accelerate or torch.load would read
            torch.save({"state": Payload(marker)}, out / "checkpoints" / ck / n)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(_cfg(folder, out, max_steps=4, ckpt_every=3), resume=True)
        except Exception as e:                                          # refusing is fine, naming the file
            assert name in str(e), (name, e)
        assert not marker.exists(), f"a payload planted in {name} ran on --resume"

def test_mae_resume_never_unpickles_a_planted_payload(folder, tmp_path):
    "The second route: the in-run MAE pretraining resumes its own checkpoint (`train_mae --resume`)."
    from drifting_nb.train_mae import make_config, train_mae
    base = get_config("tiny-pixel")
    cfg = make_config(base.mae_preset, {**base.mae_overrides, "steps": 2, "save_every": 2})
    enc = tmp_path / "enc"
    train_mae(cfg, enc, data_dir=str(folder), progress=False)
    ck = sorted((enc / "checkpoints").iterdir())[-1]
    names = sorted(p.name for p in ck.iterdir()) + ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"]
    for name in names:
        work, marker = tmp_path / f"enc_{name}", tmp_path / f"ran_{name}"
        shutil.copytree(enc, work)
        torch.save({"state": Payload(marker)}, work / "checkpoints" / ck.name / name)
        try: train_mae(make_config(base.mae_preset, {**base.mae_overrides, "steps": 3, "save_every": 2}), work,
                       data_dir=str(folder), resume=True, progress=False)
        except Exception: pass                                          # refusing is fine
        assert not marker.exists(), f"a payload planted in the MAE checkpoint's {name} ran on --resume"

# 2. kill -9: no orphan, one writer per run folder

def _children(pid):
    try: return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError: return []

def _alive(pid):
    try: return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError: return False

@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the child process")
def test_kill_during_in_run_mae_pretraining_leaves_no_child(folder, tmp_path):
    over = {**get_config("tiny-pixel").mae_overrides, "steps": 100_000}         # a pretraining that would run for long
    cmd = [sys.executable, "-m", "drifting_nb.train", "--preset", "tiny-pixel", "--data-dir", str(folder),
           "--output-dir", str(tmp_path / "run"), "--mae-overrides", repr(over)]
    parent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and not (tmp_path / "run" / "encoder" / "metrics.jsonl").is_file():
            time.sleep(0.1)                                              # the child is training
        kids = _children(parent.pid)
        assert kids, "no MAE child process was started"
        child = kids[0]
        parent.send_signal(signal.SIGKILL); parent.wait()
        t0 = time.time()
        while _alive(child) and time.time() - t0 < 15: time.sleep(0.05)
        print(f"child ended {time.time() - t0:.2f} s after its parent was killed")
        assert not _alive(child), "the train_mae child outlived the killed training process"
    finally:
        if parent.poll() is None: parent.kill()
        if child and _alive(child): os.kill(child, signal.SIGKILL)

def test_a_second_process_on_a_run_folder_is_refused_until_the_first_is_gone(folder, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from drifting_nb.runtime import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"process {holder.pid}"):
            train(_cfg(folder, out, max_steps=1))
        assert not (out / "config.json").exists()
    finally:
        holder.kill(); holder.wait()                                    # killed: its lock is taken over
    train(_cfg(folder, out, max_steps=1))
    assert _steps(out) == [1] and not (out / ".lock").exists()

# 3. a full disk

def _fill(where, leave: int):
    "Fill the file system of `where` up to `leave` free bytes (a file `filler`)."
    st = os.statvfs(where)
    with open(Path(where) / "filler", "wb") as f:
        n = st.f_bavail * st.f_frsize - leave
        while n > 0:
            k = min(n, 1 << 20); f.write(b"\0" * k); n -= k

def _full_disk_run(folder, disk, fill_at):
    out = disk / "run"
    cfg = _cfg(folder, out, max_steps=4, ckpt_every=2)
    with pytest.raises(RuntimeError) as e:
        train(cfg, fault_hook=lambda step, loss: (fill_at(step, out), loss)[1])
    msg = str(e.value)
    assert "disk is full" in msg and "step_00000002" in msg and "is intact" in msg, msg
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    verify_checkpoint(list_checkpoints(out)[0])
    assert not list((out / "checkpoints").glob(".tmp*")), "the partial checkpoint was left behind"
    return out, cfg

def test_full_disk_on_a_real_small_filesystem(folder, tmp_path):
    disk = tmp_path / "disk"; disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0: pytest.skip(f"cannot mount a 20 MB tmpfs here (needs root): {r.stderr.strip()[:200]}")
    try:
        def fill_at(step, out):
            if step == 3: _fill(disk, leave=200_000)                    # room for metrics, not for a checkpoint
        out, cfg = _full_disk_run(folder, disk, fill_at)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        assert free > 150_000, f"the failed checkpoint still takes the disk ({free} bytes free)"
        (disk / "filler").unlink()
        train(cfg, resume=True)                                         # resumes in place once there is room
        assert _steps(out) == [1, 2, 3, 4] and load_run(out).num_classes == 3
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

def test_full_disk_as_torch_and_safetensors_report_it(folder, tmp_path, monkeypatch):
    "The same path without root: the write fails the way torch.save does on a full tmpfs (RuntimeError, not OSError)."
    import drifting_nb.run as R
    real = R.save_file
    def fill_at(step, out):
        if step == 3:
            def full(tensors, path, *a, **k):
                Path(path).write_bytes(b"\0" * 1000)                   # a partial file, then the error torch raises
                raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 1000 vs 900")
            monkeypatch.setattr(R, "save_file", full)
    out, cfg = _full_disk_run(folder, tmp_path, fill_at)
    monkeypatch.setattr(R, "save_file", real)
    train(cfg, resume=True)
    assert _steps(out) == [1, 2, 3, 4]

# 4. a refused resume changes nothing

def test_refused_resume_leaves_the_config_alone(run3, folder, tmp_path):
    out = tmp_path / "run"; shutil.copytree(run3, out)
    before = (out / "config.json").read_text()
    with pytest.raises(ValueError, match="--generator is 'T/2' there, 'S/2' here"):
        train(_cfg(folder, out, max_steps=6, generator="S/2"), resume=True)
    with pytest.raises(ValueError, match="--seed is 0 there, 5 here"):
        train(_cfg(folder, out, max_steps=6, seed=5), resume=True)
    assert (out / "config.json").read_text() == before
    load_run(out).sample(torch.tensor([0]), alpha=1.0)                  # still samples

# 5. a damaged checkpoint, a half-written metrics line, a crash before the first checkpoint

@pytest.mark.parametrize("damage", ["truncated rank_0.safetensors", "bad meta.json"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(folder, tmp_path, damage):
    out = tmp_path / "run"
    train(_cfg(folder, out, max_steps=4, ckpt_every=2))
    ck = list_checkpoints(out)[-1]
    if damage == "bad meta.json": (ck / "meta.json").write_text('{"step": 4, "num_proc')
    else: f = ck / "rank_0.safetensors"; f.write_bytes(f.read_bytes()[:-64])
    with open(out / "metrics.jsonl", "a") as f: f.write('{"step": 5, "loss": 0.1')     # killed mid-line
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(_cfg(folder, out, max_steps=5, ckpt_every=2), resume=True)
    said = " ".join(str(x.message) for x in w)
    assert f"step_00000004/{damage.split()[-1]}" in said and "resuming from" in said and "step_00000002" in said
    assert _steps(out) == [1, 2, 3, 4, 5]

def test_no_intact_checkpoint_is_a_clear_error(run3, folder, tmp_path):
    out = tmp_path / "run"; shutil.copytree(run3, out)
    f = list_checkpoints(out)[-1] / "model.safetensors"; f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="no intact checkpoint.*step_00000003/model.safetensors"):
        train(_cfg(folder, out, max_steps=4), resume=True)

def test_a_crash_before_the_first_checkpoint_logs_no_step_twice(folder, tmp_path):
    out = tmp_path / "run"
    def crash(step, loss):
        if step == 2: raise KeyboardInterrupt
        return loss
    with pytest.raises(KeyboardInterrupt): train(_cfg(folder, out, max_steps=3, ckpt_every=3), fault_hook=crash)
    assert _steps(out) == [1] and not list_checkpoints(out)
    train(_cfg(folder, out, max_steps=3, ckpt_every=3))      # the rerun starts over
    assert _steps(out) == [1, 2, 3]

# 6. values

@pytest.mark.parametrize("args, flag", [(["--lr", "abc"], "--lr"), (["--taus", ""], "--taus"), (["--Nc", "-3"], "--Nc"),
                                        (["--Nc", "0"], "--Nc"), (["--ckpt-every", "0"], "--ckpt-every"),
                                        (["--log-every", "0"], "--log-every"), (["--max-steps", "0"], "--max-steps"),
                                        (["--ema-decays", "1.5"], "--ema-decays"),
                                        (["--stop-signals", "SIGKILL"], "--stop-signals"),
                                        (["--collective-timeout-s", "0"], "--collective-timeout-s")])
def test_bad_values_are_refused_up_front(args, flag, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"^{flag} must be .*, got") as e:
        train_main(["--preset", "tiny-pixel", "--data-dir", str(tmp_path), "--output-dir", str(out)] + args)
    assert not out.exists(), "a refused command wrote to the output folder"
    print(e.value)

class _StandIn:
    "A run that returns grey 16x16 RGB images at once (the sampling machinery without a network)."
    num_classes, config = 10, {}
    def sample(self, labels, alpha, generator=None):
        return torch.full((len(labels), 16, 16, 3), 128, dtype=torch.uint8)

@pytest.mark.parametrize("alpha", ["nan", "inf", "-1", "0.5"])
def test_sample_refuses_alphas_it_was_not_trained_for(alpha, tmp_path):
    from drifting_nb import sample
    with pytest.raises(SystemExit, match="--alpha must be a finite CFG scale >= 1"):
        sample.main(["--run", str(tmp_path), "--num-samples", "4", f"--alpha={alpha}", "--out", str(tmp_path / "s.npz")])
    assert not (tmp_path / "s.npz").exists()

def test_sample_streams_many_samples_to_the_npz(tmp_path, monkeypatch):
    "20,000 samples of 16x16x3 (15 MB) through the command line: numpy never holds them all at once."
    from drifting_nb import sample, run
    monkeypatch.setattr(run, "load_run", lambda *a, **k: _StandIn())      # the command opens runs through run.open_run
    n, size = 20_000, 16 * 16 * 3
    tracemalloc.start()
    sample.main(["--run", str(tmp_path), "--num-samples", str(n), "--batch-size", "1000", "--device", "cpu",
                 "--out", str(tmp_path / "s.npz")])
    peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    print(f"peak traced memory {peak / 1e6:.2f} MB for {n * size / 1e6:.1f} MB of samples")
    assert peak < n * size / 4, f"{peak} bytes traced: the samples were held in memory"
    with np.load(tmp_path / "s.npz") as f:
        assert f["samples"].shape == (n, 16, 16, 3) and (f["labels"][:12] == np.arange(12) % 10).all()
