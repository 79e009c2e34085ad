"""Re-execute the course notebooks whose saved copies keep their figures, and save them with their outputs.

    python tools/nbfigures.py                       # nbs/00_drift, 01_toy, 02_interactive
    python tools/nbfigures.py nbs/01_toy.ipynb      # just these

Each notebook runs top to bottom in one IPython shell (execnb, as `nbdev_test` runs it; `#| eval: false` cells are
skipped, and cells flagged with settings.ini's tst_flags unless --slow), with this checkout's package first on the
path. What is saved: matplotlib figures as PNG; plotly figures as still PNGs drawn by matplotlib
(`drifting_nb.widgets.static_plotly`), never plotly.js or the frames; widgets as the still image their object
provides (a widget view cannot be shown without its kernel, so it is dropped); no progress bars (stderr). Then
`nbdev_clean` strips execution counts and metadata, keeping the outputs (settings.ini: clear_all = False)."""
from __future__ import annotations
import argparse, json, os, re, sys, time
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURE_NOTEBOOKS = ("00_drift.ipynb", "01_toy.ipynb", "02_interactive.ipynb")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*\|[ \t]*([\w-]+):?[ \t]*(.*)$", re.M)


def _directives(source: str) -> dict:
    return {m.group(1): m.group(2).strip() for m in DIRECTIVE.finditer(source)}


def _skip(cell, flags: set) -> bool:
    if cell.cell_type != "code" or "nbdev_export(" in cell.source: return True
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


def run_notebook(path: Path, slow: bool = False) -> float:
    "Execute the notebook at `path` in place, save it with its trimmed outputs, clean it; returns the seconds taken."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.clean import nbdev_clean
    cfg = ConfigParser(); cfg.read(ROOT / "settings.ini")
    flags = set() if slow else set(cfg["DEFAULT"].get("tst_flags", "").split())
    t0 = time.perf_counter()
    nb = read_nb(path)
    shell = CaptureShell(path, mpl_format="png")
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        shell.run_cell("from drifting_nb.widgets import static_plotly; static_plotly()")
        for cell in nb.cells:
            if cell.cell_type == "code": cell.outputs = []
            if _skip(cell, flags): continue
            shell.cell(cell)
            cell.outputs = [o for o in cell.outputs if keep_output(o)]
            if shell.exc: raise RuntimeError(f"{path.name}: a cell failed:\n{cell.source}\n{shell.exc!r}") from shell.exc
    finally:
        os.chdir(cwd)
    write_nb(nb, path)
    nbdev_clean(fname=str(path))
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help=f"notebooks to run (default: {', '.join(FIGURE_NOTEBOOKS)} in nbs/)")
    ap.add_argument("--slow", action="store_true", help="also run cells flagged with tst_flags (e.g. #| slow)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))                                   # this checkout's package, not an installed one
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    paths = [Path(p).resolve() for p in args.notebooks] or [ROOT / "nbs" / n for n in FIGURE_NOTEBOOKS]
    for p in paths:
        dt = run_notebook(p, args.slow)
        n_img = sum("image/png" in o.get("data", {}) for c in json.loads(p.read_text())["cells"]
                    for o in c.get("outputs", []))
        print(f"{p.relative_to(ROOT)}: {dt:.0f} s, {n_img} images, {p.stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
