"""The interactive layer (drifting_nb.widgets): the plotly animation, its standalone HTML (opened in headless
Chromium when available) and the ipywidgets panel's wiring to train_toy."""
import json, re, shutil, subprocess, tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from drifting_nb.toy import TARGETS, train_toy
from drifting_nb.widgets import INITS, ToyPanel, save_animation_html, toy_animation

torch.set_num_threads(1)   # small tensors: one thread is as fast, and never fights parallel test workers for cores


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


def test_panel_controls_reach_train_toy():
    seen = {}
    def fake_train(sampler, callback=None, **opts):
        seen.update(opts, sampler=sampler)
        return train_toy(sampler, callback=callback, **{**opts, "steps": 20, "n_pos": 32, "n_neg": 32, "hidden": 16,
                                                        "snapshot_every": 5, "n_snapshot": 50, "grid": 4})
    p = ToyPanel(train_fn=fake_train)
    p.target.value, p.init.value = "bimodal", "far away"
    p.taus.value, p.normalize.value = (0.02, 0.2), "none"
    p.pos_mult.value, p.neg_mult.value = 1.5, 0.5
    p.n_pos.value, p.n_neg.value, p.steps.value = 128, 256, 300
    assert p.options()["taus"] == (0.02, 0.2)
    h = p.train()
    assert seen["sampler"] is TARGETS["bimodal"] and seen["init_center"] == INITS["far away"]
    assert (seen["normalize"], seen["pos_mult"], seen["neg_mult"]) == ("none", 1.5, 0.5)
    assert (seen["n_pos"], seen["n_neg"], seen["steps"]) == (128, 256, 300)
    assert p.slider.max == p.play.max == len(h.snapshots) - 1
    assert p.shown == p.slider.max                               # after training the last snapshot is on screen


def test_slider_shows_the_matching_snapshot():
    p = ToyPanel(train_fn=lambda s, callback=None, **o: train_toy(
        s, callback=callback, **{**o, "steps": 12, "n_pos": 32, "n_neg": 32, "hidden": 16, "snapshot_every": 3,
                                 "n_snapshot": 40, "grid": 4}))
    h = p.train()
    for i in (1, 3, 0):
        p.slider.value = i
        assert p.shown == i and h.snapshots[p.shown]["step"] == 3 * i
