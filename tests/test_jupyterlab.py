"""Exploring by hand, as the README describes it: `jupyter lab notebooks/` serves the notebooks,
each opens with this environment as its kernel, a person edits the `parameters` cell and runs
all cells in a browser; nbdime shows a notebook's git diff cell by cell.

The browser test (marker ``browser``) drives Debian's Chromium through Playwright for Python,
with no browser download. It is skipped where either is missing, except where
``PREFNB_REQUIRE_BROWSER=1`` (set by .ci/run) makes that a failure. It works in a temporary
copy of the project, so what a run by hand writes (``notebooks/outputs/`` beside the
notebook, and the notebook saved with its outputs) never lands in the checkout. Its screenshot,
``jupyterlab.png`` in the test's tmp folder, is saved whether the test passes or fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NOTEBOOK = "01_sft.ipynb"
# Debian's headless Chromium; the flags keep it from reaching out (updates, sync, first-run pages)
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
MISSING = [what for what, gone in (
    ("Chromium (apt-get install chromium)", CHROMIUM is None),
    ("playwright (pip install -e '.[dev]')", importlib.util.find_spec("playwright") is None)) if gone]
BROWSER_REQUIRED = os.environ.get("PREFNB_REQUIRE_BROWSER") == "1"
# The hand-made run: shorter than the notebook's default and logged often enough to draw curves
# (the notebook's own parameters already cap the report split at 48 examples)
EDITED = {"max_steps": 8, "log_every": 2}


def isolated_jupyter_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment with Jupyter's and IPython's per-user folders in tmp_path: a new
    user's machine (no kernels or settings of their own), and nothing written to the real home."""
    env = dict(os.environ)
    for var, name in (("JUPYTER_CONFIG_DIR", "jupyter-config"), ("JUPYTER_DATA_DIR", "jupyter-data"),
                      ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"), ("IPYTHONDIR", "ipython")):
        env[var] = str(tmp_path / name)
    env.pop("JUPYTER_PATH", None)
    env.pop("MPLBACKEND", None)  # CI sets Agg; a person's kernel uses the notebook's inline backend
    # the kernel imports this checkout's prefnb (as the editable install of a clean clone does)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_notebooks_name_a_kernel_that_runs_this_environment(tmp_path, monkeypatch):
    """No `ipykernel install` step: every notebook names `python3`, which a JupyterLab started from
    this environment launches with this environment's Python (jupyter_client swaps the kernelspec's
    bare `python` for sys.executable)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    for var, value in isolated_jupyter_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    assert {nbformat.read(p, as_version=4).metadata.kernelspec.name for p in NOTEBOOKS} == {"python3"}
    assert "python3" in KernelSpecManager().find_kernel_specs()
    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert command[0] == sys.executable and "ipykernel_launcher" in command


# --- the browser test --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(process: subprocess.Popen, runtime_dir: Path, token: str, log: Path) -> str:
    """The base URL the server reports in its runtime file, once its API answers."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"jupyter lab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        info = next(runtime_dir.glob(f"jpserver-{process.pid}.json"), None)
        if info is not None:
            url = json.loads(info.read_text())["url"]
            try:
                urllib.request.urlopen(f"{url}api/status?token={token}", timeout=5)
                return url
            except OSError:
                pass
        time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within 120 s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def jupyterlab(tmp_path):
    """`jupyter lab notebooks/` (this environment's) in a temporary copy of the project (notebooks/
    and params/, what makes a folder a project), on a free loopback port with a token.
    Yields (base url, token, the copied notebooks/, the server process)."""
    project = tmp_path / "project"
    for folder in ("notebooks", "params"):
        shutil.copytree(ROOT / folder, project / folder)
    env = isolated_jupyter_env(tmp_path)
    # The one-time "get notified about Jupyter news?" prompt would sit over the notebook
    labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    token = os.urandom(16).hex()
    log = tmp_path / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "notebooks/", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={_free_port()}", f"--IdentityProvider.token={token}",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI runs as root
        command.append("--allow-root")
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = _wait_for_server(process, Path(env["JUPYTER_RUNTIME_DIR"]), token, log)
        yield url, token, project / "notebooks", process
    finally:
        process.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _kernel_commands(server_pid: int) -> list[list[str]]:
    """Command lines of the server's child processes that are ipykernel kernels (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{server_pid}/task").glob("*/children"):
        children += task.read_text().split()
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children]
    return [[part.decode() for part in c if part] for c in commands if b"ipykernel_launcher" in c]


def _wait_for_saved_run(path: Path, timeout: float = 30) -> nbformat.NotebookNode:
    deadline = time.monotonic() + timeout
    while True:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if all(c.execution_count for c in code) or time.monotonic() > deadline:
            return nb
        time.sleep(0.5)


@pytest.mark.browser
@pytest.mark.skipif(bool(MISSING) and not BROWSER_REQUIRED, reason="not installed: " + ", ".join(MISSING))
def test_run_all_of_the_sft_notebook_in_jupyterlab_in_chromium(jupyterlab, tmp_path):
    assert not MISSING, "PREFNB_REQUIRE_BROWSER=1 but not installed: " + ", ".join(MISSING)
    from playwright.sync_api import expect, sync_playwright

    url, token, notebooks, server = jupyterlab
    shot, console = tmp_path / "jupyterlab.png", tmp_path / "browser-console.log"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})  # tall: the whole notebook fits
        page.set_default_timeout(60_000)
        messages: list[str] = []
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
        try:
            page.goto(f"{url}lab/tree/{NOTEBOOK}?token={token}")
            # the file browser shows the notebooks folder; the notebook's own kernel starts, no dialog
            listing = page.locator(".jp-DirListing-content .jp-DirListing-itemText")
            expect(listing.filter(has_text=NOTEBOOK)).to_be_visible(timeout=120_000)
            assert {p.name for p in NOTEBOOKS} <= set(listing.all_inner_texts())
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=120_000)

            # edit the parameters cell as a person does: retype the max_steps line, add a line
            parameters = page.locator(".jp-CodeCell").filter(has=page.locator(".cm-line", has_text="max_steps"))
            expect(parameters).to_have_count(1)
            parameters.locator(".cm-line", has_text=re.compile(r"^max_steps\s*=")).click()
            page.keyboard.press("End")
            page.keyboard.press("Shift+Home")
            page.keyboard.type("\n".join(f"{key} = {value}" for key, value in EDITED.items()))
            page.keyboard.press("Escape")

            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            # queued and running cells show [*]; Run All stops at the first cell that raises
            page.wait_for_function("() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                                   ".some(p => p.textContent.includes('*'))", timeout=30_000)
            page.wait_for_function("() => ![...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
                                   ".some(p => p.textContent.includes('*'))", timeout=300_000)
            outputs = page.locator(".jp-OutputArea-output")
            text = "\n".join(outputs.all_inner_texts())
            assert "Traceback" not in text, f"error output (screenshot: {shot}):\n{text[-3000:]}"
            prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
            assert all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts), prompts

            # training output: the run directory, and tqdm's bar as an ipywidgets widget at its end
            assert "run directory:" in text
            expect(page.locator(".jp-OutputArea-output .widget-hprogress")).to_have_count(1)
            steps = EDITED["max_steps"]
            assert re.search(rf"100%.*\b{steps}/{steps}\b", text, re.S), text[-2000:]
            # the training-curve figure, decoded by the browser
            figure = page.locator(".jp-OutputArea-output[data-mime-type='image/png'] img")
            expect(figure).to_have_count(1)
            assert figure.evaluate("img => img.complete && img.naturalWidth > 300 && img.naturalHeight > 100")
            # the metrics table
            table = page.locator(".jp-OutputArea-output[data-mime-type='text/html'] table")
            expect(table).to_have_count(1)
            expect(table.locator("thead")).to_contain_text("eval/accuracy")
            expect(table.locator("tbody")).to_contain_text("this run")

            # the kernel is this environment's Python
            kernels = _kernel_commands(server.pid) if Path("/proc").is_dir() else [[sys.executable]]
            assert [k[0] for k in kernels] == [sys.executable], kernels

            # save through the UI: the saved copy has every cell run in order and no error output
            page.get_by_role("menuitem", name="File", exact=True).click()
            page.locator("li[data-command='docmanager:save']").click()
            figure.scroll_into_view_if_needed()
        finally:
            page.screenshot(path=str(shot))
            console.write_text("\n".join(messages))
            browser.close()

    nb = _wait_for_saved_run(notebooks / NOTEBOOK)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"screenshot: {shot}"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"screenshot: {shot}"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)

    # what a hand-made run writes: a run directory beside the notebook, with the edited values,
    # its figure and metrics, and no COMPLETE: the study never takes it for one of its runs
    (run,) = (notebooks / "outputs" / "01_sft").iterdir()
    params = yaml.safe_load((run / "params.yaml").read_text())
    assert {key: params[key] for key in EDITED} == EDITED
    assert (run / "history.png").is_file() and json.loads((run / "metrics.json").read_text())
    assert not (run / "COMPLETE").exists()


# --- nbdime ------------------------------------------------------------------------------------
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_nbdime_config_git_makes_git_diff_show_cells(tmp_path):
    """In a scratch repository with the project's .gitattributes, `nbdime config-git --enable`
    turns `git diff` of a notebook from JSON lines into nbdime's cell-by-cell diff."""
    repo = tmp_path / "repo"
    repo.mkdir()
    env = dict(os.environ, HOME=str(tmp_path / "home"), GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

    def run(*command: str) -> str:
        return subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True, text=True).stdout

    run("git", "init", "-q")
    shutil.copy(ROOT / ".gitattributes", repo)
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, repo)
    run("git", "add", ".")
    run("git", "commit", "-q", "-m", "notebook")
    nb = nbformat.read(repo / NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells[index].source += "\nlog_every = 2"
    nbformat.write(nb, repo / NOTEBOOK)

    json_line, cell_line = re.compile(r'^\+\s*"log_every = 2"$', re.M), re.compile(r"^\+log_every = 2$", re.M)
    before = run("git", "diff")
    assert json_line.search(before) and not cell_line.search(before), before  # the notebook's JSON, line by line
    run("nbdime", "config-git", "--enable")
    after = ANSI.sub("", run("git", "diff"))
    assert after.startswith("nbdiff ") and f"## modified /cells/{index}/source:" in after, after
    assert cell_line.search(after) and not json_line.search(after), after
