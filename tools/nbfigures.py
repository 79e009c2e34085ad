"""Re-execute the course notebooks as Run All does, and save them with their outputs.

    OMP_NUM_THREADS=1 python tools/nbfigures.py                    # every notebook in nbs/ but index.ipynb (README's)
    OMP_NUM_THREADS=1 python tools/nbfigures.py nbs/01_toy.ipynb   # just these
    python tools/nbfigures.py --as-nbdev-test nbs/05_generator.ipynb   # skip what nbdev_test skips

Each notebook runs top to bottom in one IPython shell (execnb, as `nbdev_test` runs it), EVERY code cell, as Run All
in JupyterLab runs them: `#| slow` and `#| eval: false` are comments there, and each notebook's long jobs sit behind
its `FULL_RUN`-style switch, off by default (`--as-nbdev-test` skips `#| eval: false` cells and those flagged with
settings.ini's tst_flags instead). This checkout's package comes first on the path. What is saved: matplotlib figures
as PNG; plotly figures as still PNGs drawn by matplotlib (`drifting_nb.widgets.static_plotly`), never plotly.js or the
frames; widgets as the still image their object provides (a widget view cannot be shown without its kernel, so it is
dropped); no progress bars or warnings (stderr). A notebook whose cell fails is not written. Then `nbdev_clean` strips
execution counts and metadata, keeping the outputs (settings.ini: clear_all = False). One line per notebook: seconds,
images, size; the run stops at the first notebook that fails unless --keep-going. A notebook is read when its run
starts and written when it ends: an edit made to it in between is lost."""
from __future__ import annotations
import argparse, json, os, re, subprocess, sys, time
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_SAVED = ("index.ipynb",)      # the README is rendered from it: its outputs would land in README.md
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*\|[ \t]*([\w-]+):?[ \t]*(.*)$", re.M)


def _directives(source: str) -> dict:
    return {m.group(1): m.group(2).strip() for m in DIRECTIVE.finditer(source)}


def _skip(cell, flags: set, as_nbdev_test: bool = False) -> bool:
    if cell.cell_type != "code" or "nbdev_export(" in cell.source: return True
    if not as_nbdev_test: return False                             # Run All: every code cell
    d = _directives(cell.source)
    return d.get("eval", "").lower() == "false" or bool(flags & set(d))


def keep_output(out) -> bool:
    "Trim one output to what a saved notebook should hold; False when nothing worth keeping is left."
    if out.get("output_type") == "stream": return out.get("name") != "stderr"
    data = out.get("data")
    if data is None: return True                                   # errors are kept: a failing cell is worth seeing
    if WIDGET_VIEW in data:
        del data[WIDGET_VIEW]
        if set(data) <= {"text/plain"}: return False               # the widget's repr alone says nothing
    return bool(data)


def run_notebook(path: Path, as_nbdev_test: bool = False) -> float:
    """Execute every code cell of the notebook at `path` (with `as_nbdev_test`, only those nbdev_test runs) in place,
    save it with its trimmed outputs, clean it; returns the seconds taken."""
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.clean import nbdev_clean
    cfg = ConfigParser(); cfg.read(ROOT / "settings.ini")
    flags = set(cfg["DEFAULT"].get("tst_flags", "").split()) if as_nbdev_test else set()
    t0 = time.perf_counter()
    dropped = []                                                    # the first line of each stderr output not saved
    nb = read_nb(path)
    shell = CaptureShell(path, mpl_format="png")
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        shell.run_cell("from drifting_nb.widgets import static_plotly; static_plotly()")
        for cell in nb.cells:
            if cell.cell_type == "code": cell.outputs = []
            if _skip(cell, flags, as_nbdev_test): continue
            shell.cell(cell)
            for o in cell.outputs:                                 # what JupyterLab would show in a pink box
                if o.get("output_type") == "stream" and o.get("name") == "stderr":
                    text = "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                    line = next((l.strip() for l in text.replace("\r", "\n").splitlines() if l.strip()), "")
                    if line and line[:60] not in {s[:60] for s in dropped}: dropped.append(line[:160])
            cell.outputs = [o for o in cell.outputs if keep_output(o)]
            if shell.exc: raise RuntimeError(f"{path.name}: a cell failed:\n{cell.source}\n{shell.exc!r}") from shell.exc
    finally:
        os.chdir(cwd)
    write_nb(nb, path)
    nbdev_clean(fname=str(path))
    for line in dropped: print(f"  {path.name}: stderr not saved: {line}", flush=True)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebook in nbs/ but index.ipynb)")
    ap.add_argument("--as-nbdev-test", action="store_true",
                    help="skip the cells nbdev_test skips (#| eval: false, settings.ini's tst_flags such as #| slow)")
    ap.add_argument("--skip", nargs="*", default=[], help="notebook names to leave as they are")
    ap.add_argument("--keep-going", action="store_true", help="go on to the next notebook after one fails")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))                                   # this checkout's package, not an installed one
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # on a shared machine, busy-waiting threads slow a run 4x
    paths = [Path(p).resolve() for p in args.notebooks] or \
        [p for p in sorted((ROOT / "nbs").glob("*.ipynb")) if p.name not in NOT_SAVED]
    paths = [p for p in paths if p.name not in args.skip]
    failed = []
    if len(paths) > 1:                                              # one fresh process per notebook, as a fresh kernel
        for p in paths:
            if subprocess.run([sys.executable, __file__, str(p)] + ["--as-nbdev-test"] * args.as_nbdev_test).returncode:
                failed.append(p.name)
                if not args.keep_going: sys.exit(f"{p.name} failed: the notebooks after it were not run")
        if failed: sys.exit(f"failed: {', '.join(failed)}")
        return
    for p in paths:
        try: dt = run_notebook(p, args.as_nbdev_test)
        except Exception as e:
            if not args.keep_going: raise
            failed.append(p.name); print(f"{p.relative_to(ROOT)}: FAILED, left as it was: {str(e)[-500:]}", flush=True)
            continue
        n_img = sum("image/png" in o.get("data", {}) for c in json.loads(p.read_text())["cells"]
                    for o in c.get("outputs", []))
        print(f"{p.relative_to(ROOT)}: {dt:.0f} s, {n_img} images, {p.stat().st_size / 1e6:.2f} MB", flush=True)
    if failed: sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
