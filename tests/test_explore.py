"""``defectlab explore``: the explorer served by Voilà on 127.0.0.1, driven in headless Chromium
(Playwright): one grid on the page (the saved copy hidden by the live widget), a new class and
seed, Run, and a new grid arrives. Skips, saying why, where Chromium or Playwright is missing."""
import shutil
import socket
import subprocess
import time
import urllib.request

import nbformat
import pytest

from defectlab.stages import train
from defectlab.reports import explore
from defectlab.app.cli import main as cli_main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # no connections out of this closed machine


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train.run(train.TrainConfig(model="tiny", image_size=16, epochs=1, max_steps=1, batch_size=2, grad_accum=1,
                                       val_every=1, val_per_class=1, val_timesteps=1, log_samples=0, progress=False,
                                       report_to="none", runs_dir=str(tmp_path_factory.mktemp("runs"))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_explore_writes_the_run_notebook_and_refuses_bad_input(tiny_run, capsys):
    cfg = explore.ExploreConfig(run=str(tiny_run), serve=False, steps=3, images=2)
    path = explore.run(cfg)
    assert path == tiny_run / "explore" / "explorer.ipynb"
    code = nbformat.read(path, as_version=4).cells[1].source
    assert str(tiny_run) in code and '"steps": 3' in code and "n=2" in code and ".widget()" in code
    shown = capsys.readouterr().out
    assert "voila" in shown and "--Voila.ip=127.0.0.1" in shown
    assert cli_main(["explore", "--run", str(tiny_run), "--images", "0", "--no-serve"]) == 2
    assert "images and steps must be ≥ 1" in capsys.readouterr().err


@pytest.mark.slow
def test_the_explorer_page_updates_its_grid_in_a_headless_browser(tiny_run):
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    port = _free_port()
    cfg = explore.ExploreConfig(run=str(tiny_run), serve=False, port=port, open_browser=False, steps=2, images=2)
    server = subprocess.Popen(explore.command(explore.run(cfg), cfg), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:  # Voilà answers once its server is up; the kernel starts with the page
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read(100)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("Voilà did not start")
                time.sleep(0.5)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
            grid = page.locator(".widget-image img, img.widget-image").first
            grid.wait_for(state="visible", timeout=120_000)
            visible = [img for img in page.locator("img").all() if img.is_visible()]
            assert len(visible) == 1  # the saved copy of the grid is hidden by the live widget
            first = grid.get_attribute("src")
            page.locator("select").first.select_option(index=1)  # another class
            seed = page.locator(".widget-text input").first
            seed.fill("7")
            seed.press("Enter")
            page.get_by_role("button", name="Run").click()
            page.get_by_text("done in").wait_for(state="visible", timeout=120_000)  # set after the new grid
            shown = [img for img in page.locator("img").all() if img.is_visible()]
            assert len(shown) == 1 and shown[0].get_attribute("src") != first  # a new grid, still one
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_jupyterlab_opens_the_paired_py_notebooks_as_notebooks():
    """``make lab``: JupyterLab in this environment loads jupytext's server extension, whose contents
    manager serves ``notebooks/02_finetune.py`` as a notebook (what the Lab UI opens). In-process:
    the same manager the server builds, without the server's start-up."""
    import json
    from pathlib import Path

    from jupyter_core.paths import jupyter_config_path
    from jupyter_server.services.contents.largefilemanager import LargeFileManager
    from jupytext.sync_contentsmanager import build_sync_jupytext_contents_manager_class

    enabled = {}
    for folder in jupyter_config_path():
        for f in sorted(Path(folder, "jupyter_server_config.d").glob("*.json")):
            enabled.update(json.loads(f.read_text()).get("ServerApp", {}).get("jpserver_extensions", {}))
    assert enabled.get("jupyterlab_jupytext") and enabled.get("jupyterlab") and enabled.get("voila.server_extension")
    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    got = build_sync_jupytext_contents_manager_class(LargeFileManager)(root_dir=str(notebooks)).get(
        "02_finetune.py", type="notebook")
    assert got["type"] == "notebook"
    cells = got["content"]["cells"]
    assert any("parameters" in c["metadata"].get("tags", []) for c in cells)
