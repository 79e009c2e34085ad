"""The interactive layer (drifting_nb.widgets): the panel's wiring to train_toy, its frames (drawn on its own
matplotlib Figure, never through pyplot, safe from any thread), the plotly stills a saved notebook keeps, and the
field explorer (its points both ways between kernel and page, the page's own field against compute_V, "train from
here")."""
import io, shutil, threading

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import plotly.io as pio
import pytest
import torch
from PIL import Image

from drifting_nb.drift import compute_V
from drifting_nb.toy import TARGETS, energy_distance, toy_animation, train_toy
from drifting_nb.widgets import INITS, FieldExplorer, SnapshotFrames, ToyPanel, plotly_png, run_field_js, static_plotly

torch.set_num_threads(1)   # small tensors: one thread is as fast, and never fights parallel test workers for cores
SMALL = {"steps": 12, "n_pos": 32, "n_neg": 32, "hidden": 16, "snapshot_every": 3, "n_snapshot": 40, "grid": 4}


def small_train(sampler, callback=None, **opts):
    return train_toy(sampler, callback=callback, **{**opts, **SMALL})


def test_panel_controls_reach_train_toy():
    seen = {}
    def fake_train(sampler, callback=None, **opts):
        seen.update(opts, sampler=sampler, threads=torch.get_num_threads())
        return small_train(sampler, callback, **opts)
    p = ToyPanel(train_fn=fake_train, threads=3)
    p.target.value, p.init.value = "bimodal", "far away"
    p.taus.value, p.normalize.value, p.drift_norm.value = (0.02, 0.2), "none", False
    p.pos_mult.value, p.neg_mult.value = 1.5, 0.5
    p.n_pos.value, p.n_neg.value, p.steps.value = 128, 256, 300
    assert p.options()["taus"] == (0.02, 0.2)
    before = torch.get_num_threads()
    h = p.train()
    assert seen["sampler"] is TARGETS["bimodal"] and seen["init_center"] == INITS["far away"]
    assert (seen["normalize"], seen["pos_mult"], seen["neg_mult"], seen["drift_norm"]) == ("none", 1.5, 0.5, False)
    assert (seen["n_pos"], seen["n_neg"], seen["steps"]) == (128, 256, 300)
    assert seen["threads"] == 3 and torch.get_num_threads() == before   # the panel's own threads, then restored
    assert len(p.player.frames) == len(h.snapshots) and p.player.labels[0] == "step 0"
    assert p.shown == p.player.index == len(h.snapshots) - 1     # after training the last snapshot is on screen
    assert not p.train_button.disabled


def test_player_holds_every_frame_without_pyplot():
    plt.close("all")
    p = ToyPanel(train_fn=small_train)
    h = p.train()
    assert len(p.frames.cache) == len(h.snapshots)               # every frame drawn once, right after training
    for i in (1, 3, 0):
        p.player.index = i                                       # as the browser reports it
        assert p.shown == i and h.snapshots[p.shown]["step"] == 3 * i
        assert p.player.frames[i] == p.frames.cache[i]
    assert p.player.frames[0][:4] == b"\x89PNG"
    p.show(-1)
    assert p.player.index == p.shown == len(h.snapshots) - 1
    assert plt.get_fignums() == []                               # nothing went through pyplot's global state
    assert "image/png" in p._repr_mimebundle_()                  # a saved notebook keeps the frame on screen


def test_frames_show_the_snapshot_they_are_for():
    _, h = train_toy("ring", 12, **{k: v for k, v in SMALL.items() if k != "steps"})
    f = SnapshotFrames(h)
    first, last = (np.asarray(Image.open(io.BytesIO(f.png(i))).convert("RGB")) for i in (0, -1))
    assert first.shape == last.shape and (first != last).any()
    with pytest.raises(IndexError):
        f.png(len(h.snapshots))
    with pytest.raises(ValueError, match="no snapshots"):
        SnapshotFrames(type(h)(config={}, data=h.data))


def test_frames_draw_while_another_thread_uses_pyplot():
    "The failure JupyterLab showed: a widget callback drawing on one thread while pyplot figures render on another."
    _, h = train_toy("ring", 12, **{k: v for k, v in SMALL.items() if k != "steps"})
    errors = []
    def frames():
        try:
            for _ in range(4): SnapshotFrames(h).render_all()
        except Exception as e: errors.append(e)
    t = threading.Thread(target=frames)
    t.start()
    while t.is_alive():
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.semilogy([1, 2, 3], [1e-6, 1e-3, 1]); ax.set_title(r"$\mathdefault{10^{-6}}$")
        fig.savefig(io.BytesIO(), format="png"); plt.close(fig)
    assert errors == []


def test_plotly_stills_keep_the_figure_and_not_plotly_js():
    _, h = train_toy("ring", 12, **{k: v for k, v in SMALL.items() if k != "steps"})
    fig = toy_animation(h)
    img = Image.open(io.BytesIO(plotly_png(fig))).convert("RGB")
    assert img.size == (fig.layout.width, fig.layout.height)
    a = np.asarray(img).astype(int)
    assert ((a[..., 0] > 200) & (a[..., 1] > 100) & (a[..., 1] < 180) & (a[..., 2] < 80)).sum() > 20   # orange samples
    right = a[:, a.shape[1] // 2:]                               # the loss panel: the still is the last frame, the
    first = np.asarray(Image.open(io.BytesIO(plotly_png(fig, frame=None))).convert("RGB")).astype(int)[:, a.shape[1] // 2:]
    assert (right.sum(-1) < 100).sum() > (first.sum(-1) < 100).sum() + 50   # whole curve drawn, not the empty start
    before = static_plotly()
    try:
        bundle = fig._repr_mimebundle_()
        assert list(bundle) == ["image/png"] and len(bundle["image/png"]) < 500_000
    finally:
        pio.renderers.default = before


NODE = shutil.which("node") or shutil.which("nodejs")
needs_node = pytest.mark.skipif(NODE is None, reason="no Node.js to run the canvas's JavaScript (apt-get install nodejs)")


def test_explorer_arrows_are_the_training_field():
    g = torch.Generator().manual_seed(0)
    ex = FieldExplorer(data=TARGETS["bimodal"](80, g), generated=0.2 * torch.randn(40, 2, generator=g))
    ex.tau.value, ex.normalize.value, ex.pos_mult.value, ex.neg_mult.value = 0.2, "y", 1.5, 0.7
    Vp, Vm, V = ex.fields()
    torch.testing.assert_close(V, compute_V(ex.gen, ex.data, tau=0.2, normalize="y", pos_mult=1.5, neg_mult=0.7),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Vp - Vm, compute_V(ex.gen, ex.data, tau=0.2, normalize="y"), atol=1e-5, rtol=1e-4)


@needs_node
@pytest.mark.parametrize("normalize", ["xy", "y", "none"])
def test_the_page_computes_compute_V(normalize):
    "The canvas's JavaScript field, run in Node.js, is compute_V's V+ and V- at a small and a large temperature."
    g = torch.Generator().manual_seed(3)
    y, x = TARGETS["checkerboard"](120, g), 0.4 * torch.randn(70, 2, generator=g)
    for tau in (0.01, 0.3):
        jp, jm, ms = run_field_js(y, x, tau, normalize)
        torch.testing.assert_close(jp, compute_V(x, y, tau=tau, normalize=normalize, pos_mult=1.0, neg_mult=0.0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(jm, -compute_V(x, y, tau=tau, normalize=normalize, pos_mult=0.0, neg_mult=1.0), atol=1e-5, rtol=1e-4)
    jp, jm, _ = run_field_js(y, x[:1], 0.1, normalize)             # one generated point: no field, no NaN
    assert jp.abs().sum() == 0 and jm.abs().sum() == 0


def test_explorer_points_travel_both_ways():
    ex = FieldExplorer(threads=None)
    n_data, n_gen = len(ex.data), len(ex.gen)
    assert len(ex.canvas.data) == 2 * n_data and len(ex.canvas.gen) == 2 * n_gen
    ex.canvas.gen = ex.canvas.gen + [0.25, -0.5]                 # what the page sends after a click adds a point
    assert len(ex.gen) == n_gen + 1 and ex.gen[-1].tolist() == [0.25, -0.5]
    ex.data = ex.data[:10]                                       # and what Python sets, the page draws
    assert len(ex.canvas.data) == 20
    assert ex.canvas.modes == list(ex.MODES) and ex.canvas.normalizations == list(ex.NORMALIZATIONS)
    ex.normalize.value = "none"
    assert ex.canvas.normalizations[ex.normalize.index] == "none"  # the index the page links to the canvas
    ex.gen = ex.gen[:1]                                          # one generated point: no field, no crash
    assert all(v.abs().sum() == 0 for v in ex.fields())
    png = Image.open(io.BytesIO(ex.png())).convert("RGB")         # the still a saved notebook keeps
    assert png.size[0] >= 400 and "image/png" in ex._repr_mimebundle_()


def test_explorer_trains_from_here():
    ex = FieldExplorer(threads=None)
    start = energy_distance(ex.gen, ex.data)
    h = ex.train_from_here(steps=100)
    assert ex.snapshot.max == len(h.snapshots) - 1
    assert energy_distance(ex.gen, ex.data) < start / 3
    ex.snapshot.value = 0
    torch.testing.assert_close(ex.gen, h.snapshots[0]["samples"])
    assert len(ex.canvas.gen) == 2 * len(h.snapshots[0]["samples"])


def test_temperatures_are_toggles_and_the_frame_tells_data_from_samples():
    p = ToyPanel(train_fn=small_train)
    p.taus.value = (0.5, 0.01)
    assert p.taus.value == (0.01, 0.5) and [b.value for b in p.taus._buttons] == [True, False, False, False, False, True]
    p.taus._buttons[2].value = True                              # a click on "0.05"
    assert p.options()["taus"] == (0.01, 0.05, 0.5)
    p.train()
    a = np.asarray(Image.open(io.BytesIO(p.frames.png(-1))).convert("RGB")).astype(int)
    assert a.shape[1] >= 800                                     # drawn large: it is shown at the output's width
    blue = (a[..., 2] > 150) & (a[..., 0] < 100)                 # the data
    orange = (a[..., 0] > 200) & (a[..., 1] > 100) & (a[..., 1] < 180) & (a[..., 2] < 80)   # the generated samples
    assert blue.sum() > 30 and orange.sum() > 30
