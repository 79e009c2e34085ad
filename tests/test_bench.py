"""The bench as an instrument: "before" is the package as committed (git archive) and really is what its child
processes import, the authors' loss is loaded from a path given at run time (with a clear error when it is not there),
and the tables carry the columns the issue asks for. Tiny shapes and steps; timings are printed, never asserted."""
import json
from pathlib import Path

import pytest

from drifting_nb import bench

ROOT = bench.package_root()
REPO = bench.git_repo(ROOT)
needs_git = pytest.mark.skipif(REPO is None, reason="not a git checkout of drifting_nb: no 'before' version")

# a stand-in for the release's loss file with the same calling convention (per-problem losses first), written by
# the test: the repository never holds the authors' code
FAKE_RELEASE = """import torch
def drift_loss(gen, pos, neg=None, w_gen=None, w_pos=None, w_neg=None):
    per_problem = (gen - pos.mean(1, keepdim=True)).pow(2).mean((-1, -2))
    return per_problem, {}
"""


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    if REPO is None: pytest.skip("not a git checkout of drifting_nb")
    dest = tmp_path_factory.mktemp("before")
    commit = bench.export_ref(REPO, "HEAD", dest)
    return dest, commit


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("release") / "torch"
    d.mkdir()
    (d / "drift_loss.py").write_text(FAKE_RELEASE)
    return d.parent                                   # a "checkout": its loss is torch/drift_loss.py


@needs_git
def test_before_is_the_committed_package_and_the_child_imports_it(before):
    dest, commit = before
    assert (dest / "drifting_nb" / "drift.py").is_file() and commit
    imported = Path(bench.in_version(dest, "_package_file")).resolve()
    assert imported.is_relative_to(dest.resolve())
    assert Path(bench.in_version(ROOT, "_package_file")).resolve().is_relative_to(ROOT)


@needs_git
def test_an_unknown_baseline_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="no-such-ref"): bench.export_ref(REPO, "no-such-ref", tmp_path)


def test_release_loader_accepts_a_checkout_its_folder_or_the_file(release):
    for where in (release, release / "torch", release / "torch" / "drift_loss.py"):
        assert bench.find_release_loss(where) == release / "torch" / "drift_loss.py"


def test_release_loader_names_the_wrong_path_and_how_to_get_the_code(tmp_path):
    with pytest.raises(FileNotFoundError, match="git clone https://github.com/lambertae/drifting") as e:
        bench.load_release_loss(tmp_path / "nowhere")
    assert "nowhere" in str(e.value)
    (tmp_path / "drift_loss.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no drift_loss"): bench.load_release_loss(tmp_path)


def test_loss_table_has_before_after_release_and_floor(before, release):
    rows = bench.loss_table(((8, 32),), {"before": before[0], "after": ROOT}, release=release, repeat=1, threads=1)
    (row,) = rows
    for k in ("before_ms", "after_ms", "release_ms", "floor_ms", "release/after", "after/floor", "before/after",
              "before_peak_mib", "after_peak_mib", "release_peak_mib"):
        assert row[k] is not None and row[k] >= 0, k


def test_loss_table_without_release_leaves_its_columns_empty():
    (row,) = bench.loss_table(((8, 32),), repeat=1, threads=1)
    assert row["release/after"] is None and row["before/after"] is None and row["after_ms"] > 0


def test_step_table_runs_the_committed_training(before):
    tiny = dict(bench.DIGITS_STEP, Nc=2, Npos=4, Nneg=4, Nunc=2, queue_per_class=8, queue_global=16, queue_push=8)
    mae = dict(bench.DIGITS_MAE, width=8, blocks=(1, 1, 1, 1))
    (row,) = bench.step_table({"before": (before[0], tiny, mae)}, steps=2, warmup=1, threads=1)
    assert row["n_steps"] == 2 and row["batch"] == 8 and row["ms"] > 0 and row["speedup"] == 1.0


def test_matmul_rate_alone_and_as_json(tmp_path, capsys):
    res = bench.main(["--only", "matmul", "--json", str(tmp_path / "b.json")])
    assert res["gflops"] > 0 and "GFLOP/s" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["gflops"] == res["gflops"]


def test_a_wrong_release_path_stops_the_command_before_measuring(tmp_path, capsys):
    with pytest.raises(SystemExit): bench.main(["--release", str(tmp_path / "nowhere")])
    err = capsys.readouterr()
    assert "git clone" in err.err and "GFLOP/s" not in err.out
