"""Behaviour of the 2D course (drifting_nb.toy): targets, training on any sampler, measures, checkpoints, the job,
the plotly animation and its standalone HTML (opened in headless Chromium when available)."""
import json, re, shutil, subprocess, sys, tempfile

import numpy as np

import pytest
import torch

from drifting_nb.toy import (TARGETS, TOY_PRESETS, GaussianMixture, ToyConfig, ToyTrainer, bimodal, checkerboard,
                             energy_distance, evaluate_toy, load_toy_checkpoint, load_toy_model, mode_coverage,
                             noise_floor, parse_toy_overrides, ring, run_toy_job, sample_toy, save_toy_checkpoint,
                             toy_field, train_toy, toy_animation, save_animation_html)

torch.set_num_threads(1)   # small tensors: one thread is as fast, and never fights parallel test workers for cores
TINY = dict(n_pos=64, n_neg=64, hidden=32, snapshot_every=5, n_snapshot=64, grid=4)


@pytest.mark.parametrize("name", list(TARGETS))
def test_targets_draw_repeatable_2d_points(name):
    s = TARGETS[name]
    x = s(300, generator=torch.Generator().manual_seed(3))
    assert x.shape == (300, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, s(300, generator=torch.Generator().manual_seed(3)))
    assert x.abs().max() < 1.5                                   # every target lives in the same box
    with pytest.raises(ValueError, match="positive integer"):
        s(0)


def test_train_toy_accepts_any_sampler_and_records_history():
    calls = []
    def my_target(n):                                            # a user's own target: a plain callable
        calls.append(n)
        return torch.randn(n, 2) * 0.2 + torch.tensor([0.5, -0.5])
    model, h = train_toy(my_target, 12, **TINY)
    assert len(h.loss) == 12 and h.snapshot_steps == [0, 5, 10, 12]
    assert h.snapshots[-1]["samples"].shape == (64, 2)
    assert h.snapshots[-1]["field"].shape == (16, 2) and h.grid.shape == (16, 2)
    assert 64 in calls
    assert sample_toy(model, 9).shape == (9, 2)


def test_a_sampler_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        train_toy(lambda n: torch.randn(n, 3), 2, **TINY)
    with pytest.raises(ValueError, match="unknown target"):
        train_toy("spiral", 2)


def test_training_moves_samples_toward_the_data():
    target = GaussianMixture([[0.5, 0.5]], std=0.1)
    cfg = ToyConfig(steps=120, n_pos=128, n_neg=128, hidden=64, lr=1e-2, warmup=10, schedule="cosine",
                    snapshot_every=0, n_snapshot=64, grid=4)
    tr = ToyTrainer(target, cfg)
    before = evaluate_toy(tr.sampling_model, target, 500, repeats=1)["ratio"]
    tr.fit()
    after = evaluate_toy(tr.sampling_model, target, 500, repeats=1)["ratio"]
    assert after < before / 10
    assert mode_coverage(sample_toy(tr.sampling_model, 500), target)["in_modes"] > 0.8


def test_energy_distance_and_noise_floor():
    g = torch.Generator().manual_seed(0)
    a, b = checkerboard(1000, g), checkerboard(1000, g)
    assert energy_distance(a, a) == 0
    assert energy_distance(a, b) == pytest.approx(energy_distance(b, a))
    assert energy_distance(a, b) < energy_distance(a, b + 0.2)
    floor = noise_floor(checkerboard, 1000)
    assert 0 < floor < energy_distance(a, b + 0.2)
    draws = [energy_distance(checkerboard(1000, g), checkerboard(1000, g)) for _ in range(30)]
    assert abs(sum(draws) / 30 - floor) < 0.2 * floor          # the floor is what two data draws show on average
    with pytest.raises(ValueError, match="expected x"):
        energy_distance(a, torch.zeros(5, 3))


def test_mode_coverage_sees_a_collapse():
    assert mode_coverage(ring(2000), ring)["covered"] == 8
    collapsed = ring.centers[3] + 0.01 * torch.randn(500, 2)
    cov = mode_coverage(collapsed, ring)
    assert cov["covered"] == 1 and cov["in_modes"] == 1.0


def test_field_options_reach_the_field():
    g = torch.Generator().manual_seed(0)
    x, y = bimodal(200, g) * 0.5, bimodal(200, g)
    base = toy_field(x, y, ToyConfig())
    assert not torch.allclose(base, toy_field(x, y, ToyConfig(pos_mult=2.0)))
    assert not torch.allclose(base, toy_field(x, y, ToyConfig(normalize="none")))
    assert not torch.allclose(base, toy_field(x, y, ToyConfig(taus=(0.05, 0.2))))
    assert not torch.allclose(base, toy_field(x, y, ToyConfig(field="mmd")))
    normed = toy_field(x, y, ToyConfig(taus=(0.05, 0.2), drift_norm=True))
    assert normed.pow(2).mean().sqrt() > 1.0                     # two unit-RMS drifts summed


def test_config_rejects_unknown_and_bad_options():
    with pytest.raises(ValueError, match="valid options"):
        ToyConfig().update(temperature=0.1)
    with pytest.raises(ValueError, match="normalize"):
        ToyConfig(normalize="rows")
    with pytest.raises(ValueError, match="taus"):
        ToyConfig(taus=())
    assert parse_toy_overrides({"taus": "0.02, 0.2", "ema": "0.99", "steps": "7"}) == {"taus": (0.02, 0.2), "ema": 0.99, "steps": 7}
    with pytest.raises(ValueError, match="lr"):
        parse_toy_overrides({"lr": "fast"})


def test_resume_continues_exactly(tmp_path):
    cfg = ToyConfig(steps=16, lr=3e-3, schedule="cosine", ema=0.9, **TINY)
    straight = ToyTrainer("ring", cfg)
    straight.fit()
    half = ToyTrainer("ring", cfg)
    half.fit(8)
    save_toy_checkpoint(half, tmp_path / "ck")
    assert not list((tmp_path / "ck").glob("*tmp*"))            # atomic writes leave no temporary files
    resumed = load_toy_checkpoint(tmp_path / "ck", "ring")
    assert resumed.step_count == 8
    resumed.fit()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()): assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters()): assert torch.equal(a, b)
    m = load_toy_model(tmp_path / "ck")
    assert sample_toy(m, 4).shape == (4, 2)


def test_inconsistent_checkpoint_is_detected(tmp_path):
    tr = ToyTrainer("moons", ToyConfig(steps=3, **TINY))
    tr.fit()
    save_toy_checkpoint(tr, tmp_path)
    info = json.loads((tmp_path / "checkpoint.json").read_text())
    info["step"] = 99
    (tmp_path / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="inconsistent checkpoint"):
        load_toy_checkpoint(tmp_path, "moons")


def test_presets_cover_every_target():
    assert set(TOY_PRESETS) == set(TARGETS)
    for name, p in TOY_PRESETS.items():
        assert p["target"] == name
        ToyConfig(**{k: v for k, v in p.items() if k != "target"})


def test_run_toy_job_writes_its_folder_and_resumes(tmp_path):
    over = dict(n_pos=64, n_neg=64, hidden=32, n_eval=300, eval_every=10, snapshot_every=5)
    s = run_toy_job("swiss-roll", tmp_path, max_steps=20, overrides=over)
    for f in ("metrics.jsonl", "final_samples.png", "animation.html", "checkpoint/model.safetensors",
              "checkpoint/optimizer.safetensors", "checkpoint/checkpoint.json"):
        assert (tmp_path / f).is_file(), f
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and all("energy" in r and "loss" in r for r in rows)
    assert s["steps"] == 20 and s["energy_distance"] > 0 and s["noise_floor"] > 0
    assert s["ratio"] == pytest.approx(s["energy_distance"] / s["noise_floor"])
    assert {"final_loss", "wall_time", "train_time"} <= set(s)
    s2 = run_toy_job("swiss-roll", tmp_path, max_steps=30, overrides=over, resume=True)
    assert s2["steps"] == 30
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20, 30]


def test_run_toy_job_refuses_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="valid options"):
        run_toy_job("checkerboard", tmp_path, overrides={"temperature": 0.1})
    with pytest.raises(ValueError, match="choose from"):
        run_toy_job("spiral", tmp_path)


def test_command_line_toy_preset_parses_its_options(tmp_path):
    "`accelerate launch -m drifting_nb.train --preset NAME --KEY VALUE`: strings become ToyConfig values, once."
    from drifting_nb.train import main
    before = torch.get_num_threads()
    s = main(["--preset", "swiss-roll", "--output-dir", str(tmp_path), "--max-steps", "6", "--n_pos", "32",
              "--n_neg", "32", "--hidden", "16", "--taus", "0.05,0.2", "--drift_norm", "false", "--n_eval", "100",
              "--snapshot_every", "3", "--cpu-threads", "1"])
    assert s["steps"] == 6 and torch.get_num_threads() == before
    cfg = json.loads((tmp_path / "checkpoint" / "checkpoint.json").read_text())["config"]
    assert (cfg["n_pos"], cfg["hidden"], cfg["taus"], cfg["drift_norm"]) == (32, 16, [0.05, 0.2], False)
    with pytest.raises(ValueError, match="not a valid int"):
        main(["--preset", "swiss-roll", "--output-dir", str(tmp_path / "b"), "--n_pos", "many"])


@pytest.fixture(scope="module")
def history():
    _, h = train_toy("ring", 30, n_pos=64, n_neg=64, hidden=32, snapshot_every=10, n_snapshot=200, grid=8)
    return h


def test_animation_has_one_frame_per_snapshot(history):
    fig = toy_animation(history)
    assert len(fig.frames) == len(history.snapshots) == 4
    assert [s.label for s in fig.layout.sliders[0].steps] == ["0", "10", "20", "30"]
    last = fig.frames[-1].data
    np.testing.assert_allclose(np.asarray(last[0].x), history.snapshots[-1]["samples"][:, 0].numpy())
    assert len(last[2].x) == 30                                  # the loss curve is filled in up to that step
    assert {b.label for b in fig.layout.updatemenus[0].buttons} == {"Play", "Pause"}


def test_animation_needs_snapshots(history):
    empty = type(history)(config={}, data=history.data)
    with pytest.raises(ValueError, match="no snapshots"):
        toy_animation(empty)


def test_html_file_is_standalone(history, tmp_path):
    path = save_animation_html(history, tmp_path / "sub" / "anim.html")
    html = path.read_text()
    assert re.search(r"<script[^>]*\bsrc=", html) is None, "the page loads a script from elsewhere"
    assert len(html) > 1_000_000, "plotly.js is not inside the file"
    assert len(_frames_in_html(html)) == len(history.snapshots)


def _frames_in_html(html):
    "The frames list of the figure JSON that plotly writes into the page."
    m = re.search(r"Plotly\.addFrames\(\s*['\"][^'\"]+['\"],\s*(\[.*?\])\s*\)", html, re.S)
    assert m, "no Plotly.addFrames call in the page"
    return json.loads(m.group(1))


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=8000", "--window-size=1000,560"]


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_html_draws_in_a_browser(history, tmp_path):
    from PIL import Image
    path = save_animation_html(history, tmp_path / "anim.html")
    profile = tempfile.mkdtemp()
    try:
        shot = tmp_path / "shot.png"
        subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                        path.as_uri()], check=True, capture_output=True, timeout=120)
        dom = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                             check=True, capture_output=True, timeout=120, text=True).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert (img.sum(-1) < 700).mean() > 0.01, "the page is blank"
    assert ((r > 200) & (g > 100) & (g < 180) & (b < 80)).sum() > 50, "no orange samples drawn"
    assert ((b > 150) & (r < 120)).sum() > 50, "no blue field arrows drawn"
    assert 'class="main-svg"' in dom                            # plotly rendered its SVG
    assert dom.count('class="slider-label-group"') == len(history.snapshots)   # one slider stop per frame


def test_toy_does_not_import_the_interactive_layer():
    "toy (floor 3) writes the job's animation itself: importing it and running its job never loads widgets (floor 4)."
    code = ("import sys, drifting_nb.toy as t; assert 'drifting_nb.widgets' not in sys.modules, 'toy imported widgets'; "
            "import inspect; assert 'drifting_nb.widgets' not in inspect.getsource(t)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
