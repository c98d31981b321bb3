"""A PDF preview of the paper through Typst, as Quarto's ``format: typst`` makes it, and its checks.

Debian's pandoc (2.17) has no Typst writer, so this uses the pandoc 3 binary of the PyPI
package ``pypandoc-binary`` and the Typst compiler of the PyPI package ``typst`` (the
``paper`` extra), on the HTML preview's expanded markdown.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prefnb.paper import PAPER_FILE, _user_error, pandoc_options, quarto_config

CITATION = re.compile(r"(?<![\w.])@([A-Za-z][\w:-]*\d{4}\w*)")


def available() -> str | None:
    """None where the PDF preview can be built, else what to install."""
    try:
        import pypandoc  # noqa: F401
        import typst  # noqa: F401
    except ImportError:
        return "the PDF preview needs the `paper` extra (pip install -e '.[paper]': pypandoc-binary, typst)"
    return None


def _length_pt(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)\s*(cm|mm|in|pt)", str(value).strip()).groups()
    return float(number) * {"cm": 72 / 2.54, "mm": 72 / 25.4, "in": 72.0, "pt": 1.0}[unit]


def typst_format(paper_dir: Path) -> dict:
    return (quarto_config(paper_dir).get("format") or {}).get("typst") or {}


def render_pdf(paper_dir: Path, markdown: Path) -> Path:
    """``markdown`` (the expanded preview source, in ``paper/_preview``) → ``index.typ`` → ``index.pdf``."""
    import pypandoc
    import typst

    fmt = typst_format(paper_dir)
    out_dir = markdown.parent
    header = out_dir / "header.typ"
    header.write_text((fmt.get("include-in-header") or {}).get("text", ""))
    # paths in the markdown are relative to paper/; Typst resolves them from the .typ file's folder
    source = out_dir / "index-typst.md"
    text = re.sub(r"\]\((_generated/)", r"](../\1", markdown.read_text())
    # Typst numbers its figures and tables itself: drop the preview's "Figure 3: " / "Table 4: "
    text = re.sub(r"^(: |!\[)(?:Figure|Table) \d+: ", r"\1", text, flags=re.M)
    source.write_text(text)
    variables = [f"papersize={fmt.get('papersize', 'a4')}", f"fontsize={fmt.get('fontsize', '10pt')}"]
    variables += [f"margin.{k}={v}" for k, v in (fmt.get("margin") or {}).items()]
    typ = out_dir / "index.typ"
    cmd = [pypandoc.get_pandoc_path(), source.name, "--from", "markdown", "--to", "typst", "--standalone",
           "--resource-path", "..", *[o.replace("--bibliography=", "--bibliography=../") for o in
                                      pandoc_options(paper_dir, "typst")],
           "--include-in-header", header.name, *[a for v in variables for a in ("-V", v)], "-o", typ.name]
    result = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
    if result.returncode != 0:
        raise _user_error(f"pandoc (typst) failed ({' '.join(cmd)}):\n{result.stderr.strip()}")
    (out_dir / "typst-warnings.txt").write_text(result.stderr)
    pdf = out_dir / "index.pdf"
    try:
        typst.compile(str(typ), output=str(pdf), root=str(paper_dir))
    except Exception as err:  # noqa: BLE001 - typst raises its own error types; the message is the finding
        raise _user_error(f"typst could not compile {typ}: {err}") from err
    return pdf


def check_pdf(paper_dir: Path, pdf: Path, notes: list[str] | None = None) -> list[str]:
    """Problems of the PDF preview: text outside the page's text area (a table that does not
    fit, or cut off), an unresolved citation, an unresolved cross reference, pandoc warnings."""
    notes = [] if notes is None else notes
    if not pdf.is_file():
        return [f"missing PDF preview: {pdf} (run `prefnb paper --engine pandoc` with the `paper` extra)"]
    if not shutil.which("pdftotext"):
        return ["pdftotext not found: the PDF cannot be checked (apt-get install poppler-utils)"]
    margin = typst_format(paper_dir).get("margin") or {}
    mx, my = _length_pt(margin.get("x", "2cm")), _length_pt(margin.get("y", "2cm"))
    html = subprocess.run(["pdftotext", "-bbox", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    problems, pages = [], re.findall(r'<page width="([\d.]+)" height="([\d.]+)">(.*?)</page>', html, re.S)
    for number, (width, height, body) in enumerate(pages, 1):
        words = [(*map(float, box), word) for *box, word in re.findall(
            r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">(.*?)</word>', body)]
        for x0, y0, x1, y1, word in words:
            # 2 pt of slack: glyph boxes overhang their advance a little
            if x1 > float(width) - mx + 2 or x0 < mx - 2 or y1 > float(height) - my / 2:
                problems.append(f"{pdf} page {number}: {word!r} lies outside the text area (a table or line too "
                                "wide, or cut off)")
        # a word running into its neighbour: a table cell too narrow for an unbreakable word
        lines = sorted(words, key=lambda w: (round(w[1]), w[0]))
        for a, b in zip(lines, lines[1:]):
            # same line and font size (math glyph boxes differ in height), and more than a kerning apart
            if abs(a[1] - b[1]) < 0.5 and abs(a[3] - b[3]) < 0.5 and b[0] < a[2] - 1.5:
                problems.append(f"{pdf} page {number}: {a[4]!r} overlaps {b[4]!r} (a table column too narrow)")
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    cited = set(CITATION.findall((paper_dir / PAPER_FILE).read_text()))
    problems += [f"{pdf}: citation {key} printed unresolved" for key in sorted(cited) if key in text]
    unresolved = sorted(set(re.findall(r"\?(?:fig|tbl|sec)-[\w-]+", text)))
    problems += [f"{pdf}: unresolved cross reference {ref}" for ref in unresolved]
    warnings = pdf.parent / "typst-warnings.txt"
    problems += [f"pandoc (typst): {line}" for line in (warnings.read_text().splitlines() if warnings.is_file() else [])
                 if line.strip()]
    notes.append(f"{pdf}: {len(pages)} pages, every word inside the text area, {len(cited)} citation keys resolved"
                 if not problems else f"{pdf}: {len(pages)} pages checked")
    return problems

