"""The course as saved: every notebook but the index (the README's) holds the outputs of a real run, figure cells their
pictures (still PNGs, no plotly.js), printing cells their text, with no error, no progress bar or warning (stderr) and
nothing heavy; notebooks are clean as nbdev's hooks leave them, JupyterLab's save hook cleans what JupyterLab adds, and
the index's images resolve both from nbs/ (JupyterLab) and from the repository root (README.md).
`OMP_NUM_THREADS=1 python tools/nbfigures.py [nbs/NAME.ipynb ...]` rewrites the outputs."""
import copy, json, re
from pathlib import Path

import pytest
from nbdev.clean import clean_jupyter, clean_nb

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
NOTEBOOKS = sorted(p.name for p in NBS.glob("*.ipynb") if p.name != "index.ipynb")   # the index renders the README
# a cell draws when a top-level statement makes a matplotlib figure or calls a drawing helper (show_ablation, plot_*),
# or it ends by displaying a figure, panel or explorer (a cell that only defines a drawing function draws nothing)
DRAWS = re.compile(r"^(?!def |class )(.*plt\.(show|subplots?|figure)\(|show_ablation\(|plot_\w+\(|(fig|anim|p|ex)\s*\Z)", re.M)
PRINTS = re.compile(r"^print\(", re.M)                   # a top-level print: its text is what the prose refers to
EXPORT = re.compile(r"^#\s*\|\s*export", re.M)              # exported code prints nothing when the notebook runs


def _top_level(source: str) -> str:
    return "\n".join(l for l in source.strip().splitlines() if l and not l[0].isspace())


def _nb(name): return json.loads((NBS / name).read_text())


def _code(name): return [c for c in _nb(name)["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_with_the_outputs_of_a_run(name):
    "Figure cells keep their pictures and printing cells their text: the course reads without running anything."
    cells = _code(name)
    assert any(c.get("outputs") for c in cells), \
        f"{name} is saved without any output: run `OMP_NUM_THREADS=1 python tools/nbfigures.py nbs/{name}`"
    drawing = [c for c in cells if DRAWS.search(_top_level("".join(c["source"])))]
    bare = [c["id"] for c in drawing if not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not bare, f"{name}: figure cells {bare} have no saved picture: run `python tools/nbfigures.py nbs/{name}`"
    printing = [c for c in cells if PRINTS.search(_top_level("".join(c["source"]))) and not EXPORT.search("".join(c["source"]))]
    mute = [c["id"] for c in printing if not any(o.get("name") == "stdout" for o in c.get("outputs", []))]
    assert not mute, f"{name}: cells {mute} print but were saved without their text: run `python tools/nbfigures.py nbs/{name}`"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_outputs_are_light(name):
    "No error, no progress bar or warning (stderr), no plotly.js or widget state, no output over 1 MB."
    for c in _code(name):
        for o in c.get("outputs", []):
            data = o.get("data", {})
            assert o.get("output_type") != "error", f"{name} {c['id']} was saved with an error: {o.get('ename')}"
            assert o.get("name") != "stderr", f"{name} {c['id']} was saved with stderr (a progress bar or warning)"
            assert not any("plotly" in k or "widget-view" in k for k in data), f"{name} {c['id']}: {list(data)}"
            assert len(json.dumps(o)) < 1_000_000, f"{name} {c['id']}: an output of {len(json.dumps(o)) / 1e6:.1f} MB"
    assert (NBS / name).stat().st_size < 4_000_000


@pytest.mark.parametrize("path", sorted(NBS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_saved_clean(path):
    nb = json.loads(path.read_text())
    cleaned = copy.deepcopy(nb)
    clean_nb(cleaned)
    assert cleaned == nb, f"{path.name} is not clean: run nbdev_clean"


def test_saving_in_jupyterlab_keeps_the_notebook_clean():
    "What JupyterLab adds on save (kernel display name, language_info, execution counts, cell metadata) the hook removes."
    assert re.search(r"^jupyter_hooks\s*=\s*True", (ROOT / "settings.ini").read_text(), re.M)
    path = NBS / "02_interactive.ipynb"
    saved = _nb(path.name)
    model = {"type": "notebook", "content": copy.deepcopy(saved)}
    nb = model["content"]
    nb["metadata"]["kernelspec"]["display_name"] = "Python 3 (ipykernel)"
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
    for i, c in enumerate(nb["cells"]):
        c["metadata"]["execution"] = {"iopub.status.busy": "2026-11-30T10:00:00Z"}
        if c["cell_type"] == "code": c["execution_count"] = i
    clean_jupyter(path=path, model=model)
    assert nb == saved


def test_index_images_resolve_in_jupyterlab_and_readme():
    index = "".join("".join(c["source"]) for c in _nb("index.ipynb")["cells"] if c["cell_type"] == "markdown")
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", index)
    assert images, "the index shows no image"
    for src in images: assert (NBS / src).is_file(), f"index.ipynb: {src} does not exist relative to nbs/"
    readme = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    assert len(readme) == len(images)
    for src in readme: assert (ROOT / src).is_file(), f"README.md: {src} does not exist relative to the root"


def test_the_readme_snippet_runs_as_pasted():
    "The field in three lines imports what it uses (pasted into a fresh interpreter)."
    nb = _nb("index.ipynb")
    snippet = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and "compute_V(x" in "".join(c["source"]))
    exec(compile(snippet, "readme-snippet", "exec"), {})
