"""The interactive layer (drifting_nb.widgets): the panel's wiring to train_toy, its frames (drawn on its own
matplotlib Figure, never through pyplot, safe from any thread), the plotly stills a saved notebook keeps, and the
field explorer's clicks, controls and "train from here"."""
import io, threading

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import plotly.io as pio
import pytest
import torch
from PIL import Image
from plotly.callbacks import Points

from drifting_nb.drift import compute_V
from drifting_nb.toy import TARGETS, energy_distance, toy_animation, train_toy
from drifting_nb.widgets import INITS, FieldExplorer, SnapshotFrames, ToyPanel, plotly_png, static_plotly

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
    assert p.slider.max == p.play.max == len(h.snapshots) - 1
    assert p.shown == p.slider.max                               # after training the last snapshot is on screen
    assert not p.train_button.disabled


def test_slider_flips_cached_frames_without_pyplot():
    plt.close("all")
    p = ToyPanel(train_fn=small_train)
    h = p.train()
    assert len(p.frames.cache) == len(h.snapshots)               # every frame drawn once, right after training
    for i in (1, 3, 0):
        p.slider.value = i
        assert p.shown == i and h.snapshots[p.shown]["step"] == 3 * i
        assert p.stack.selected_index == i and p.stack.children[i].value == p.frames.cache[i]
    assert len(p.stack.children) == len(h.snapshots) and p.stack.children[0].value[:4] == b"\x89PNG"
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
    before = static_plotly()
    try:
        bundle = fig._repr_mimebundle_()
        assert list(bundle) == ["image/png"] and len(bundle["image/png"]) < 500_000
    finally:
        pio.renderers.default = before


def _click(ex, trace, i):
    t = ex.fig.data[trace]
    ex._click(t, Points(point_inds=[i], xs=[t.x[i]], ys=[t.y[i]], trace_name=t.name, trace_index=trace), None)


def test_explorer_arrows_are_the_training_field():
    g = torch.Generator().manual_seed(0)
    ex = FieldExplorer(data=TARGETS["bimodal"](80, g), generated=0.2 * torch.randn(40, 2, generator=g))
    ex.tau.value, ex.normalize.value, ex.pos_mult.value, ex.neg_mult.value = 0.2, "y", 1.5, 0.7
    Vp, Vm, V = ex.fields()
    torch.testing.assert_close(V, compute_V(ex.gen, ex.data, tau=0.2, normalize="y", pos_mult=1.5, neg_mult=0.7),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Vp - Vm, compute_V(ex.gen, ex.data, tau=0.2, normalize="y"), atol=1e-5, rtol=1e-4)
    drawn = np.asarray(ex.fig.data[5].x, dtype=float)            # the V arrows on the canvas: start, tip, None, ...
    np.testing.assert_allclose(drawn[1::9] - drawn[0::9], V[:, 0].numpy(), atol=1e-5)
    before = list(ex.fig.data[5].x)
    ex.normalize.value = "none"
    assert list(ex.fig.data[5].x) != before


def test_explorer_clicks_add_move_and_erase():
    ex = FieldExplorer(threads=None)
    n_data, n_gen = len(ex.data), len(ex.gen)
    ex.mode.value = "add generated"; _click(ex, 0, 7)
    assert len(ex.gen) == n_gen + 1 and len(ex.fig.data[2].x) == n_gen + 1
    ex.mode.value = "erase"; _click(ex, 1, 3)
    assert len(ex.data) == n_data - 1
    ex.mode.value = "move"; _click(ex, 1, 0); _click(ex, 0, 0)
    assert ex.data[0].tolist() == [-ex.lim, -ex.lim]
    ex.mode.value = "erase"
    t = ex.fig.data[2]
    ex._select(t, Points(point_inds=[0, 1, 2], xs=[], ys=[], trace_name=t.name, trace_index=2), None)
    assert len(ex.gen) == n_gen - 2
    ex.gen = ex.gen[:1]; ex.update()                              # one generated point: no field, no crash
    assert ex.fig.data[5].x == ()


def test_explorer_trains_from_here():
    ex = FieldExplorer(threads=None)
    start = energy_distance(ex.gen, ex.data)
    h = ex.train_from_here(steps=100)
    assert ex.snapshot.max == len(h.snapshots) - 1
    assert energy_distance(ex.gen, ex.data) < start / 3
    ex.snapshot.value = 0
    torch.testing.assert_close(ex.gen, h.snapshots[0]["samples"])
