"""The self-contained HTML report (template, escaping, tables from data, embedded figures,
provenance) and a headless-browser check of a page built from parts."""

from __future__ import annotations

import base64
import importlib.resources
import os
import re
import time
from pathlib import Path

import pytest
from helpers import chromium_driver

from flatminima.experiment.report import (
    Figure,
    Section,
    format_value,
    render_html,
    value_table,
    write_html_report,
)
from flatminima.experiment.tables import Cell, Table

RESULTS = Table("results", "Results", "final metrics",
                ["method", "test accuracy (%)", "final train loss", "seeds"],
                [[Cell("SGD"), Cell("91.20 ± 0.10", 91.2, 0.1, 3), Cell("0.0123 ± 0.0010", 0.0123, 0.001, 3),
                  Cell("3", 3.0)],
                 [Cell("SAM (ρ=0.05)"), Cell("92.05 ± 0.08", 92.05, 0.08, 3), Cell("0.0456", 0.0456, None, 1),
                  Cell("1", 1.0)],
                 [Cell("a | b <x>"), Cell("–", n=0), Cell(""), Cell("1", 1.0)]])


def _png(path: Path, color: str = "C0") -> Path:
    """A small real matplotlib plot."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
    ax.plot(range(10), [x * x for x in range(10)], color=color, label="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sections(tmp_path: Path) -> list[Section]:
    return [
        Section("Results", text="Mean ± std over 3 seeds.\n\nSAM wins <by a bit> & costs 2×.", tables=[RESULTS],
                figures=[Figure(_png(tmp_path / "curves.png"), "Training loss <and> accuracy & more.")]),
        Section("Flatness", text="Sharper minima generalize worse.",
                tables=[value_table(["method", "λ_max", "trace", "note"],
                                    [["SGD", 152.3456789, 1234567.0, None], ["SAM", 0.000012345, 42, "flat"]],
                                    caption="diagnostics")],
                figures=[_png(tmp_path / "sharpness.png", color="C1")],
                details={"config": {"lr": 0.1, "rho": 0.05, "path": Path("/x")}, "note": "</pre><b>"}),
    ]


def test_the_template_ships_inside_the_package():
    template = importlib.resources.files("flatminima.experiment") / "templates" / "report.html.j2"
    assert template.is_file() and "Content-Security-Policy" in template.read_text(encoding="utf-8")


def test_text_titles_cells_captions_and_details_are_escaped(tmp_path):
    out = write_html_report(tmp_path / "r.html", "<script>alert(1)</script>",
                            [Section("<b>sec</b>", text="a < b & c", tables=[RESULTS],
                                     figures=[Figure(_png(tmp_path / "f.png"), "<i>cap</i> & co")],
                                     details={"k": "</pre><script>x</script>"})],
                            subtitle="<i>sub</i>", provenance={"<rerun>": "flatminima run 'a b' <c>"})
    doc = out.read_text(encoding="utf-8")
    assert doc.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in doc
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in doc
    assert "<script" not in doc and "<b>sec" not in doc and "<i>sub" not in doc and "<i>cap" not in doc
    assert "a &lt; b &amp; c" in doc and ">a | b &lt;x&gt;</td>" in doc and "&lt;i&gt;cap&lt;/i&gt; &amp; co" in doc
    assert "&lt;/pre&gt;&lt;script&gt;x&lt;/script&gt;" in doc
    assert '<th scope="row">&lt;rerun&gt;</th><td>flatminima run &#39;a b&#39; &lt;c&gt;</td>' in doc
    assert re.search(r"flatminima \d+\.\d+", doc.split("<footer>")[1])  # the version in the footer


def test_cells_come_from_data():
    doc = render_html("t", [Section("s", tables=[RESULTS, value_table(["a", "b", "c", "d", "e"],
                                                                      [["x", 0.123456789, 3, 1234567.0, 1.5e-7]])])],
                      colours={"SGD": "#1f77b4", "SAM (ρ=0.05)": "#ff7f0e"})
    # a statistic keeps its n (tooltip and data-n); a label is not right-aligned; a swatch in the method's colour
    assert ('<td class="num" title="mean ± std over n = 3" data-n="3">91.20 ± 0.10</td>' in doc)
    assert '<td class="num" data-n="1">0.0456</td>' in doc
    assert '<td><span class="swatch" style="background: #1f77b4"></span>SGD</td>' in doc
    assert '<td><span class="swatch" style="background: #ff7f0e"></span>SAM (ρ=0.05)</td>' in doc
    assert '<td class="num" data-n="0">–</td>' in doc and "<td>a | b &lt;x&gt;</td>" in doc
    for cell in ('<td class="num">0.1235</td>', '<td class="num">3</td>', '<td class="num">1.235e+06</td>',
                 '<td class="num">1.500e-07</td>'):
        assert cell in doc
    assert [format_value(v) for v in (None, float("nan"), float("inf"), 0.0, True, [1, 0.5])] == \
        ["–", "nan", "∞", "0", "yes", "1, 0.5"]


def test_a_colour_that_is_not_a_hex_colour_is_not_written():
    doc = render_html("t", [Section("s", tables=[RESULTS])], colours={"SGD": "red; background: url(x)"})
    assert "swatch" not in doc.split("</style>")[1]


def test_figures_are_embedded_and_the_page_is_self_contained(tmp_path):
    out = write_html_report(tmp_path / "sub" / "report.html", "Report", _sections(tmp_path), subtitle="s",
                            provenance={"rerun": "flatminima run x.yaml"})
    doc = out.read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)
    assert [base64.b64decode(b) for b in images] == [(tmp_path / n).read_bytes()
                                                     for n in ("curves.png", "sharpness.png")]
    assert "<figcaption>Training loss &lt;and&gt; accuracy &amp; more. <span class=\"file\">(curves.png)</span>" in doc
    for ref in ("http://", "https://", 'src="file', "href=\"file", "<link", "<script"):
        assert ref not in doc, ref
    # every TOC link points to a section id; the provenance section comes last
    links, ids = re.findall(r'href="#([^"]+)"', doc), re.findall(r'<section id="([^"]+)"', doc)
    assert links == ids and len(ids) == 3 and len(set(ids)) == 3 and ids[-1] == "s3-how-this-was-produced"
    assert doc.count("<table") == 3 and "<details>" in doc
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # no temporary left behind


def test_missing_figure_raises_and_writes_nothing(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        write_html_report(tmp_path / "r.html", "t", [Section("s", figures=[missing])])
    assert not (tmp_path / "r.html").exists()
    (tmp_path / "f.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="unsupported format"):
        write_html_report(tmp_path / "r.html", "t", [Section("s", figures=[Figure(tmp_path / "f.bmp")])])


def test_rewrite_replaces_the_file(tmp_path):
    out = write_html_report(tmp_path / "r.html", "first", [])
    write_html_report(out, "second", [Section("only")])
    doc = out.read_text(encoding="utf-8")
    assert "<title>second</title>" in doc and "first" not in doc


# ------------------------------------------------------------------------------ headless browser


def test_report_renders_in_headless_chromium(tmp_path):
    driver = chromium_driver()
    start = time.perf_counter()
    try:
        out = write_html_report(tmp_path / "report.html", "Flatness <report>", _sections(tmp_path),
                                subtitle="CIFAR-10 · ResNet-18", provenance={"rerun": "flatminima run x.yaml"},
                                colours={"SGD": "#1f77b4"})
        driver.get(out.resolve().as_uri())
        js = driver.execute_script
        assert driver.title == "Flatness <report>" == js("return document.title")
        assert js("return document.compatMode") == "CSS1Compat"  # standards mode: the doctype took
        assert js("return document.characterSet") == "UTF-8"
        headers = js("return [...document.querySelectorAll('table')].map("
                     "t => [...t.querySelectorAll('thead th')].map(th => th.textContent))")
        assert headers == [["method", "test accuracy (%)", "final train loss", "seeds"],
                           ["method", "λ_max", "trace", "note"], []]
        assert js("return document.querySelectorAll('tbody tr').length") == 3 + 2 + 1
        assert js("return document.querySelector('tbody tr:nth-child(3) td').textContent") == "a | b <x>"
        assert js("return getComputedStyle(document.querySelector('.swatch')).backgroundColor") == "rgb(31, 119, 180)"
        images = []
        for _ in range(50):  # data: URIs decode near-instantly; wait briefly anyway
            images = js("return [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            if images and all(c and w > 0 for c, w, _ in images):
                break
            time.sleep(0.1)
        assert len(images) == 2 and all(c and w > 0 and h > 0 for c, w, h in images), images
        assert js("return [...document.images].every(i => i.getBoundingClientRect().width <= "
                  "document.documentElement.clientWidth)")
        assert js("return [...document.querySelectorAll('figcaption')].map(c => c.textContent)") == [
            "Training loss <and> accuracy & more. (curves.png)", "(sharpness.png)"]
        toc = js("return [...document.querySelectorAll('nav.toc a')].map(a => "
                 "[a.textContent, !!document.getElementById(a.getAttribute('href').slice(1))])")
        assert toc == [["Results", True], ["Flatness", True], ["How this was produced", True]], toc
        assert js("return document.querySelector('details pre').textContent").count('"rho": 0.05') == 1
        assert js("return document.querySelector('table.facts td').textContent") == "flatminima run x.yaml"
        assert "flatminima" in js("return document.querySelector('footer').textContent")
        assert js("return getComputedStyle(document.querySelector('th')).borderTopStyle") == "solid"
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors  # e.g. a Content-Security-Policy violation: something external
        shot = os.environ.get("FLATMINIMA_REPORT_SCREENSHOT")  # e.g. /tmp/report_shot.png, to eyeball it
        if shot:
            height = js("return document.documentElement.scrollHeight")
            driver.set_window_size(1200, min(height + 140, 4000))
            driver.save_screenshot(shot)
    finally:
        driver.quit()
    assert time.perf_counter() - start < 30


def test_browser_flags_an_external_reference(tmp_path):
    """The console check above is live: an external image is blocked by the page's CSP and logged."""
    driver = chromium_driver()
    try:
        out = write_html_report(tmp_path / "r.html", "t", [Section("s")])
        doc = out.read_text(encoding="utf-8").replace("</main>", '<img src="https://example.invalid/x.png"></main>')
        out.write_text(doc, encoding="utf-8")
        driver.get(out.resolve().as_uri())
        logs = driver.get_log("browser")
        assert any("Content Security Policy" in e.get("message", "") for e in logs), logs
    finally:
        driver.quit()
