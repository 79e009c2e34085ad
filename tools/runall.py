"""Time Run All of course notebooks as JupyterLab does it: a fresh kernel runs EVERY code cell in order.

    OMP_NUM_THREADS=1 python tools/runall.py                       # every notebook in nbs/
    OMP_NUM_THREADS=1 python tools/runall.py nbs/04_mae.ipynb --limit 180

`#| slow`, `#| eval: false` and `#| hide` are comments to JupyterLab, so nothing is skipped here (unlike nbdev_test and
tools/nbfigures.py's default). The notebook file is only read, never written. For each notebook: the seconds Run All
took, the first error (cell number, id, exception), or that it was stopped at --limit, and the slowest cells.
A table is printed at the end; --json writes the same rows to a file. Exit status 1 when any notebook failed or ran
past the limit."""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_BY_DEFAULT = ()                                                # every notebook runs unless named with --skip


def run_all(path: Path, limit: float = 180.0, kernel: str = "python3") -> dict:
    """Run every code cell of the notebook at `path` in a fresh kernel, in order, stopping at the first error or once
    `limit` seconds have passed. Returns {notebook, seconds, status ('ok' | 'error' | 'limit'), cell, error, slowest,
    stderr (the first line of each distinct stderr output: what JupyterLab shows in a pink box)}."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=int(limit) + 5, kernel_name=kernel, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    row = dict(notebook=path.name, seconds=0.0, status="ok", cell=None, error=None, slowest=[], stderr=[])
    times = []
    t0 = time.perf_counter()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code": continue
            if time.perf_counter() - t0 > limit:
                row.update(status="limit", cell=i, error=f"still running after {limit:.0f} s"); break
            c0 = time.perf_counter()
            try:
                client.execute_cell(cell, i)
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
                err = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), None)
                msg = f"{err['ename']}: {err['evalue']}" if err else f"{type(e).__name__}: {str(e)[-300:]}"
                status = "limit" if isinstance(e, CellTimeoutError) else "error"
                row.update(status=status, cell=i, error=f"cell {i} ({cell.get('id')}): {msg}")
                times.append((time.perf_counter() - c0, i, cell.get("id")))
                break
            times.append((time.perf_counter() - c0, i, cell.get("id")))
            for o in cell.get("outputs", []):                           # what a reader sees in pink: stderr text
                if o.get("output_type") == "stream" and o.get("name") == "stderr":
                    line = next((l.strip() for l in o["text"].replace("\r", "\n").splitlines() if l.strip()), "")
                    if line and line[:80] not in {s[:80] for s in row["stderr"]}: row["stderr"].append(f"cell {i}: {line[:160]}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["slowest"] = [f"cell {i} ({cid}) {dt:.1f}s" for dt, i, cid in sorted(times, reverse=True)[:3]]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebook in nbs/)")
    ap.add_argument("--limit", type=float, default=180.0, help="stop a notebook after this many seconds (default 180)")
    ap.add_argument("--skip", nargs="*", default=list(SKIP_BY_DEFAULT), help="notebook names to leave out")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # on a shared machine, busy-waiting threads slow a run 4x
    paths = [Path(p).resolve() for p in args.notebooks] or sorted((ROOT / "nbs").glob("*.ipynb"))
    paths = [p for p in paths if p.name not in set(args.skip)]
    rows = []
    for p in paths:
        load = os.getloadavg()[0]
        row = run_all(p, args.limit)
        row["load"] = round(load, 2)
        rows.append(row)
        print(f"{row['notebook']:24s} {row['seconds']:7.1f} s  {row['status']:5s}  load {load:.1f}  "
              f"{row['error'] or ''}\n{'':26s}slowest: {', '.join(row['slowest'])}", flush=True)
        for line in row["stderr"][:8]: print(f"{'':26s}stderr {line}")
        if args.json: args.json.write_text(json.dumps(rows, indent=1))
    print("\n| notebook | Run All (s) | result |\n|---|---:|---|")
    for r in rows: print(f"| {r['notebook']} | {r['seconds']:.0f} | {r['status']}{': ' + r['error'] if r['error'] else ''} |")
    sys.exit(int(any(r["status"] != "ok" for r in rows)))


if __name__ == "__main__":
    main()
