"""The offline viewer in a real JupyterLab, in headless Chromium.

Opens a notebook (the synthetic fixture next to this file, and the real
notebook 07 on the real quick-profile run; see conftest's ``browser_notebook``), runs all cells from the Run menu, checks that the
viewer's plotly slices are drawn, moves the threshold slider with the keyboard
and waits for the Dice text, which the kernel recomputes, to change. A
screenshot goes to tests/browser/artifacts/viewer-<notebook>.png (git-ignored).
"""
from __future__ import annotations

import time
import uuid

import jupytext
import pytest

pytestmark = pytest.mark.browser

KERNEL_READY_MS = 120_000
RUN_ALL_MS = 180_000  # the whole notebook (the quick profile of notebook 07 included)
ROUND_TRIP_MS = 60_000


def _to_ipynb(src, dest_dir, parameters=None):
    """py:percent -> .ipynb in the server's root, with a kernelspec and injected parameters."""
    nb = jupytext.read(src)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                          "language": "python"})
    if parameters:  # like papermill: a tagged cell right after the "parameters" cell
        import nbformat

        tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
        code = "# Parameters injected by the browser test\n" + "".join(
            f"{k} = {v!r}\n" for k, v in parameters.items())
        cell = nbformat.v4.new_code_cell(code, metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(tagged[0] + 1 if tagged else 0, cell)
    dest = dest_dir / f"{src.stem}.ipynb"
    jupytext.write(nb, dest, fmt="ipynb")
    return dest


#: console errors that occur with or without the viewer, and why
EXPLAINED_CONSOLE_ERRORS = (
    "favicon",  # the test server serves no favicon: the browser's request gets a 404
)


def _dismiss_popups(page):
    """Accept a kernel-choice dialog and close the news toast, if either appeared."""
    dialog = page.locator(".jp-Dialog button.jp-mod-accept")
    if dialog.count() and dialog.first.is_visible():
        dialog.first.click()
    news = page.locator(".jp-toast-button", has_text="No")
    if news.count() and news.first.is_visible():
        news.first.click()


def test_offline_viewer_in_jupyterlab(lab_server, browser_page, browser_notebook, browser_notebook_parameters,
                                      artifacts_dir):
    try:
        _drive_viewer(lab_server, browser_page, browser_notebook, browser_notebook_parameters, artifacts_dir)
    except BaseException:
        browser_page.screenshot(path=str(artifacts_dir / f"viewer_failure-{browser_notebook.stem}.png"))
        print("console:", *browser_page.console_messages[-30:], sep="\n  ")
        raise


def _run_all(page, idle):
    """Run > Run All Cells, once the notebook's kernel is connected and idle."""
    from playwright.sync_api import expect

    expect(page.locator(".jp-StatusBar-TextItem", has_text="Idle").first).to_be_visible(timeout=KERNEL_READY_MS)
    expect(idle).to_have_count(1, timeout=KERNEL_READY_MS)
    page.locator(".jp-NotebookPanel .jp-InputPrompt").first.click()  # make the notebook the current widget
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def _drive_viewer(lab_server, browser_page, browser_notebook, parameters, artifacts_dir):
    from playwright.sync_api import expect

    t0 = time.perf_counter()
    base, root = lab_server
    nb_path = _to_ipynb(browser_notebook, root, parameters)
    page = browser_page
    page.goto(f"{base}/lab/workspaces/{uuid.uuid4().hex[:8]}/tree/{nb_path.name}?reset")

    # notebook open and its kernel idle
    expect(page.locator(".jp-NotebookPanel")).to_be_visible(timeout=KERNEL_READY_MS)
    idle = page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']")
    page.locator(".jp-Dialog").or_(idle).first.wait_for(timeout=KERNEL_READY_MS)
    _dismiss_popups(page)
    _run_all(page, idle)

    viewer = page.locator(".screener-viewer").first
    expect(viewer).to_be_visible(timeout=RUN_ALL_MS)
    # the three plotly panels are drawn: heatmap images inside the figure's SVG
    plot = viewer.locator(".js-plotly-plot").first
    expect(plot).to_be_visible(timeout=ROUND_TRIP_MS)
    heatmaps = plot.locator("g.hm image")
    expect(heatmaps.first).to_be_visible(timeout=ROUND_TRIP_MS)
    assert heatmaps.count() >= 3, f"expected >= 3 heatmap layers, found {heatmaps.count()}"
    for title in ("axial", "coronal", "sagittal"):
        expect(plot.locator("text.annotation-text", has_text=title)).to_have_count(1)
    contour = plot.locator("g.contourlevel path")
    assert contour.count() >= 1, "the ground-truth outline is not drawn"
    expect(idle).to_have_count(1, timeout=RUN_ALL_MS)  # every cell done

    dice = viewer.locator(".screener-dice")
    expect(dice).to_contain_text("Dice", timeout=ROUND_TRIP_MS)
    before = dice.inner_text()

    # move the threshold with the keyboard on the slider handle (a real user event)
    handle = viewer.locator(".screener-threshold .noUi-handle").first
    handle.focus()
    for _ in range(3):
        handle.press("PageUp")
    page.wait_for_timeout(200)
    expect(dice).not_to_have_text(before, timeout=ROUND_TRIP_MS)
    after = dice.inner_text()
    assert "Dice" in after and after != before

    if browser_notebook.name == "viewer_fixture.py":
        out = page.locator(".jp-OutputArea-output", has_text="interactive:").first
        expect(out).to_contain_text("True")  # served by Jupyter: detect_interactive() says yes

    viewer.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # let plotly finish its transition before the screenshot
    shot = artifacts_dir / f"viewer-{browser_notebook.stem}.png"
    viewer.screenshot(path=str(shot))
    page.screenshot(path=str(artifacts_dir / f"viewer_page-{browser_notebook.stem}.png"), full_page=False)
    errors = [m for m in page.console_messages
              if m.startswith("error") and not any(k in m for k in EXPLAINED_CONSOLE_ERRORS)]
    print(f"browser test: {time.perf_counter() - t0:.1f} s; Dice text {before!r} -> {after!r}; "
          f"screenshot {shot}; console errors: {errors[:5]}")
    assert not errors, f"JupyterLab's console has errors the viewer should not cause: {errors[:10]}"
