"""Runs on a shared cluster: a notice to stop (SIGTERM, SIGUSR1) ends with a checkpoint of the step reached and exit
status 0, in every process and in an MAE pretraining child; a checkpoint resumes on another process count; a process
that dies ends the others with an error naming it. Tiny runs (tiny-pixel, the drift on raw samples, a narrow T/2)."""
import json, os, shutil, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from drifting_nb.train import get_config, train
from drifting_nb.run import list_checkpoints, verify_checkpoint, read_metrics
from drifting_nb.runtime import read_stop_marker, load_state, PREEMPTED_EXIT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
SMALL = dict(hidden_size=32, depth=1, num_heads=2)
LINUX = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds processes through Linux /proc")

def _cfg(folder, out, **kw):
    return get_config("tiny-pixel", data_dir=str(folder), encoder="none", output_dir=str(out), sample_every=0,
                      **{"generator_kw": SMALL, **kw})

def _cli(folder, out, *extra):
    return ["-m", "drifting_nb.train", "--preset", "tiny-pixel", "--data-dir", str(folder), "--output-dir", str(out),
            "--encoder", "none", "--sample-every", "0", "--generator-kw", repr(SMALL), *map(str, extra)]

def _losses(out): return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}

def _wait_for(cond, timeout, what):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout: raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)

def _children(pid):
    try: return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError: return []

def _adam_steps(ckpt):
    "The optimizer's update count of a checkpoint (every parameter's AdamW `step`)."
    st = load_state(Path(ckpt) / "train_state.safetensors")["optimizer"]["state"]
    return {float(s["step"]) for s in st.values()}

def _ignore_stop_signals():
    "preexec_fn: the launcher ignores the stop signals, as the README's SLURM script makes it (`trap '' USR1 TERM`)."
    signal.signal(signal.SIGUSR1, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN)

def _launch(args, nproc=2, **kw):
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())] + args
    return subprocess.Popen(cmd, env={**ENV, "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGINT"}, preexec_fn=_ignore_stop_signals,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

def _free_port():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

# 1. one process: the stop checkpoint holds everything; more signals during its write change nothing

def test_a_signal_stops_after_the_step_and_the_resume_equals_an_uninterrupted_run(folder, tmp_path, monkeypatch):
    import drifting_nb.run as R
    train(_cfg(folder, tmp_path / "ref", max_steps=6, ckpt_every=4))
    out, times = tmp_path / "run", {}
    def hook(step, loss):
        if step == 2 and "signal" not in times: times["signal"] = time.time(); os.kill(os.getpid(), signal.SIGTERM)
        return loss
    real = R._write_checkpoint
    def write_amid_signals(tmp, *a, **k):                              # the scheduler insists during the save
        os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR1)
        return real(tmp, *a, **k)
    monkeypatch.setattr(R, "_write_checkpoint", write_amid_signals)
    summary = train(_cfg(folder, out, max_steps=6, ckpt_every=4), fault_hook=hook)
    took = time.time() - times["signal"]
    monkeypatch.setattr(R, "_write_checkpoint", real)
    print(f"one process: stopped {took:.2f} s after SIGTERM")
    assert summary["stopped"] == "SIGTERM" and took < 60
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]           # between the periodic ones (4)
    verify_checkpoint(list_checkpoints(out)[0])
    marker = read_stop_marker(out)
    assert marker["step"] == 2 and marker["signal"] == "SIGTERM" and marker["checkpoint"].endswith("step_00000002")
    assert sorted(_losses(out)) == [1, 2] and any(r.get("stopped") == "SIGTERM" for r in read_metrics(out))
    train(_cfg(folder, out, max_steps=6, ckpt_every=4), resume=True)
    a, b = _losses(tmp_path / "ref"), _losses(out)
    assert sorted(b) == list(range(1, 7)) and read_stop_marker(out) is None
    for s in range(3, 7): assert a[s] == b[s], (s, a[s], b[s])                   # bit-exact

# 2. two processes, as the README's SLURM script runs them: the launcher ignores the signal, every process gets it

@pytest.fixture(scope="module")
def stopped_two(folder, tmp_path_factory):
    "A two-process run signalled between checkpoints: (run folder, the step it stopped after, its log, seconds to exit)."
    out = tmp_path_factory.mktemp("two") / "run"
    p = _launch(_cli(folder, out, "--Nc", 2, "--max-steps", 5000, "--ckpt-every", 1000, "--log-every", 1))
    try:
        _wait_for(lambda: len(_losses(out)) >= 2 or p.poll() is not None, 120, "two logged steps")
        assert p.poll() is None, p.stdout.read()[-3000:]
        workers = _children(p.pid)
        assert len(workers) == 2, workers
        t0 = time.time()
        for pid in [p.pid] + workers: os.kill(pid, signal.SIGUSR1)      # what SLURM's --signal=USR1 does
        log = p.communicate(timeout=90)[0]
        took = time.time() - t0
    finally:
        if p.poll() is None: p.kill()
    print(f"two processes: exit status {p.returncode} {took:.2f} s after SIGUSR1")
    assert p.returncode == PREEMPTED_EXIT == 0, log[-3000:]
    return out, read_stop_marker(out)["step"], log, took

@LINUX
def test_two_processes_signalled_between_checkpoints_save_that_step_and_resume_on_one(stopped_two, folder, tmp_path):
    run, step, log, took = stopped_two
    assert took < 60
    marker = read_stop_marker(run)
    assert 2 <= step < 1000 and marker["signal"] == "SIGUSR1", marker
    assert [c.name for c in list_checkpoints(run)] == [f"step_{step:08d}"]
    meta = verify_checkpoint(list_checkpoints(run)[0])
    assert meta["num_processes"] == 2 and sorted(_losses(run)) == list(range(1, step + 1))
    assert "stopping on SIGUSR1" in log, log[-2000:]
    out = tmp_path / "run"; shutil.copytree(run, out)                   # 2 -> 1: the run continues on one process
    train(_cfg(folder, out, Nc=2, max_steps=step + 2, ckpt_every=1000, log_every=1), resume=True)
    last = list_checkpoints(out)[-1]
    assert last.name == f"step_{step + 2:08d}" and verify_checkpoint(last)["num_processes"] == 1
    assert sorted(_losses(out)) == list(range(1, step + 3))
    assert _adam_steps(last) == {float(step + 2)}                          # the optimizer continued, not restarted
    assert read_stop_marker(out) is None

@LINUX
def test_two_processes_resumed_after_a_signal_equal_an_uninterrupted_run(stopped_two, folder, tmp_path):
    run, step, _, _ = stopped_two
    out, ref, end = tmp_path / "run", tmp_path / "ref", step + 2
    shutil.copytree(run, out)
    ps = [_launch(_cli(folder, ref, "--Nc", 2, "--max-steps", end, "--ckpt-every", 1000, "--log-every", 1)),   # side by side
          _launch(_cli(folder, out, "--Nc", 2, "--max-steps", end, "--ckpt-every", 1000, "--log-every", 1, "--resume"))]
    for p in ps:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log[-3000:]
    a, b = _losses(ref), _losses(out)
    assert sorted(b) == list(range(1, end + 1))
    for s in range(step + 1, end + 1): assert a[s] == b[s], (s, a[s], b[s])   # bit-exact

# 3. 1 -> 2

@LINUX
def test_a_one_process_checkpoint_resumes_on_two(folder, tmp_path):
    out = tmp_path / "run"
    train(_cfg(folder, out, Nc=2, max_steps=2, ckpt_every=2, log_every=1))
    r = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
                       + _cli(folder, out, "--Nc", 2, "--max-steps", 4, "--ckpt-every", 2, "--log-every", 1, "--resume"),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "written by 1 process" in r.stdout, r.stdout[-2000:]                # the run says what it does
    last = list_checkpoints(out)[-1]
    meta = verify_checkpoint(last)
    assert last.name == "step_00000004" and meta["num_processes"] == 2
    assert (last / "rank_1.safetensors").is_file() and _adam_steps(last) == {4.0}
    assert sorted(_losses(out)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="--Nneg is 4 there, 8 here"):            # the global batch stays
        train(_cfg(folder, out, Nc=2, Nneg=8, max_steps=6), resume=True)

# 4. a dead process

@LINUX
def test_a_killed_process_ends_the_other_with_an_error_naming_it(folder, tmp_path):
    out, port, timeout_s = tmp_path / "run", str(_free_port()), 30
    env = lambda r: {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "LOCAL_RANK": str(r),
                     "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    args = _cli(folder, out, "--Nc", 2, "--max-steps", 100_000, "--ckpt-every", 100_000, "--log-every", 1,
                "--collective-timeout-s", timeout_s)
    ps = [subprocess.Popen([sys.executable] + args, env=env(r), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
          for r in (0, 1)]
    try:
        _wait_for(lambda: len(_losses(out)) >= 2 or any(p.poll() is not None for p in ps), 120, "two logged steps")
        assert all(p.poll() is None for p in ps), ps[0].stdout.read()[-3000:]
        t0 = time.time()
        ps[1].kill(); ps[1].wait()
        log = ps[0].communicate(timeout=timeout_s + 30)[0]
        took = time.time() - t0
    finally:
        for p in ps:
            if p.poll() is None: p.kill()
    print(f"the survivor ended {took:.2f} s after its peer was killed (collective timeout {timeout_s} s)")
    assert ps[0].returncode not in (0, None) and took < timeout_s, log[-3000:]
    assert f"rank 1 (PID {ps[1].pid}" in log and "has ended" in log, log[-3000:]

# 5. in-run MAE pretraining

@LINUX
def test_a_signal_during_in_run_mae_pretraining_saves_the_mae_and_ends_cleanly(folder, tmp_path):
    from drifting_nb.train_mae import make_config, train_mae
    out = tmp_path / "run"
    base = get_config("tiny-pixel")
    over = {**base.mae_overrides, "steps": 100_000, "save_every": 100_000, "log_every": 1}
    cmd = [sys.executable, "-m", "drifting_nb.train", "--preset", "tiny-pixel", "--data-dir", str(folder),
           "--output-dir", str(out), "--sample-every", "0", "--mae-overrides", repr(over)]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (out / "encoder" / "metrics.jsonl").is_file() or p.poll() is not None, 120, "the MAE's first row")
        assert p.poll() is None and _children(p.pid), p.stdout.read()[-3000:]
        t0 = time.time()
        p.send_signal(signal.SIGTERM)                                      # to the training process only: it passes it on
        log = p.communicate(timeout=90)[0]
        took = time.time() - t0
    finally:
        if p.poll() is None: p.kill()
    print(f"in-run MAE pretraining: exit status {p.returncode} {took:.2f} s after SIGTERM")
    assert p.returncode == 0 and took < 60, log[-3000:]
    mae = read_stop_marker(out / "encoder")
    assert mae and mae["signal"] == "SIGTERM", log[-3000:]
    assert Path(mae["checkpoint"]).name == f"step_{mae['step']:07d}" and Path(mae["checkpoint"]).is_dir()
    assert read_stop_marker(out)["signal"] == "SIGTERM" and not list_checkpoints(out)
    assert not (out / "encoder" / "encoder.safetensors").exists()
    res = train_mae(make_config(base.mae_preset, {**over, "steps": mae["step"] + 2}), out / "encoder", data_dir=str(folder),
                    resume=True, progress=False)                            # --resume continues the MAE
    assert res["step"] == mae["step"] + 2 and (out / "encoder" / "encoder.safetensors").is_file()
    assert read_stop_marker(out / "encoder") is None

# 6. a hung process: the collective timeout the job sets ends the wait, and the process that did not come is named

def test_a_hung_process_ends_the_wait_after_the_collective_timeout_naming_it(tmp_path):
    probe = ("import sys, time, torch, torch.distributed as dist\n"
             "from drifting_nb.runtime import set_collective_timeout, PeerWatch\n"
             "dist.init_process_group('gloo'); set_collective_timeout(3)\n"
             "w = PeerWatch(exit_grace_s=60).start(); w.progress(1); dist.barrier()\n"
             "if dist.get_rank() == 1: time.sleep(60); sys.exit(0)   # stuck before step 2 (a data loader, a deadlock)\n"
             "w.progress(2); t0 = time.time()\n"
             "try: dist.all_reduce(torch.ones(1))\n"
             "except RuntimeError as e: print(f'gave up after {time.time() - t0:.1f} s: {w.explain(e)}'); sys.exit(1)\n")
    port = str(_free_port())
    ps = [subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": "2"})
          for r in (0, 1)]
    try:
        log = ps[0].communicate(timeout=90)[0]
    finally:
        for p in ps: p.kill(); p.wait()
    print(log.strip()[:300])
    took = float(log.split("gave up after ")[1].split(" s")[0])
    assert ps[0].returncode == 1 and 2.5 < took < 10, log
    assert f"rank 1 (PID {ps[1].pid}" in log and "has not reached step 2 (it started step 1)" in log, log
