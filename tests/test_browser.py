"""The course in a real browser: JupyterLab on 127.0.0.1 (a token, a free port), driven by Playwright with the
system Chromium. It opens 02_interactive, runs the panel's and the explorer's cells, presses Train and Play, checks
that frames appear (and measures how many a second) with no traceback, clicks a point onto the explorer's canvas,
saves the notebook and checks that the save hook kept it clean; and it plays the exported HTML animation offline.
Skipped, with the reason, where Playwright or Chromium is missing. Screenshots go to $DRIFTING_SCREENSHOTS (if set)."""
import copy, json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="Playwright for Python is not installed (pip install playwright)"),
    pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (apt-get install chromium; .ci/run installs it)"),
]
NOTEBOOK = "02_interactive.ipynb"
PANEL_CELLS = ["0dd8933e", "d1319143", "9ed98ad1", "b7e1a003", "b7e1a005", "211d35aa", "63048661"]   # imports .. panel
EXPLORER_CELLS = ["c8f20002", "c8f20003"]
SHOTS = Path(os.environ["DRIFTING_SCREENSHOTS"]) if os.environ.get("DRIFTING_SCREENSHOTS") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A JupyterLab server on loopback over a copy of the notebook (and settings.ini, so nbdev's save hook applies)."
    root = tmp_path_factory.mktemp("lab")
    (root / "nbs").mkdir()
    news = root / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')       # no news pop-up over the panel
    shutil.copy(ROOT / "settings.ini", root)
    shutil.copy(ROOT / "nbs" / NOTEBOOK, root / "nbs")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "JUPYTER_CONFIG_DIR": str(root / ".cfg"), "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".ws"), "IPYTHONDIR": str(root / ".ipython"),
           "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ContentsManager.pre_save_hook=nbdev.clean.clean_jupyter",      # what nbdev_install_hooks configures
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if server.poll() is not None: break
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError: time.sleep(0.5)
        else: pytest.fail("JupyterLab did not answer in 120 s:\n" + (root / "lab.log").read_text()[-3000:])
        if server.poll() is not None: pytest.fail("JupyterLab exited:\n" + (root / "lab.log").read_text()[-3000:])
        yield url, token, root
    finally:
        os.killpg(server.pid, signal.SIGTERM)              # the server and the kernels it started, by the server's id
        try: server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL); server.wait(5)
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try: yield b
        finally: b.close()


def _run_cells(page, ids, cell_ids, timeout=300_000):
    "Run the notebook's cells with these ids, one by one, waiting for each to finish."
    cells = page.locator(".jp-Notebook .jp-Cell")
    for cid in ids:
        cell = cells.nth(cell_ids.index(cid))
        prompt = cell.locator(".jp-InputPrompt").first
        for attempt in range(4):                        # a key press can be lost while the kernel connects: press again
            cell.scroll_into_view_if_needed()
            prompt.click()
            page.keyboard.press("Escape")
            page.keyboard.press("Control+Enter")
            try:
                page.wait_for_function("el => /\\[[\\d*]+\\]/.test(el.textContent)", arg=prompt.element_handle(), timeout=15_000)
                break
            except Exception:
                if attempt == 3: raise
        page.wait_for_function("el => /\\[\\d+\\]/.test(el.textContent)", arg=prompt.element_handle(), timeout=timeout)


def _tracebacks(page) -> list[str]:
    return [t for t in page.locator(".jp-OutputArea-output").all_inner_texts()
            if "Traceback" in t or re.search(r"\w+Error\b", t)]


def _shot(page, name):
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / name))


def test_panel_trains_and_plays_in_jupyterlab(lab, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try: _panel_and_explorer(page, *lab)
    except Exception:
        _shot(page, "failure.png")
        raise
    finally: page.close()


def _panel_and_explorer(page, url, token, root):
    original = json.loads((root / "nbs" / NOTEBOOK).read_text())
    cell_ids = [c["id"] for c in original["cells"]]
    page.goto(f"{url}/lab/tree/nbs/{NOTEBOOK}?token={token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
    _run_cells(page, PANEL_CELLS, cell_ids)
    panel = page.locator(".jp-Cell").nth(cell_ids.index(PANEL_CELLS[-1])).locator(".jp-OutputArea-output")
    panel.get_by_role("button", name="Train").click()
    page.wait_for_function("el => /frames/.test(el.textContent)", arg=panel.locator(".widget-html").first.element_handle(),
                           timeout=300_000)                                   # trained, and every frame drawn
    image = panel.locator("img.widget-image").first
    page.wait_for_function("img => img && img.naturalWidth > 0 && img.src.startsWith('blob:')",
                           arg=image.element_handle(timeout=30_000), timeout=30_000)
    panel.scroll_into_view_if_needed()
    # Play: count how often the picture changes
    image.evaluate("""img => { window._flips = [];          // the time of every new frame: an img put in the Stack
        new MutationObserver(ms => ms.forEach(m => m.addedNodes.forEach(n => {
            if (n.querySelector && (n.matches('img') || n.querySelector('img'))) window._flips.push(performance.now()); })))
        .observe(img.closest('.widget-stack') || img.parentElement, {childList: true, subtree: true}); }""")
    panel.locator(".widget-play button").first.click()
    page.wait_for_timeout(1500)
    _shot(page, "panel_1400.png")
    deadline = time.time() + 20
    while time.time() < deadline:
        flips = page.evaluate("window._flips")
        if len(flips) > 5 and page.evaluate("performance.now()") - flips[-1] > 1000: break
        page.wait_for_timeout(250)
    flips = page.evaluate("window._flips")
    assert len(flips) >= 10, f"Play showed {len(flips)} frames"
    fps = (len(flips) - 1) / ((flips[-1] - flips[0]) / 1000)
    print(f"\nPlay: {len(flips)} frames shown at {fps:.1f} frames/s")
    assert not _tracebacks(page), _tracebacks(page)
    page.set_viewport_size({"width": 1100, "height": 1000})
    page.wait_for_timeout(500)
    panel.scroll_into_view_if_needed()
    _shot(page, "panel_1100.png")
    box, controls = image.bounding_box(), panel.locator(".widget-dropdown select").first.bounding_box()
    assert box["width"] > 300 and controls["width"] > 150            # neither the figure nor the controls crushed

    # the explorer: a click on the empty canvas adds a data point
    page.set_viewport_size({"width": 1400, "height": 1000})
    _run_cells(page, EXPLORER_CELLS, cell_ids)
    ex = page.locator(".jp-Cell").nth(cell_ids.index(EXPLORER_CELLS[-1])).locator(".jp-OutputArea-output")
    status = ex.locator(".widget-html").last
    page.wait_for_function("el => /data,/.test(el.textContent)", arg=status.element_handle(timeout=60_000))
    ex.scroll_into_view_if_needed()
    drag = ex.locator(".js-plotly-plot .nsewdrag").first.bounding_box()
    before = status.inner_text()
    x, y = drag["x"] + drag["width"] * 0.52, drag["y"] + drag["height"] * 0.2
    page.mouse.move(x - 3, y - 3); page.mouse.move(x, y)
    t0 = time.perf_counter()
    page.mouse.click(x, y)
    page.wait_for_function("([el, old]) => el.textContent !== old", arg=[status.element_handle(), before], timeout=20_000)
    print(f"explorer: a click to its new status in {1000 * (time.perf_counter() - t0):.0f} ms; {status.inner_text()}")
    n0, n1 = (int(re.search(r"(\d+) data", s).group(1)) for s in (before, status.inner_text()))
    assert n1 == n0 + 1
    _shot(page, "explorer_1400.png")
    page.set_viewport_size({"width": 1100, "height": 1000})
    page.wait_for_timeout(500)
    ex.scroll_into_view_if_needed()
    _shot(page, "explorer_1100.png")
    assert not _tracebacks(page), _tracebacks(page)

    # save: nbdev's pre-save hook leaves no metadata behind
    page.locator(".jp-Notebook").first.click()
    page.keyboard.press("Control+s")
    page.wait_for_function(f"() => !document.querySelector('.jp-mod-dirty')", timeout=20_000)
    time.sleep(1)
    saved = json.loads((root / "nbs" / NOTEBOOK).read_text())
    assert saved["metadata"] == original["metadata"]
    assert all(c.get("execution_count") is None and c["metadata"] == {} for c in saved["cells"])
    assert [c["source"] for c in saved["cells"]] == [c["source"] for c in original["cells"]]


def test_exported_animation_plays_offline(browser, tmp_path):
    import torch
    from drifting_nb.toy import save_animation_html, train_toy
    torch.set_num_threads(1)
    _, h = train_toy("ring", 30, n_pos=64, n_neg=64, hidden=32, snapshot_every=5, n_snapshot=200, grid=8)
    path = save_animation_html(h, tmp_path / "anim.html")
    context = browser.new_context(viewport={"width": 1000, "height": 600}, offline=True)
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("#toy-animation .main-svg")
    shows = """([k, gd]) => { const f = gd._transitionData._frames[k].data[0].x; return gd.data[1].x[0] === f[0]; }"""
    gd = page.locator("#toy-animation").element_handle()
    assert page.evaluate(shows, [0, gd])                                   # the first frame's samples
    page.locator(".updatemenu-button").first.click()                      # Play
    page.wait_for_function(shows, arg=[len(h.snapshots) - 1, gd], timeout=30_000)   # ... through to the last
    assert [u for u in requests if not u.startswith("file:")] == [] and errors == []
    context.close()
