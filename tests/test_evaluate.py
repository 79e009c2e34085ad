"""Sampling CLI, the evaluation path (torch-fidelity, stand-in extractor, alpha sweep) and the digits scorer."""
import json, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

import drifting_nb.sample as sample_mod
import drifting_nb.run as run_mod
import drifting_nb.evaluate as ev
from drifting_nb.data import digits_split


class TinyExtractor(FeatureExtractorBase):
    "Stand-in for Inception: a fixed random conv net on uint8 [B,3,H,W] -> 'feat' [B,16], 'logits' [B,10]."
    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(16, 3, 3, 3, generator=g) / 5
        self.w2 = torch.randn(10, 16, generator=g) / 4

    @staticmethod
    def get_provided_features_list(): return ("feat", "logits")
    @staticmethod
    def get_default_feature_layer_for_metric(metric): return {"isc": "logits"}.get(metric, "feat")
    @staticmethod
    def can_be_compiled(): return False

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        f = F.conv2d(x.float() / 127.5 - 1, self.w1, padding=1).relu().mean((2, 3))
        out = {"feat": f, "logits": f @ self.w2.T}
        return tuple(out[k] for k in self.features_list)


if "test-tiny" not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor("test-tiny", TinyExtractor)


def to_u8(x):
    "digits [n,1,8,8] in [-1,1] -> uint8 [n,8,8,1]"
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class DigitsRun:
    """Stand-in Run: real training digits of the requested class plus noise whose size grows with |alpha - best|,
    so the best CFG scale is known."""
    num_classes, config = 10, {"preset": "stand-in"}

    def __init__(self, best=2.0):
        s = digits_split()
        self.by_class = [s.x_train[s.y_train == c] for c in range(10)]
        self.best, self.calls, self.alphas = best, 0, []

    def sample(self, labels, alpha, generator=None, rounding="round"):
        self.calls += 1
        self.alphas.append(alpha)
        self.roundings = getattr(self, "roundings", []) + [rounding]
        idx = [int(torch.randint(0, len(self.by_class[c]), (1,), generator=generator)) for c in labels.tolist()]
        x = torch.stack([self.by_class[c][i] for c, i in zip(labels.tolist(), idx)])
        x = x + 0.4 * abs(alpha - self.best) * torch.randn(x.shape, generator=generator)
        from drifting_nb.data import to_uint8
        return to_uint8(x, rounding)


@pytest.fixture
def standin(monkeypatch, tmp_path):
    run = DigitsRun()
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(run_mod, "load_run", lambda run_dir, ema=True, device="cpu", decay=None: run)   # sample's and evaluate's way in
    return run


@pytest.fixture(scope="module")
def split():
    return digits_split()


# ---------------------------------------------------------------- sampling

def test_sample_cli_npz(standin, tmp_path):
    out = tmp_path / "sub" / "s.npz"
    sample_mod.main(["--run", str(tmp_path / "run"), "--num-samples", "23", "--batch-size", "10", "--alpha", "1.5",
                     "--out", str(out)])
    with np.load(out) as f:
        assert f["samples"].dtype == np.uint8 and f["samples"].shape == (23, 8, 8, 1)
        assert f["labels"].tolist() == [i % 10 for i in range(23)]      # balanced cycle over the classes
    assert standin.calls == 3                                             # one network call per batch
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_sample_cli_labels_seed_and_png(standin, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for p in (a, b):
        sample_mod.main(["--run", str(tmp_path / "run"), "--num-samples", "6", "--labels", "3", "7", "--seed", "5",
                         "--out", str(p)])
    with np.load(a) as fa, np.load(b) as fb:
        assert fa["labels"].tolist() == [3, 7, 3, 7, 3, 7]
        assert np.array_equal(fa["samples"], fb["samples"])             # same seed, same samples
    png = tmp_path / "g.png"
    sample_mod.main(["--run", str(tmp_path / "run"), "--num-samples", "20", "--out", str(png)])
    img = Image.open(png)
    assert img.size == (10 * 9 + 1, 2 * 9 + 1)                            # 10 columns (one per class), 2 rows, 1 px padding
    assert img.mode == "RGB"


def test_sample_bad_input(standin, tmp_path):
    with pytest.raises(ValueError, match="outside this run's classes 0..9"):
        sample_mod.main(["--run", str(tmp_path / "run"), "--num-samples", "4", "--labels", "10", "--out", str(tmp_path / "x.npz")])
    with pytest.raises(SystemExit, match=r"\.npz or \.png"):
        sample_mod.main(["--run", str(tmp_path / "run"), "--num-samples", "4", "--out", str(tmp_path / "x.jpg")])


def test_sample_default_alpha_is_the_runs_best(standin, tmp_path, capsys):
    run_dir, out = tmp_path / "run", str(tmp_path / "s.npz")
    sample = lambda *extra: sample_mod.main(["--run", str(run_dir), "--num-samples", "4", "--out", out, *extra])
    sample()                                                              # no scores.json: no guidance, and it says so
    assert standin.alphas[-1] == 1.0 and "alpha 1" in capsys.readouterr().err
    (run_dir / "scores.json").write_text(json.dumps({"acc": 0.98, "fd": 5.08, "alpha": 2.5, "sweep": {"1.0": {}, "2.5": {}}}))
    sample()                                                              # the best CFG scale of the run's final evaluation
    err = capsys.readouterr().err
    assert standin.alphas[-1] == 2.5 and "alpha 2.5" in err and str(run_dir / "scores.json") in err and "fd 5.08" in err
    sample("--alpha", "1.5")                                              # an explicit --alpha wins, silently
    assert standin.alphas[-1] == 1.5 and "scores.json" not in capsys.readouterr().err
    for bad in ("{not json", json.dumps({"fd": 5.0}), json.dumps({"alpha": "high"}), json.dumps({"alpha": 0.5}), "[2.5]"):
        (run_dir / "scores.json").write_text(bad)
        with pytest.warns(UserWarning, match="scores.json could not be read"):
            sample()                                                      # named in a warning; sampling goes on at 1
        assert standin.alphas[-1] == 1.0 and "alpha 1" in capsys.readouterr().err


def test_load_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample_mod.load_run(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sample_mod.load_run(tmp_path)


def test_run_sample_contract():
    class Bad:
        num_classes = 3
        def sample(self, labels, alpha, generator=None): return torch.zeros(len(labels), 4, 4, 3)   # float, not uint8
    with pytest.raises(TypeError, match="must return uint8"):
        sample_mod.generate(Bad(), sample_mod.balanced_labels(4, 3))


# ---------------------------------------------------------------- evaluation

def make_ref(tmp_path, split, extractor="test-tiny", images=True):
    held = to_u8(split.x_test).numpy()
    feats = ev.FidelityFeatures(extractor)
    path = ev.save_ref_stats(tmp_path / f"ref-{extractor}.npz", ev.compute_ref_stats(held, feats), held if images else None)
    return path, feats


def test_evaluate_run_sweep_picks_best(split, tmp_path):
    ref_path, feats = make_ref(tmp_path, split)
    run = DigitsRun(best=2.0)
    res = ev.evaluate_run(run, ev.load_ref_stats(ref_path), feats, alphas=(1.0, 2.0, 3.5), num_samples=400,
                          sweep_num_samples=200, real_images=ev.load_images(ref_path), batch_size=100, log=lambda s: None)
    assert [s["alpha"] for s in res["sweep"]] == [1.0, 2.0, 3.5]
    assert all(s["num_samples"] == 200 and s["precision"] is None for s in res["sweep"])
    assert res["best"]["alpha"] == 2.0 and res["best"]["num_samples"] == 400
    fids = {s["alpha"]: s["fid"] for s in res["sweep"]}
    assert fids[2.0] < fids[1.0] and fids[2.0] < fids[3.5]
    b = res["best"]
    assert 0 <= b["precision"] <= 1 and 0 <= b["recall"] <= 1 and b["isc_mean"] >= 1
    json.dumps(res)                                                       # JSON-serialisable as is


def test_evaluate_cli_end_to_end(standin, split, tmp_path):
    held = to_u8(split.x_test).numpy()
    np.savez(tmp_path / "held.npz", arr_0=held)
    ref = tmp_path / "ref.npz"
    ev.main(["--make-ref-stats", str(tmp_path / "held.npz"), "--out", str(ref), "--feature-extractor", "test-tiny"])
    with np.load(ref) as f: assert set(f.files) == {"mu", "sigma"} and f["sigma"].shape == (16, 16)
    out = tmp_path / "res.json"
    with pytest.warns(UserWarning, match="precision/recall skipped"):
        ev.main(["--run", str(tmp_path / "run"), "--ref-stats", str(ref), "--num-samples", "300", "--alpha", "1", "2", "3",
                 "--sweep-num-samples", "0", "--feature-extractor", "test-tiny", "--device", "cpu", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["best"]["alpha"] == 2.0 and res["best"]["num_samples"] == 300 and res["best"]["precision"] is None
    assert res["feature_extractor"] == "test-tiny" and res["layers"] == {"fid": "feat", "isc": "logits", "prc": "feat"}
    # with reference images for precision/recall, one alpha (no sweep)
    res = ev.main(["--run", str(tmp_path / "run"), "--ref-stats", str(ref), "--ref-images", str(tmp_path / "held.npz"),
                   "--num-samples", "200", "--alpha", "2", "--feature-extractor", "test-tiny", "--device", "cpu"])
    assert res["sweep"] == [] and res["best"]["precision"] > 0.5


def test_feature_extractor_by_import_path():
    feats = ev.FidelityFeatures("test_evaluate:TinyExtractor") if "test_evaluate" in sys.modules else None
    if feats is None: pytest.skip("test module not importable by name")
    assert feats.layers["fid"] == "feat"
    assert feats(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))["feat"].shape == (2, 16)


def test_evaluate_bad_input(split, tmp_path):
    ref_path, feats = make_ref(tmp_path, split)
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    with pytest.raises(ValueError, match="has no mu"):
        ev.load_ref_stats(tmp_path / "nomu.npz")
    with pytest.raises(FileNotFoundError, match="not found"):
        ev.load_ref_stats(tmp_path / "missing.npz")
    # reference statistics from another feature space: a clear error, not a numpy assertion
    digits_ref, _ = make_ref(tmp_path, split, extractor="digits-classifier", images=False)
    with pytest.raises(ValueError, match="different feature spaces"):
        ev.evaluate_run(DigitsRun(), ev.load_ref_stats(digits_ref), feats, alphas=2.0, num_samples=50, log=lambda s: None)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        ev.FidelityFeatures("inception-v9")
    with pytest.raises(FileNotFoundError, match="weights"):
        ev.FidelityFeatures("inception-v3-compat", weights_path=tmp_path / "no-weights.pth")
    with pytest.raises(ValueError, match="uint8"):
        ev.to_extractor_input(torch.zeros(2, 8, 8, 3))


def test_fid_helpers_closed_form():
    d = 8
    fd = ev.frechet_distance({"mu": np.zeros(d), "sigma": np.eye(d)}, {"mu": np.full(d, 2.0), "sigma": 9 * np.eye(d)})
    assert fd == pytest.approx(4 * d + d * (1 + 9 - 2 * 3))
    assert ev.inception_score(30 * F.one_hot(torch.arange(100) % 4, 4).float(), splits=1)[0] == pytest.approx(4, rel=1e-4)


def test_cli_modules_run():
    for mod in ("drifting_nb.sample", "drifting_nb.evaluate"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--run" in r.stdout and "--out" in r.stdout, r.stderr


# ---------------------------------------------------------------- digits scorer

@pytest.fixture(scope="module")
def halves(split):
    "The held-out digits in two stratified halves: one is the scorer's reference, the other plays a perfect generator."
    g = torch.Generator().manual_seed(0)
    a, b = [], []
    for c in range(10):
        idx = torch.nonzero(split.y_test == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        a.append(idx[: len(idx) // 2]); b.append(idx[len(idx) // 2:])
    return torch.cat(a), torch.cat(b)


def test_digits_scorer_real_and_noise(split, halves):
    ref_idx, gen_idx = halves
    rng_before = torch.get_rng_state()
    threads = torch.get_num_threads()
    scorer = ev.DigitsScorer(split.x_train, split.y_train, split.x_test[ref_idx], split.y_test[ref_idx], seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)                 # the training loop's RNG is untouched
    assert torch.get_num_threads() == threads
    assert scorer.real_acc > 0.95
    real = scorer.score(split.x_test[gen_idx], split.y_test[gen_idx])     # unseen real digits: a perfect generator
    assert real["acc"] > 0.95
    assert real["fd"] < 2.0 * real["fd_floor"]
    g = torch.Generator().manual_seed(0)
    noise = scorer.score(torch.rand(len(gen_idx), 1, 8, 8, generator=g) * 2 - 1, split.y_test[gen_idx])
    assert noise["acc"] < 0.3 and noise["fd"] > 20 * noise["fd_floor"]
    assert set(real) >= {"acc", "fd", "fd_floor", "real_acc", "isc"} and real["isc"] > noise["isc"]
    # diversity: unseen real digits are about as spread as the reference half, and cover it
    assert 0.7 < real["spread"] < 1.3 and 0.7 < real["pixel_spread"] < 1.3 and len(real["spread_per_class"]) == 10
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    # in pixels too (issue 21): unseen reals sit near the pixel floor, noise far from it; a shrunken copy of each real
    # digit toward its class mean keeps the classes but loses pixel spread, and the pixel distance sees it
    assert real["pixel_fd"] < 2.5 * real["pixel_fd_floor"] and noise["pixel_fd"] > 10 * noise["pixel_fd_floor"]
    assert 0.5 < real["pixel_spread_min"] <= real["pixel_spread"] and len(real["pixel_spread_per_class"]) == 10
    x, y = split.x_test[gen_idx], split.y_test[gen_idx]
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    shrunk = scorer.score(means[y] + 0.6 * (x - means[y]), y)
    assert shrunk["pixel_spread"] == pytest.approx(0.36 * real["pixel_spread"], rel=1e-3)
    assert shrunk["pixel_fd"] > 2 * real["pixel_fd"] and shrunk["acc"] > 0.9
    json.dumps(real)                                                      # scores.json and metrics.jsonl take it as is


def test_digits_scorer_sees_a_collapsed_generator(split):
    "Every sample a copy of one real digit of its class: accurate and realistic, but with no spread and no recall."
    scorer = ev.DigitsScorer.default()
    labels = torch.arange(200) % 10
    one_each = torch.stack([split.x_train[split.y_train == c][0] for c in range(10)])
    s = scorer.score(one_each[labels], labels)
    assert s["acc"] > 0.9 and s["precision"] > 0.9
    assert s["spread"] == s["spread_min"] == s["pixel_spread"] == 0 and s["recall"] < 0.05
    real = scorer.score(split.x_train[:200], split.y_train[:200])
    assert real["spread"] > 0.7 and real["recall"] > 0.5


def test_digits_scorer_inputs(split):
    scorer = ev.DigitsScorer.default()
    x, y = split.x_test[:50], split.y_test[:50]
    assert scorer.score(x.view(50, 64), y)["acc"] == scorer.score(x, y)["acc"]    # [n,64] accepted too
    with pytest.raises(ValueError, match=r"\[n,1,8,8\]"):
        scorer.score(torch.zeros(5, 3, 8, 8), y[:5])
    with pytest.raises(ValueError, match="NaN"):
        scorer.score(torch.full((5, 1, 8, 8), float("nan")), y[:5])
    with pytest.raises(ValueError, match="labels"):
        scorer.score(x, y[:10])


# ---------------------------------------------------------------- with a real run of the training system

def test_sample_and_evaluate_a_trained_tiny_run(tmp_path):
    from drifting_nb.data import make_fake_imagefolder
    from drifting_nb.train import get_config, train
    make_fake_imagefolder(tmp_path / "imgs" / "train", num_classes=3, per_class=12, size=(16, 16), ext="png")
    out = tmp_path / "run"
    train(get_config("tiny-pixel", data_dir=str(tmp_path / "imgs"), output_dir=str(out), max_steps=1, encoder="none"))
    sample_mod.main(["--run", str(out), "--num-samples", "7", "--batch-size", "4", "--alpha", "1.5", "--device", "cpu", "--ema-decay", "0.999",
                     "--out", str(tmp_path / "s.npz")])
    with np.load(tmp_path / "s.npz") as f:
        assert f["samples"].shape == (7, 16, 16, 3) and f["samples"].dtype == np.uint8
        assert f["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    ref = tmp_path / "ref.npz"
    ev.main(["--make-ref-stats", str(tmp_path / "imgs" / "train"), "--out", str(ref), "--feature-extractor", "test-tiny",
             "--keep-images"])
    res = ev.main(["--run", str(out), "--ref-stats", str(ref), "--num-samples", "12", "--alpha", "1", "2",
                   "--feature-extractor", "test-tiny", "--device", "cpu", "--batch-size", "6"])
    assert res["best"]["num_samples"] == 12 and res["best"]["precision"] is not None
    assert res["best"]["alpha"] == min(res["sweep"], key=lambda s: s["fid"])["alpha"]


def test_digits_classifier_trains_inside_no_grad(split, tmp_path):
    "The training job builds its scorer lazily inside a no-grad evaluation: a fresh machine has no cached classifier."
    from drifting_nb.evaluate import train_digits_classifier
    with torch.no_grad():
        net = train_digits_classifier(split.x_train, split.y_train, steps=5, cache=tmp_path, use_cache=False)
    assert not net.training


# ---------------------------------------------------------------- uint8: the release's FID path truncates (issue 24)


def test_to_uint8_truncates_as_the_releases_fid_path():
    from drifting_nb.data import to_uint8
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 2, 4)
    assert to_uint8(x).flatten().tolist() == [0, 0, 0, 128, 191, 255, 255, 255]                 # saved images: round
    assert to_uint8(x, "truncate").flatten().tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    release = (np.clip((x.numpy() + 1) / 2, 0, 1) * 255).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(to_uint8(x, "truncate").numpy(), release)                                # as the release computes it
    d = to_uint8(x).int() - to_uint8(x, "truncate").int()
    assert set(d.unique().tolist()) <= {0, 1} and 0.3 < d.float().mean() < 0.7                  # about half a level darker
    with pytest.raises(ValueError, match="truncate"): to_uint8(x, "floor")


def test_evaluate_truncates_by_default(split, tmp_path):
    ref_path, feats = make_ref(tmp_path, split)
    ref = ev.load_ref_stats(ref_path)
    run = DigitsRun(best=1.0)
    kw = dict(alphas=(1.0,), num_samples=200, batch_size=100, log=lambda s: None)
    res = ev.evaluate_run(run, ref, feats, **kw)
    assert res["rounding"] == "truncate" and set(run.roundings) == {"truncate"}
    run.roundings = []
    res_round = ev.evaluate_run(run, ref, feats, rounding="round", **kw)
    assert set(run.roundings) == {"round"} and res_round["best"]["fid"] != res["best"]["fid"]
    assert "--rounding" in ev.evaluate_parser().format_help() and ev.evaluate_parser().parse_args([]).rounding == "truncate"
    with pytest.raises(ValueError, match="rounding"): ev.evaluate_run(run, ref, feats, rounding="nearest", **kw)

    class OwnWay:                                                  # a run that makes its uint8 images itself
        num_classes, config = 10, {}
        def sample(self, labels, alpha, generator=None): return DigitsRun.sample(run, labels, alpha, generator)
    with pytest.warns(UserWarning, match="not truncated"):
        assert ev.evaluate_run(OwnWay(), ref, feats, **kw)["best"]["fid"] > 0


def test_released_run_rounds_or_truncates():
    from pathlib import Path
    from drifting_nb.release import load_release_run
    run = load_release_run(Path(__file__).parent / "fixtures" / "release" / "gen_pixel")
    labels = torch.arange(3)
    r = run.sample(labels, 1.5, generator=torch.Generator().manual_seed(0))
    t = run.sample(labels, 1.5, generator=torch.Generator().manual_seed(0), rounding="truncate")
    assert r.dtype == t.dtype == torch.uint8 and r.shape == t.shape
    assert set((r.int() - t.int()).unique().tolist()) <= {0, 1} and (r != t).any()
    assert ev.rounded_run(run).sample(labels, 1.5, generator=torch.Generator().manual_seed(0)).equal(t)
