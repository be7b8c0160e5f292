"""The self-contained HTML report: escaping, Markdown tables, embedded figures, and a headless-browser check."""

from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path

import pytest

from helpers import chromium_driver
from flatminima.htmlreport import Section, Table, render_html, table_from_markdown, write_html_report

RESULTS_MD = """\
| method | test accuracy (%) | final train loss | time/step vs SGD | ms/step | seeds |
|---|---|---|---|---|---|
| SGD | 91.20 ± 0.10 | 0.0123 ± 0.0010 | 1.00 | 12.3 | 3 |
| SAM (ρ=0.05) | 92.05 ± 0.08 | 0.0456 ± 0.0020 | 1.98 | 24.4 | 3 |
| a \\| b <x> | – | | 2.00 | 1e-4 | 1 |
"""



def _png(path: Path, color: str = "C0") -> Path:
    """A small real matplotlib plot."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.5), dpi=80)
    ax.plot(range(10), [x * x for x in range(10)], color=color, label="loss")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sections(tmp_path: Path) -> list[Section]:
    return [
        Section("Results", text="Mean ± std over 3 seeds.\n\nSAM wins <by a bit> & costs 2×.",
                tables=[table_from_markdown(RESULTS_MD, caption="final metrics")],
                figures=[_png(tmp_path / "curves.png")]),
        Section("Flatness", text="Sharper minima generalize worse.",
                tables=[Table(["method", "λ_max", "trace", "note"],
                              [["SGD", 152.3456789, 1234567.0, None], ["SAM", 0.000012345, 42, "flat"]],
                              caption="diagnostics")],
                figures=[_png(tmp_path / "sharpness.png", color="C1")],
                details={"config": {"lr": 0.1, "rho": 0.05, "path": Path("/x")}, "note": "</pre><b>"}),
    ]


# ------------------------------------------------------------------------------------ unit tests


def test_markdown_table_round_trips_cells():
    t = table_from_markdown("Some heading\n\n" + RESULTS_MD + "\ntrailing text", caption="c")
    assert t.caption == "c"
    assert t.columns == ["method", "test accuracy (%)", "final train loss", "time/step vs SGD", "ms/step", "seeds"]
    assert t.rows == [["SGD", "91.20 ± 0.10", "0.0123 ± 0.0010", "1.00", "12.3", "3"],
                      ["SAM (ρ=0.05)", "92.05 ± 0.08", "0.0456 ± 0.0020", "1.98", "24.4", "3"],
                      ["a | b <x>", "–", "", "2.00", "1e-4", "1"]]
    # alignment colons, no outer pipes, short rows padded
    t = table_from_markdown("a | b\n:--|--:\n1 | 2\n3 |")
    assert t.columns == ["a", "b"] and t.rows == [["1", "2"], ["3", ""]]
    with pytest.raises(ValueError, match="no Markdown pipe table"):
        table_from_markdown("just text\nno table")


def test_text_and_titles_are_escaped(tmp_path):
    out = write_html_report(tmp_path / "r.html", "<script>alert(1)</script>",
                            [Section("<b>sec</b>", text="a < b & c", tables=[table_from_markdown(RESULTS_MD)],
                                     details={"k": "</pre><script>x</script>"})],
                            subtitle="<i>sub</i>")
    doc = out.read_text(encoding="utf-8")
    assert doc.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in doc
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in doc
    assert "<script" not in doc and "<b>sec" not in doc and "<i>sub" not in doc
    assert "a &lt; b &amp; c" in doc and "a | b &lt;x&gt;" in doc
    assert "&lt;/pre&gt;&lt;script&gt;x&lt;/script&gt;" in doc
    assert re.search(r"flatminima \d+\.\d+", doc.split("<footer>")[1])  # the version in the footer


def test_cell_formatting():
    doc = render_html("t", [Section("s", tables=[Table(["a", "b", "c", "d", "e"],
                                                       [[None, 0.123456789, 3, 1234567.0, 1.5e-7]])])])
    for cell in ("<td>–</td>", '<td class="num">0.1235</td>', '<td class="num">3</td>',
                 '<td class="num">1.235e+06</td>', '<td class="num">1.500e-07</td>'):
        assert cell in doc


def test_figures_are_embedded_and_the_page_is_self_contained(tmp_path):
    sections = _sections(tmp_path)
    out = write_html_report(tmp_path / "sub" / "report.html", "Report", sections, subtitle="s")
    doc = out.read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', doc)
    assert [base64.b64decode(b) for b in images] == [(tmp_path / n).read_bytes() for n in ("curves.png", "sharpness.png")]
    for ref in ("http://", "https://", 'src="file', "href=\"file", "<link", "<script"):
        assert ref not in doc, ref
    # every TOC link points to a section id
    links, ids = re.findall(r'href="#([^"]+)"', doc), re.findall(r'<section id="([^"]+)"', doc)
    assert links == ids and len(ids) == 2 and len(set(ids)) == 2
    assert doc.count("<table>") == 2 and "<details>" in doc
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # no temporary left behind


def test_missing_figure_raises_and_writes_nothing(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        write_html_report(tmp_path / "r.html", "t", [Section("s", figures=[missing])])
    assert not (tmp_path / "r.html").exists()
    (tmp_path / "f.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="unsupported format"):
        write_html_report(tmp_path / "r.html", "t", [Section("s", figures=[tmp_path / "f.bmp"])])


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
                                subtitle="CIFAR-10 · ResNet-18")
        driver.get(out.resolve().as_uri())
        js = driver.execute_script
        assert driver.title == "Flatness <report>" == js("return document.title")
        assert js("return document.compatMode") == "CSS1Compat"  # standards mode: the doctype took
        assert js("return document.characterSet") == "UTF-8"
        headers = js("return [...document.querySelectorAll('table')].map("
                     "t => [...t.querySelectorAll('thead th')].map(th => th.textContent))")
        assert headers == [["method", "test accuracy (%)", "final train loss", "time/step vs SGD", "ms/step", "seeds"],
                           ["method", "λ_max", "trace", "note"]]
        assert js("return document.querySelectorAll('tbody tr').length") == 5
        assert js("return document.querySelector('tbody tr:nth-child(3) td').textContent") == "a | b <x>"
        # the embedded images decoded: wait briefly for them to finish (data: URIs are near-instant)
        images = []
        for _ in range(50):
            images = js("return [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            if images and all(c and w > 0 for c, w, _ in images):
                break
            time.sleep(0.1)
        assert len(images) == 2 and all(c and w > 0 and h > 0 for c, w, h in images), images
        assert js("return [...document.images].every(i => i.getBoundingClientRect().width <= "
                  "document.documentElement.clientWidth)")
        # the table of contents resolves to sections
        toc = js("return [...document.querySelectorAll('nav.toc a')].map(a => "
                 "[a.getAttribute('href'), !!document.getElementById(a.getAttribute('href').slice(1))])")
        assert len(toc) == 2 and all(ok for _, ok in toc), toc
        assert js("return document.querySelector('details pre').textContent").count('"rho": 0.05') == 1
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

