"""The course in a real browser: JupyterLab on 127.0.0.1 (a token, a free port), driven by Playwright with the
system Chromium. It opens 02_interactive, runs the panel's and the explorer's cells, presses Train and Play, checks
that frames appear (and measures how many a second) with no traceback and that the controls and the picture fit in
one view at 1100 px; on the explorer's canvas it clicks a point in, drags a point, steps tau, changes the
normalisation and erases a point, timing each from the input event to the canvas's new picture (printed; asserted
under 300 ms), checks the arrows against compute_V and that a drag on empty canvas changes nothing (no selection, no
fading); it saves the notebook and checks that the save hook kept it clean; and it plays the exported HTML animation
offline. It opens 07_train as a reader does, runs all of it (Run > Run All Cells) within a time limit and with no
error, and on the drift player checks the picture, scrubs its slider and measures the frames a second Play shows
(printed, with Run All's seconds, its slowest cells and the load average). Skipped, with the reason, where Playwright
or Chromium is missing. Screenshots go to $DRIFTING_SCREENSHOTS (if set)."""
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
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
TRAIN_NOTEBOOK = "07_train.ipynb"
TRAIN_RUN = Path("images") / "digits_run"        # the saved digits run 07 draws from (relative to nbs/)
RUN_ALL_LIMIT_S = 420           # Run All of 07 is about 3 min on an idle 2-core CPU; room for a loaded CI machine
PANEL_CELLS = ["0dd8933e", "d1319143", "9ed98ad1", "b7e1a003", "b7e1a005", "b7e1a007", "211d35aa", "63048661"]   # imports .. panel
EXPLORER_CELLS = ["c8f20002", "c8f20003"]
SHOWN_PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"       # the notebook in view (not one left open in another tab)
SHOWN = f"{SHOWN_PANEL} .jp-Notebook"
SHOTS = Path(os.environ["DRIFTING_SCREENSHOTS"]) if os.environ.get("DRIFTING_SCREENSHOTS") else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on loopback over copies of the notebooks (02, and 07 with the saved run it draws from) and
    settings.ini, so nbdev's save hook applies."""
    root = tmp_path_factory.mktemp("lab")
    (root / "nbs").mkdir()
    news = root / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false", "checkForUpdates": false}')       # no news pop-up over the panel
    shutil.copy(ROOT / "settings.ini", root)
    for name in (NOTEBOOK, TRAIN_NOTEBOOK): shutil.copy(ROOT / "nbs" / name, root / "nbs")
    shutil.copytree(ROOT / "nbs" / TRAIN_RUN, root / "nbs" / TRAIN_RUN)
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
    cells = page.locator(f"{SHOWN} .jp-Cell")
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


def _open_notebook(page, url, token, name):
    "Open nbs/<name> in JupyterLab and wait until its kernel is idle (choosing the kernel if JupyterLab asks)."
    page.goto(f"{url}/lab/tree/nbs/{name}?reset&token={token}")    # reset: not the tabs an earlier test left open
    page.wait_for_selector(f"{SHOWN} .jp-Cell", timeout=90_000)
    choose = page.locator(".jp-Dialog").get_by_role("button", name="Select", exact=True)
    def kernel_idle():                                # the server's word: this notebook's session has an idle kernel
        with urllib.request.urlopen(f"{url}/api/sessions?token={token}", timeout=5) as r:
            return any(x["path"].endswith(name) and x["kernel"]["execution_state"] == "idle" for x in json.load(r))
    for _ in range(240):          # on a loaded machine JupyterLab may ask for the kernel late (once it knows the kernelspecs)
        if choose.count(): choose.first.click()       # the indicator can read idle before a kernel is chosen
        elif kernel_idle() and page.locator(f"{SHOWN_PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']").count(): break
        page.wait_for_timeout(500)
    else: pytest.fail(f"the kernel of {name} did not start in 120 s")


def _tracebacks(page) -> list[str]:
    return [t for t in page.locator(".jp-OutputArea-output").all_inner_texts()
            if "Traceback" in t or re.search(r"\w+Error\b", t)]


def _shot(page, name):
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / name))


def _in_a_page(browser, lab, body, failure_shot: str):
    "Run body(page, url, token, root) in a fresh page; a screenshot named `failure_shot` when it fails."
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try: body(page, *lab)
    except Exception:
        _shot(page, failure_shot)
        raise
    finally: page.close()


def test_panel_trains_and_plays_in_jupyterlab(lab, browser):
    _in_a_page(browser, lab, _panel_and_explorer, "failure.png")


def _panel_and_explorer(page, url, token, root):
    original = json.loads((root / "nbs" / NOTEBOOK).read_text())
    cell_ids = [c["id"] for c in original["cells"]]
    _open_notebook(page, url, token, NOTEBOOK)
    _run_cells(page, PANEL_CELLS, cell_ids)
    assert not _tracebacks(page), _tracebacks(page)
    panel = page.locator(".jp-Cell").nth(cell_ids.index(PANEL_CELLS[-1])).locator(".jp-OutputArea-output")
    steps = panel.locator(".widget-hslider").filter(has_text="steps").locator(".widget-readout")
    steps.click(); page.keyboard.press("Control+a"); page.keyboard.type("100"); page.keyboard.press("Enter")
    page.wait_for_function("el => el.textContent.trim() === '100'", arg=steps.element_handle())   # a short run
    panel.get_by_role("button", name="Train").click()
    page.wait_for_function("el => /frames/.test(el.textContent)", arg=panel.locator(".dn-status").first.element_handle(),
                           timeout=300_000)                                   # trained, and every frame drawn
    image = panel.locator("img.dn-frame")
    page.wait_for_function("img => img && img.naturalWidth > 0 && img.src.startsWith('blob:')",
                           arg=image.element_handle(timeout=30_000), timeout=30_000)
    panel.scroll_into_view_if_needed()
    # Play: count how often the picture changes
    frame, label = panel.locator("img.dn-frame"), panel.locator(".dn-label")
    frame.evaluate("""(img, label) => { window._flips = [];     // when the picture changes, and to which step
        new MutationObserver(() => window._flips.push([performance.now(), label.textContent]))
        .observe(img, {attributes: true, attributeFilter: ["src"]}); }""", label.element_handle())
    panel.locator("button.dn-play").click()
    page.wait_for_timeout(1500)
    _shot(page, "panel_1400.png")
    deadline = time.time() + 30
    while time.time() < deadline:                        # until Play has stopped at the last frame for a second
        flips = page.evaluate("window._flips")
        if len(flips) > 5 and page.evaluate("performance.now()") - flips[-1][0] > 1000: break
        page.wait_for_timeout(250)
    shown = {step for _, step in flips}
    assert len(shown) >= 10, f"Play showed {len(shown)} frames"
    fps = (len(shown) - 1) / ((flips[-1][0] - flips[0][0]) / 1000)
    print(f"\nPlay: {len(shown)} distinct frames in {(flips[-1][0] - flips[0][0]) / 1000:.1f} s: {fps:.1f} frames/s")
    assert not _tracebacks(page), _tracebacks(page)
    page.set_viewport_size({"width": 1100, "height": 1000})
    page.wait_for_timeout(500)
    panel.scroll_into_view_if_needed()
    _shot(page, "panel_1100.png")
    box, controls = image.bounding_box(), panel.locator(".widget-dropdown select").first.bounding_box()
    assert box["width"] > 600 and controls["width"] > 150            # the figure fills the output, controls not crushed
    assert panel.locator(".dn-slider").bounding_box()["width"] > 200   # the player's slider is there to scrub
    span = box["y"] + box["height"] - controls["y"]
    assert span < 850, f"at 1100 px the controls and the picture span {span:.0f} px: they do not fit in one view"

    # the explorer: every change (a click adding a point, a drag, tau, the normalisation) timed in the page, from the
    # input event to the canvas's new picture (the canvas counts its pictures in data-frames)
    page.set_viewport_size({"width": 1400, "height": 1000})
    _run_cells(page, EXPLORER_CELLS, cell_ids)
    ex = page.locator(".jp-Cell").nth(cell_ids.index(EXPLORER_CELLS[-1])).locator(".jp-OutputArea-output")
    canvas = ex.locator("canvas.dn-field-canvas")
    page.wait_for_function("c => Number(c.dataset.frames) > 0", arg=canvas.element_handle(timeout=60_000))
    canvas.scroll_into_view_if_needed()
    page.evaluate("""c => { window._dn = {events: [], frames: []};     // capture: before any widget handles the event
        for (const t of ["pointerdown", "keydown"]) document.addEventListener(t, () => window._dn.events.push(performance.now()), true);
        new MutationObserver(() => window._dn.frames.push(performance.now()))
            .observe(c, {attributes: true, attributeFilter: ["data-frames"]}); }""", canvas.element_handle())
    state = lambda: page.evaluate("c => { const s = c.dnState; return {...s, data: Array.from(s.data), gen: Array.from(s.gen), "
                                  "V: Array.from(s.V), Vp: [], Vm: []}; }", canvas.element_handle())
    box = canvas.bounding_box()
    lim = 1.5
    to_px = lambda x, y: (box["x"] + (x + lim) / (2 * lim) * box["width"], box["y"] + (lim - y) / (2 * lim) * box["height"])
    waits = {}
    def timed(name, act):
        "Do `act`; the ms from its first input event to the next picture drawn."
        page.evaluate("() => { window._dn.events = []; window._dn.frames = []; }")
        act()
        page.wait_for_function("() => window._dn.events.length && window._dn.frames.some(t => t >= window._dn.events[0])",
                               timeout=10_000)
        ev, fr = page.evaluate("() => [window._dn.events[0], window._dn.frames]")
        waits[name] = min(t for t in fr if t >= ev) - ev
    s0 = state()
    timed("click adds a data point", lambda: page.mouse.click(*to_px(0.1, 1.3)))
    s1 = state()
    held = ex.locator(".dn-field-held")                       # and the points reach the kernel
    page.wait_for_function("([el, n]) => el.textContent.includes(`has ${n} data`)", arg=[held.element_handle(), len(s1["data"]) // 2],
                           timeout=20_000)
    assert len(s1["data"]) == len(s0["data"]) + 2 and abs(s1["data"][-2] - 0.1) < 0.02 and abs(s1["data"][-1] - 1.3) < 0.02
    gx, gy = s1["gen"][0], s1["gen"][1]                       # drag the first generated point to (-1, 1)
    def drag():
        page.mouse.move(*to_px(gx, gy)); page.mouse.down()
        for k in range(1, 9): page.mouse.move(*to_px(gx + k / 8 * (-1 - gx), gy + k / 8 * (1 - gy)))
        page.mouse.up()
    timed("drag of a point", drag)
    page.wait_for_timeout(200)
    s2 = state()
    assert abs(s2["gen"][0] + 1) < 0.02 and abs(s2["gen"][1] - 1) < 0.02 and len(s2["gen"]) == len(s1["gen"]), s2["gen"][:4]
    handle = ex.locator(".widget-hslider").filter(has_text="τ").locator(".noUi-handle").first
    handle.focus()
    timed("tau (a key on its slider)", lambda: page.keyboard.press("ArrowRight"))
    timed("normalisation 'y'", lambda: ex.get_by_role("button", name="y", exact=True).first.click())
    page.wait_for_timeout(300)
    s3 = state()
    assert (s3["normalize"], round(s3["tau"], 4), s3["pos_mult"], s3["neg_mult"]) == ("y", 0.1122, 1.5, 0.5), s3["tau"]
    import torch                                              # the arrows are compute_V's field, as the controls say
    from drifting_nb.drift import compute_V
    x, y = torch.tensor(s3["gen"]).reshape(-1, 2), torch.tensor(s3["data"]).reshape(-1, 2)
    want = compute_V(x, y, tau=s3["tau"], normalize="y", pos_mult=1.5, neg_mult=0.5)
    torch.testing.assert_close(torch.tensor(s3["V"], dtype=torch.float32).reshape(-1, 2), want, atol=2e-5, rtol=1e-3)
    ex.get_by_role("button", name="erase", exact=True).click()  # erase: a click on a point removes it
    page.wait_for_timeout(200)
    timed("erase a point", lambda: page.mouse.click(*to_px(s3["data"][0], s3["data"][1])))
    assert len(state()["data"]) == len(s3["data"]) - 2
    # a drag on empty canvas in "move" mode selects nothing and fades nothing: the picture stays as it is
    ex.get_by_role("button", name="move", exact=True).click()
    page.wait_for_timeout(200)
    pixels = "c => c.toDataURL()"
    before = page.evaluate(pixels, canvas.element_handle())
    page.mouse.move(*to_px(-1.3, -1.3)); page.mouse.down(); page.mouse.move(*to_px(1.3, 0.2), steps=6); page.mouse.up()
    page.wait_for_timeout(300)
    assert page.evaluate(pixels, canvas.element_handle()) == before, "a drag on empty canvas changed the picture"
    print("explorer, ms from the input event to the new picture: "
          + "; ".join(f"{k} {v:.0f}" for k, v in waits.items()) + f" (load {os.getloadavg()[0]:.1f})")
    assert max(waits.values()) < 300, waits
    _shot(page, "explorer_1400.png")
    page.set_viewport_size({"width": 1100, "height": 1000})
    page.wait_for_timeout(500)
    canvas.scroll_into_view_if_needed()
    _shot(page, "explorer_1100.png")
    top, box = ex.locator(".widget-toggle-buttons").first.bounding_box(), canvas.bounding_box()
    assert box["y"] + box["height"] - top["y"] < 850, "at 1100 px the explorer's controls and canvas do not fit in one view"
    ex.locator(".dn-field-held").scroll_into_view_if_needed()
    _shot(page, "explorer_training_1100.png")
    tracks = {t.inner_text(): t.locator(".slider-container").bounding_box()["width"]
              for t in ex.locator(".widget-hslider").all() + panel.locator(".widget-hslider").all()}
    assert min(tracks.values()) > 80, f"sliders crushed to (px): {tracks}"   # every slider there to drag
    assert not _tracebacks(page), _tracebacks(page)

    # save: nbdev's pre-save hook leaves no metadata behind
    page.locator(SHOWN).click()
    page.keyboard.press("Control+s")
    page.wait_for_function(f"() => !document.querySelector('.jp-mod-dirty')", timeout=20_000)
    time.sleep(1)
    saved = json.loads((root / "nbs" / NOTEBOOK).read_text())
    assert saved["metadata"] == original["metadata"]
    assert all(c.get("execution_count") is None and c["metadata"] == {} for c in saved["cells"])
    assert [c["source"] for c in saved["cells"]] == [c["source"] for c in original["cells"]]


def test_07_train_runs_all_and_plays_the_drift(lab, browser):
    _in_a_page(browser, lab, _train_notebook, "train07_failure.png")


def _train_notebook(page, url, token, root):
    cells = json.loads((root / "nbs" / TRAIN_NOTEBOOK).read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    player_cell = next(i for i, c in enumerate(cells) if "drift_player = FramePlayer" in "".join(c["source"]))
    _open_notebook(page, url, token, TRAIN_NOTEBOOK)
    # Run > Run All Cells, as a reader does; the page notes when each code cell gets its execution count
    page.evaluate("""sel => { window._dnDone = {};
        const t0 = performance.now();
        window._dnTimer = setInterval(() => document.querySelectorAll(sel + ' .jp-CodeCell .jp-InputPrompt')
            .forEach((p, k) => { if (!(k in window._dnDone) && /\\[\\d+\\]/.test(p.textContent)) window._dnDone[k] = performance.now() - t0; }),
            100); }""", SHOWN)
    page.locator(SHOWN).click()
    page.locator(".lm-MenuBar-item").filter(has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item").filter(has_text=re.compile(r"^Run All Cells")).first.click()
    t0 = time.perf_counter()
    state = """([sel, panel]) => { const ps = [...document.querySelectorAll(sel + ' .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent);
        return {queued: ps.filter(t => t.includes('*')).length, done: Object.keys(window._dnDone).length,
                idle: !!document.querySelector(panel + " .jp-Notebook-ExecutionIndicator[data-status='idle']")}; }"""
    quiet = None
    while True:             # until every code cell has run and the kernel is idle, or an error stopped Run All
        page.wait_for_timeout(500)
        s, seconds = page.evaluate(state, [SHOWN, SHOWN_PANEL]), time.perf_counter() - t0
        if s["done"] == len(code) and s["idle"]: break
        still = s["idle"] and not s["queued"]           # between two cells the kernel may be idle for a moment
        quiet = (quiet or time.perf_counter()) if still else None
        if still and (_tracebacks(page) or time.perf_counter() - quiet > 15): break
        if seconds > RUN_ALL_LIMIT_S: break
    done = {int(k): v / 1000 for k, v in page.evaluate("() => { clearInterval(window._dnTimer); return window._dnDone; }").items()}
    ends = sorted(done.items(), key=lambda kv: kv[1])
    took = [(k, t - (ends[j - 1][1] if j else 0.0)) for j, (k, t) in enumerate(ends)]
    slowest = sorted(took, key=lambda kt: -kt[1])[:3]
    print(f"\n07 Run All: {seconds:.0f} s, {len(done)} of {len(code)} code cells run (load {os.getloadavg()[0]:.1f}); slowest: "
          + "; ".join(f"cell {code[k]['id']} ({''.join(code[k]['source']).splitlines()[0][:50]!r}) {t:.0f} s" for k, t in slowest))
    errors = _tracebacks(page)
    stderr = {t.strip().splitlines()[0][:120] for t in
              page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts() if t.strip()}
    if stderr: print("07 stderr boxes (first lines):", sorted(stderr))
    assert not errors, f"Run All of 07 stopped on an error: {errors[0][-2000:]}"
    assert seconds <= RUN_ALL_LIMIT_S, f"Run All of 07 still running after {seconds:.0f} s (limit {RUN_ALL_LIMIT_S} s)"
    assert len(done) == len(code), f"Run All ran {len(done)} of {len(code)} code cells"

    # the drift player: a picture, the slider scrubs it, Play flips it
    player = page.locator(f"{SHOWN} .jp-Cell").nth(player_cell).locator(".jp-OutputArea-output")
    image, slider, label = player.locator("img.dn-frame"), player.locator("input.dn-slider"), player.locator(".dn-label")
    page.wait_for_function("img => img.src && img.complete && img.naturalWidth > 0", arg=image.element_handle(timeout=30_000),
                           timeout=30_000)
    frames = int(slider.get_attribute("max")) + 1
    assert frames >= 3, f"the drift player has {frames} frames"
    player.scroll_into_view_if_needed()
    src0, label0 = image.get_attribute("src"), label.inner_text()
    box = slider.bounding_box()
    slider.click(position={"x": 0.7 * box["width"], "y": box["height"] / 2})      # scrub: a click along the slider
    page.wait_for_function("([img, src]) => img.src !== src && img.complete && img.naturalWidth > 0",
                           arg=[image.element_handle(), src0], timeout=10_000)
    assert label.inner_text() != label0, "the slider moved the picture but not its label"
    _shot(page, "train07_player.png")
    shown_box, bar = image.bounding_box(), slider.bounding_box()
    print(f"07 drift player at 1400x1000: frame {shown_box['width']:.0f} x {shown_box['height']:.0f} px, slider to frame bottom "
          f"{shown_box['y'] + shown_box['height'] - bar['y']:.0f} px")
    slider.focus(); page.keyboard.press("Home")                     # back to the first frame, then Play
    page.wait_for_function("([img, src]) => img.src === src", arg=[image.element_handle(), src0], timeout=10_000)
    image.evaluate("""img => { window._flips = [];
        new MutationObserver(() => window._flips.push([performance.now(), img.src]))
        .observe(img, {attributes: true, attributeFilter: ["src"]}); }""")
    player.locator("button.dn-play").click()
    page.wait_for_timeout(2500)                                       # a couple of seconds of Play (or all of it)
    flips, shown = page.evaluate("window._flips"), []
    for t, src in flips:
        if src != (shown[-1][1] if shown else src0): shown.append((t, src))
    if "Pause" in player.locator("button.dn-play").inner_text(): player.locator("button.dn-play").click()
    assert len(shown) >= min(frames - 1, 4), f"Play showed {len(shown)} new frames in 2.5 s"
    fps = (len(shown) - 1) / ((shown[-1][0] - shown[0][0]) / 1000)
    print(f"07 drift player: {frames} frames, Play showed {len(shown)} in {(shown[-1][0] - shown[0][0]) / 1000:.1f} s: "
          f"{fps:.1f} frames/s (interval 200 ms: 5/s; load {os.getloadavg()[0]:.1f})")
    assert fps > 2, f"Play shows {fps:.1f} frames/s where its interval asks for 5"
    _shot(page, "train07_played.png")
    assert not _tracebacks(page), _tracebacks(page)


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
