"""The evaluation report opens offline in a real Chromium and draws every figure.

The report embeds plotly.js and its figures gzip'd; the page inflates them with the
browser's DecompressionStream. This drives that page in headless Chromium from a
``file://`` URL with the network cut, and counts the drawn plots.
"""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.browser


def test_report_draws_every_figure_offline(quick_run, browser):
    report = quick_run / "eval" / "report.html"
    text = report.read_text()
    n_figures = len(re.findall(r"data-screener-figure=", text))
    assert n_figures >= 4  # ROC and PRO curves of the phantoms at least
    context = browser.new_context(offline=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(report.as_uri())
    page.wait_for_selector("body[data-figures-drawn=true]", timeout=60_000)
    assert page.locator(".js-plotly-plot").count() == n_figures
    assert page.locator(".js-plotly-plot .main-svg").count() >= n_figures  # plotly rendered SVG, not empty divs
    assert errors == []
    context.close()
