"The README is rendered from nbs/index.ipynb, and .ci/run runs exactly its test command."
from pathlib import Path
from drifting_nb.readme import readme_markdown

ROOT = Path(__file__).resolve().parent.parent

def _commands(text):
    "Shell lines inside ```sh/bash fences."
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```sh", "```bash", "```shell") if not inside else False
            continue
        if inside and line.strip(): out.append(line.strip())
    return out

def test_readme_is_current():
    rendered = readme_markdown(ROOT / "nbs" / "index.ipynb")
    assert (ROOT / "README.md").read_text() == rendered, \
        "README.md is stale: run `python -m drifting_nb.readme` after editing nbs/index.ipynb"

def test_ci_runs_the_readme_test_command():
    cmds = _commands((ROOT / "README.md").read_text())
    test_cmds = [c for c in cmds if "pytest" in c]
    assert len(test_cmds) == 1, f"expected one test command in the README, found {test_cmds}"
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert ci_lines[-1] == test_cmds[0], f".ci/run ends with {ci_lines[-1]!r}, README says {test_cmds[0]!r}"

def test_readme_gives_the_main_job():
    cmds = _commands((ROOT / "README.md").read_text())
    assert any(c.endswith("accelerate launch -m drifting_nb.train") for c in cmds), cmds
