"""`prefnb paper` and `prefnb verify`: the Quarto paper rendered from the study's outputs.

`prefnb paper` builds the report (:func:`prefnb.report.build_report`), copies its generated
inputs into the Quarto project (``paper/_generated/`` and ``paper/_variables.yml``; both
gitignored), then renders:

- with Quarto where it is on PATH (``paper/_output/``), else
- with pandoc (``paper/_preview/``), for which this module does what Quarto would: the shortcodes
  (``{{< include >}}``, ``{{< var >}}``), conditional content and cross references.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from prefnb.project import outputs_dir
from prefnb.project import paper_dir as default_paper_dir  # the project's paper/, found from the working directory

log = logging.getLogger(__name__)

PAPER_FILE = "index.qmd"
GENERATED = "_generated"
VARIABLES = "_variables.yml"
PREVIEW = "_preview"  # the pandoc preview's folder in paper/
OUTPUTS_ENV = "PREFNB_OUTPUTS"  # the outputs a `quarto render` run by `prefnb paper` verifies against
BANNER = "Preview rendered with pandoc; render with Quarto for the publication version"
INCLUDE = re.compile(r"\{\{<\s*include\s+(\S+)\s*>\}\}")
VAR = re.compile(r"\{\{<\s*var\s+([\w.\-]+)\s*>\}\}")
IMAGE = re.compile(r"!\[(?P<caption>[^\]]*)\]\((?P<path>[^)\s]+)\)(?P<attrs>\{[^}]*\})?")
FIG_ID = re.compile(r"#(fig-[\w-]+)")
TABLE_CAPTION = re.compile(r"^: (?P<caption>.*?)[ \t]*\{#(?P<id>tbl-[\w-]+)\}[ \t]*$", re.M)
SEC_HEADER = re.compile(r"^#+[ \t]+(?P<title>.*?)[ \t]*\{#(?P<id>sec-[\w-]+)[^}]*\}[ \t]*$", re.M)
CROSSREF = re.compile(r"@((?:fig|tbl|sec)-[\w-]*\w)")
REF_DIV = re.compile(r"^:{3,}[ \t]*\{#((?:fig|tbl)-[\w-]+)\}[ \t]*$", re.M)
DIV_OPEN = re.compile(r"^:{3,}[ \t]*\{(?P<attrs>[^}]*)\}[ \t]*$")
DIV_CLOSE = re.compile(r"^:{3,}[ \t]*$")
CONDITION = re.compile(r"\.content-(?P<kind>visible|hidden)\b.*?\bwhen-meta=\"(?P<key>[\w.\-]+)\"")


def _user_error(message: str) -> Exception:
    from prefnb.cli import UserError  # here, not at the top: prefnb.cli imports this module

    return UserError(message)


def _yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


# --- generated inputs: outputs/report → paper/
def _destination(paper_dir: Path, rel: str) -> Path:
    return paper_dir / VARIABLES if rel == VARIABLES else paper_dir / GENERATED / rel


def sync_generated(outputs: Path, paper_dir: Path, files: dict[str, str]) -> None:
    """Replace paper/_generated and paper/_variables.yml by this build's files and figures."""
    gen = paper_dir / GENERATED
    if gen.exists():
        shutil.rmtree(gen)
    for rel, text in files.items():
        dest = _destination(paper_dir, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
    figures = outputs / "report" / "figures"
    if figures.is_dir():
        shutil.copytree(figures, gen / "figures", dirs_exist_ok=True)


# --- shortcodes and cross references (what Quarto does, for the pandoc preview and verify)
def expand(text: str, paper_dir: Path, variables: dict, problems: list[str], depth: int = 0) -> str:
    """Inline ``{{< include >}}`` files and substitute ``{{< var >}}`` values; note what is missing."""
    def include(m: re.Match) -> str:
        path = paper_dir / m.group(1)
        if not path.is_file():
            problems.append(f"missing include: {path}")
            return f"**[missing: {m.group(1)}]**"
        if depth > 5:
            problems.append(f"includes nested too deep at {path}")
            return ""
        return expand(path.read_text(), paper_dir, variables, problems, depth + 1)

    def var(m: re.Match) -> str:
        value: Any = variables
        for part in m.group(1).split("."):  # a dotted key: a nested value
            if not isinstance(value, dict) or part not in value:
                problems.append(f"missing variable: {m.group(1)} (not in {VARIABLES})")
                return f"?{m.group(1)}"
            value = value[part]
        return str(value).lower() if isinstance(value, bool) else str(value)

    text = VAR.sub(var, INCLUDE.sub(include, text))
    return conditional(text, metadata(paper_dir), problems) if depth == 0 else text


def expand_paper(paper_dir: Path, problems: list[str]) -> str:
    """The paper's index.qmd, expanded with the variables of its _variables.yml."""
    return expand((paper_dir / PAPER_FILE).read_text(), paper_dir, _yaml(paper_dir / VARIABLES), problems)


def metadata(paper_dir: Path) -> dict:
    """The document metadata of _quarto.yml's ``metadata-files`` (the generated ``metadata.yml``:
    which experiments these outputs hold), merged in order as Quarto does."""
    meta: dict = {}
    for name in quarto_config(paper_dir).get("metadata-files") or []:
        meta.update(_yaml(paper_dir / name))
    return meta


def conditional(text: str, meta: dict, problems: list[str]) -> str:
    """Quarto's conditional content on metadata, for the preview and verify: a fenced div
    ``::: {.content-visible when-meta="key"}`` keeps its lines when ``key`` is true, and
    ``.content-hidden`` when it is false (quarto.org/docs/authoring/conditional.html). A key that
    is not in the metadata is noted (Quarto would read it as false, silently)."""
    out, stack = [], []  # stack: per open div, whether its content is kept (None: not a condition)
    for line in text.split("\n"):
        opened = DIV_OPEN.match(line)
        condition = opened and CONDITION.search(opened.group("attrs"))
        if condition:
            key = condition.group("key")
            if key not in meta:
                problems.append(f"missing metadata: {key} (a when-meta condition; not in metadata-files)")
            stack.append(bool(meta.get(key)) == (condition.group("kind") == "visible"))
            continue
        if opened:
            stack.append(None)
        elif DIV_CLOSE.match(line) and stack and stack.pop() is not None:
            continue
        if all(keep is not False for keep in stack):
            out.append(line)
    return "\n".join(out)


def referenced_images(text: str) -> list[str]:
    return [m.group("path") for m in IMAGE.finditer(text) if not m.group("path").startswith(("http:", "https:"))]


def _definitions(text: str) -> list[tuple[int, str]]:
    """(position, id) of every figure and table an expanded paper defines: images and captioned
    tables with an id, and cross-reference divs (``::: {#fig-…}``, Quarto's figure or table of
    any content)."""
    found = [(m.start(), i) for m in IMAGE.finditer(text) for i in FIG_ID.findall(m.group("attrs") or "")[:1]]
    found += [(m.start(), m.group("id")) for m in TABLE_CAPTION.finditer(text)]
    return sorted(found + [(m.start(), m.group(1)) for m in REF_DIV.finditer(text)])


def number_crossrefs(text: str) -> str:
    """Quarto-style figure/table numbering and @fig-/@tbl-/@sec- references, for plain pandoc."""
    labels: dict[str, str] = {}
    for _, ref in _definitions(text):  # numbered in document order, per kind
        kind = "Figure" if ref.startswith("fig-") else "Table"
        labels[ref] = f"{kind} {sum(k.startswith(ref[:4]) for k in labels) + 1}"

    def figure(m: re.Match) -> str:
        ids = FIG_ID.findall(m.group("attrs") or "")
        return f"![{labels[ids[0]]}: {m.group('caption')}]({m.group('path')}){m.group('attrs')}" if ids else m.group(0)

    def table(m: re.Match) -> str:
        return f": {labels[m.group('id')]}: {m.group('caption')} []{{#{m.group('id')}}}"

    text = TABLE_CAPTION.sub(table, IMAGE.sub(figure, text))
    for m in SEC_HEADER.finditer(text):
        labels[m.group("id")] = m.group("title")
    return CROSSREF.sub(lambda m: f"[{labels[m.group(1)]}](#{m.group(1)})" if m.group(1) in labels
                        else f"?{m.group(1)}", text)


# --- rendering
PREVIEW_CSS = """<style>
body { max-width: 60em; margin: 0 auto; padding: 1em 2em; font-family: system-ui, sans-serif; line-height: 1.5; }
.preview-banner { background: #fff3cd; border: 2px solid #e0a800; padding: .6em 1em; margin: 1em 0;
  font-weight: 600; border-radius: 4px; }
img { max-width: 100%; height: auto; }
figure { margin: 1.5em 0; } figcaption { font-size: .92em; color: #333; }
table { border-collapse: collapse; margin: 1em 0; font-size: .85em; display: block; overflow-x: auto; }
th, td { border-bottom: 1px solid #ccc; padding: .2em .6em; text-align: left; }
caption { caption-side: top; font-size: .92em; text-align: left; padding-bottom: .3em; }
div[class*="callout"] { border-left: 5px solid #0d6efd; background: #f1f6ff; padding: .5em 1em; margin: 1em 0; }
div.callout-warning { border-left-color: #e0a800; background: #fff8e1; }
div[class*="callout"][title]::before { content: attr(title); display: block; font-weight: 700; }
</style>
"""


def quarto_config(paper_dir: Path) -> dict:
    return _yaml(paper_dir / "_quarto.yml")


def pandoc_options(paper_dir: Path, fmt: str) -> list[str]:
    """The pandoc options that _quarto.yml's settings (top level, then ``format: <fmt>:``) mean,
    so that the preview and Quarto read one configuration."""
    config = quarto_config(paper_dir)
    config = {**config, **((config.get("format") or {}).get(fmt) or {})}
    bibliography = config.get("bibliography") or []
    options = [f"--bibliography={b}" for b in ([bibliography] if isinstance(bibliography, str) else bibliography)]
    options += ["--citeproc"] if options and config.get("citeproc", True) else []
    options += [f"--csl={config['csl']}"] if config.get("csl") else []
    options += ["--toc"] if config.get("toc") else []
    options += ["--number-sections"] if config.get("number-sections") else []
    options += ["--mathml"] if config.get("html-math-method") == "mathml" else []
    options += ["--metadata", f"link-citations={str(bool(config.get('link-citations'))).lower()}"]
    return options


def render_preview(paper_dir: Path, pandoc: str) -> Path:
    """HTML preview with pandoc: shortcodes and cross references expanded here first."""
    problems: list[str] = []
    text = number_crossrefs(expand_paper(paper_dir, problems))
    for p in problems:
        log.warning("preview: %s", p)
    out_dir = paper_dir / PREVIEW
    out_dir.mkdir(exist_ok=True)
    (out_dir / "index.md").write_text(text)
    (out_dir / "header.html").write_text(PREVIEW_CSS)
    (out_dir / "banner.html").write_text(f'<div class="preview-banner">{BANNER} (<code>quarto render paper</code>; '
                                         "see the README).</div>\n")
    version = subprocess.run([pandoc, "--version"], capture_output=True, text=True).stdout.split()[1]
    embed = "--embed-resources" if tuple(map(int, re.findall(r"\d+", version)[:2])) >= (2, 19) else "--self-contained"
    cmd = [pandoc, f"{PREVIEW}/index.md", "--from", "markdown", "--to", "html5", "--standalone", embed,
           "--resource-path", ".", *pandoc_options(paper_dir, "html"), "-H", f"{PREVIEW}/header.html",
           "--include-before-body", f"{PREVIEW}/banner.html", "-o", f"{PREVIEW}/index.html"]
    result = subprocess.run(cmd, cwd=paper_dir, capture_output=True, text=True)
    if result.returncode != 0:
        raise _user_error(f"pandoc failed ({' '.join(cmd)}):\n{result.stderr.strip()}")
    for line in result.stderr.strip().splitlines():
        log.warning("pandoc: %s", line)
    return out_dir / "index.html"


def renderer(engine: str = "auto") -> tuple[str, str]:
    """("quarto" | "pandoc", executable), or a one-line error saying what to install."""
    quarto, pandoc = shutil.which("quarto"), shutil.which("pandoc")
    if engine in ("auto", "quarto") and quarto:
        return "quarto", quarto
    if engine == "quarto":
        raise _user_error("quarto not found on PATH: install Quarto (https://quarto.org, or "
                          "`conda install -c conda-forge quarto`)")
    if pandoc:
        return "pandoc", pandoc
    raise _user_error("neither quarto nor pandoc is on PATH: install Quarto (https://quarto.org, or `conda install "
                      "-c conda-forge quarto`) for the paper, or pandoc (`apt-get install pandoc`) for an HTML preview")


def render(paper_dir: Path, engine: str = "auto", outputs: Path | None = None) -> list[Path]:
    """Quarto's HTML and PDF; or the pandoc HTML preview, and its Typst PDF where the `paper` extra is installed."""
    kind, exe = renderer(engine)
    if kind == "pandoc":
        from prefnb import paper_pdf

        html, missing = render_preview(paper_dir, exe), paper_pdf.available()
        if missing:
            log.warning("no PDF preview: %s", missing)
            return [html]
        return [html, paper_pdf.render_pdf(paper_dir, html.with_suffix(".md"))]
    # _quarto.yml's pre-render runs `prefnb verify`: tell it which outputs these inputs came from
    env = {**os.environ, OUTPUTS_ENV: str(Path(outputs).resolve())} if outputs else None
    result = subprocess.run([exe, "render", str(paper_dir)], env=env)
    if result.returncode != 0:
        raise _user_error(f"`quarto render {paper_dir}` failed (exit {result.returncode}); see its output above")
    return sorted(p for p in (paper_dir / "_output").glob("index.*") if p.suffix in (".html", ".pdf"))


def _paper_dir(paper_dir: str | Path | None) -> Path:
    return Path(paper_dir) if paper_dir else default_paper_dir()


def build_paper(outputs: str | Path | None = None, paper_dir: str | Path | None = None, *, engine: str = "auto",
                render_output: bool = True, figures: bool = True) -> list[Path]:
    """Build the report, copy its inputs into the paper, render. Returns the rendered files.

    ``figures=False`` (tests) redraws no figure and keeps those of the last build."""
    from prefnb.report import _build

    outputs, paper_dir = Path(outputs or outputs_dir()), _paper_dir(paper_dir)
    if not (paper_dir / PAPER_FILE).is_file():
        raise _user_error(f"{paper_dir / PAPER_FILE} not found: pass --paper DIR (the Quarto project)")
    if render_output:
        renderer(engine)  # fail before the work when nothing can render
    files, _ = _build(outputs, figures=figures)
    sync_generated(outputs, paper_dir, files)
    return render(paper_dir, engine, outputs) if render_output else []


# --- verify
def verify(outputs: str | Path | None = None, paper_dir: str | Path | None = None) -> list[str]:
    """Problems that make the paper stale or incomplete (empty list: it is up to date)."""
    from prefnb.report import build_text_artifacts, collect_runs

    outputs, paper_dir = Path(outputs or outputs_dir()), _paper_dir(paper_dir)
    problems: list[str] = []
    fresh = build_text_artifacts(collect_runs(outputs, save=False))
    for rel, text in fresh.items():
        dest = _destination(paper_dir, rel)
        if not dest.is_file():
            problems.append(f"missing generated input: {dest}")
        elif dest.read_text() != text:
            problems.append(f"stale: {dest} differs from a fresh rebuild from {outputs}")
    gen = paper_dir / GENERATED
    problems += [f"stale: {path} is no longer produced by the outputs"
                 for path in sorted(gen.glob("*/*.md")) + sorted(gen.glob("*/*.csv"))
                 if path.relative_to(gen).as_posix() not in fresh]
    qmd = paper_dir / PAPER_FILE
    if not qmd.is_file():
        return problems + [f"missing: {qmd}"]
    text = expand_paper(paper_dir, problems)
    images = [paper_dir / image for image in referenced_images(text)]
    problems += [f"missing figure: {path}" for path in images if not path.is_file() or path.stat().st_size == 0]
    # Quarto renders a reference to an id nobody defines as "?@fig-…" with only a warning
    defined = {ref for _, ref in _definitions(text)} | {m.group("id") for m in SEC_HEADER.finditer(text)}
    problems += [f"unresolved cross-reference: @{ref} ({qmd.name} refers to it; no figure, table or section of "
                 "the generated inputs defines it)"
                 for ref in dict.fromkeys(CROSSREF.findall(text)) if ref not in defined]
    return problems


def check_html(paper_dir: Path, html: Path | None = None, notes: list[str] | None = None) -> list[str]:
    """Problems of a rendered HTML paper: a figure or table of the paper missing, an image that
    does not decode or (where Chromium is installed) does not load in headless Chromium.
    What was checked is appended to ``notes``."""
    import base64
    import io

    from PIL import Image

    notes = [] if notes is None else notes
    preview = paper_dir / PREVIEW / "index.html"
    if html is None:
        html = next((p for p in (paper_dir / "_output" / "index.html", preview) if p.is_file()), preview)
    if not html.is_file():
        return [f"missing rendered paper: {html} (run `prefnb paper`)"]
    page, problems = html.read_text(), []
    text = expand_paper(paper_dir, problems)
    ids = [ref for _, ref in _definitions(text)]
    problems += [f"{html}: no element with id {i}" for i in ids if f'id="{i}"' not in page]
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', page)
    if len(srcs) < len(referenced_images(text)):
        problems.append(f"{html}: {len(srcs)} images for {len(referenced_images(text))} figures")
    for src in srcs:
        try:
            data = (base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:")
                    else (html.parent / src).read_bytes())
            Image.open(io.BytesIO(data)).verify()
        except Exception as err:  # noqa: BLE001 - any failure to read or decode is the finding
            problems.append(f"{html}: image {src[:60]}… does not decode ({err})")
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    notes.append(f"{html}: {len(ids)} figures and tables found, {len(srcs)} images decode")
    if not browser:
        notes.append("Chromium not found: images were not loaded in a browser (apt-get install chromium)")
    if browser and srcs:
        probe = ("<script>window.addEventListener('load', () => { const i = [...document.images]; document.body"
                 ".setAttribute('data-images', i.filter(x => x.complete && x.naturalWidth > 0).length + '/' + i.length)"
                 "; });</script>")
        probe_page = html.with_name(f".{html.stem}.check.html")
        probe_page.write_text(page.replace("</body>", probe + "</body>"))
        try:
            dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                                  "--dump-dom", probe_page.resolve().as_uri()], capture_output=True, text=True,
                                 timeout=180).stdout
        finally:
            probe_page.unlink(missing_ok=True)
        m = re.search(r'data-images="(\d+)/(\d+)"', dom)
        if not m or m.group(1) != m.group(2) or int(m.group(2)) != len(srcs):
            problems.append(f"{html}: images loaded in Chromium: {m.group(0) if m else 'probe did not run'}")
        else:
            notes.append(f"headless Chromium loaded {m.group(1)}/{m.group(2)} images")
    return problems


# --- command line
def require_runs(outputs: Path) -> None:
    """`paper` and `verify` need finished runs: say so, rather than build or pass a paper of nothing."""
    from prefnb.rundir import MARKER

    if not outputs.is_dir():
        raise _user_error(f"no outputs folder at {outputs}: run `prefnb study` first (or pass --outputs DIR)")
    if not any(p.parent.parent.name != "report" for p in outputs.glob(f"*/*/{MARKER}")):
        raise _user_error(f"no finished runs under {outputs}: run `prefnb study` first (or pass --outputs DIR)")


def cmd_paper(args: argparse.Namespace) -> int:
    from prefnb.preflight import check_writable

    outputs, paper_dir = Path(args.outputs or outputs_dir()), _paper_dir(args.paper)
    require_runs(outputs)
    check_writable(outputs / "report", "--outputs")
    check_writable(paper_dir / GENERATED, "--paper")
    files = build_paper(outputs, paper_dir, engine=args.engine, render_output=not args.no_render)
    print(f"paper inputs: {paper_dir / GENERATED}/ and {paper_dir / VARIABLES} "
          f"(from {args.outputs or outputs_dir()}/report/)")
    for f in files:
        print(f"rendered: {f}")
    if any(f.parent.name == PREVIEW for f in files):
        print(f"note: {BANNER.lower()} (Quarto was not found on PATH)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    outputs = Path(args.outputs or os.environ.get(OUTPUTS_ENV) or outputs_dir())
    require_runs(outputs)
    paper_dir = _paper_dir(args.paper)
    problems, notes = verify(outputs, paper_dir), []
    if args.html is not None:
        problems += check_html(paper_dir, Path(args.html) if args.html else None, notes)
    if args.pdf is not None:
        from prefnb.paper_pdf import check_pdf

        problems += check_pdf(paper_dir, Path(args.pdf) if args.pdf else paper_dir / PREVIEW / "index.pdf", notes)
    if problems:
        print(f"prefnb verify: FAILED ({len(problems)} problem(s)); run `prefnb paper` to rebuild:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("prefnb verify: OK — the paper's generated inputs match a fresh rebuild from the outputs, and every "
          "figure, table and number it references exists")
    for note in notes:
        print(f"  {note}")
    return 0
