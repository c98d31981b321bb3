"""`prefnb paper` (pandoc preview) and `prefnb verify` on a synthetic study.

The preview test needs pandoc and the browser test needs Chromium (both installed by .ci/run);
each is skipped with a reason where the tool is missing.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_report import make_fake_outputs

PAPER_SRC = Path(__file__).resolve().parent.parent / "paper"
needs_pandoc = pytest.mark.skipif(shutil.which("pandoc") is None,
                                  reason="pandoc not installed (apt-get install pandoc)")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A synthetic study and a copy of the paper project, with the paper's inputs built."""
    from prefnb.paper import build_paper

    root = tmp_path_factory.mktemp("paper")
    outputs = make_fake_outputs(root / "outputs")
    paper = root / "paper"
    paper.mkdir()
    for name in ("index.qmd", "_quarto.yml", "references.bib"):
        shutil.copy(PAPER_SRC / name, paper / name)
    rendered = build_paper(outputs, paper, engine="pandoc") if shutil.which("pandoc") else \
        build_paper(outputs, paper, render_output=False)
    return outputs, paper, rendered


def _expanded_qmd(paper: Path) -> str:
    import yaml

    from prefnb.paper import expand

    problems: list[str] = []
    text = expand((paper / "index.qmd").read_text(), paper, yaml.safe_load((paper / "_variables.yml").read_text()),
                  problems)
    assert problems == []
    return text


@needs_pandoc
def test_preview_holds_every_figure_table_section_and_citation(study):
    from PIL import Image

    from prefnb.paper import BANNER, TABLE_CAPTION, referenced_images

    _, paper, rendered = study
    assert rendered[0] == paper / "_preview" / "index.html"  # and index.pdf where the paper extra is installed
    html = rendered[0].read_text()
    text = _expanded_qmd(paper)
    assert BANNER in html
    images = referenced_images(text)
    assert len(images) == 6  # one per figure of the study
    srcs = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(srcs) == len(images)
    for src in srcs:  # every image is embedded and decodes
        assert src.startswith("data:image/png;base64,"), src[:40]
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        im.verify()
        assert im.size[0] > 100 and im.size[1] > 100
    fig_ids = re.findall(r"\{#(fig-[\w-]+)[ }]", text)  # {#fig-x fig-alt="…"}
    assert len(fig_ids) == 6
    for fig_id in fig_ids:
        assert f'id="{fig_id}"' in html, fig_id
    tables = [m.group("id") for m in TABLE_CAPTION.finditer(text)]
    assert len(tables) >= 15 and "tbl-effects" in tables
    for tbl in tables:
        assert f'id="{tbl}"' in html, tbl
    assert html.count("<table") >= len(tables)
    for section in ("Introduction", "Methods", "Results", "Limitations", "References"):
        assert re.search(rf"<h1[^>]*>.*{section}", html), section
    flat = " ".join(html.split())
    assert "Rafailov" in flat and "Understanding Reference Policies" in flat and "???" not in flat
    assert "?var" not in html and "?fig-" not in html and "?tbl-" not in html and "{{&lt;" not in html
    assert "a check of the pipeline, not findings" in html


@needs_pandoc
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_every_image_loads_in_headless_chromium(study, tmp_path):
    from PIL import Image

    from prefnb.paper import check_html

    _, paper, rendered = study
    assert check_html(paper, rendered[0]) == []  # includes the in-browser img.complete && naturalWidth check
    broken = tmp_path / "broken.html"
    broken.write_text(rendered[0].read_text().replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    assert any("does not decode" in p for p in check_html(paper, broken))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,3000",
                    f"--screenshot={shot}", rendered[0].as_uri()], capture_output=True, timeout=120)
    im = Image.open(shot).convert("L")
    assert im.size == (1200, 3000) and im.getextrema()[0] < 100  # something dark (text) was drawn


def test_no_renderer_gives_one_clear_error(study, monkeypatch):
    import prefnb.paper
    from prefnb.cli import UserError

    _, paper, _ = study
    monkeypatch.setattr(prefnb.paper.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="install Quarto .* or pandoc"):
        prefnb.paper.render(paper)


def test_verify_passes_then_fails_after_a_metrics_change_until_paper_reruns(study, capsys):
    from prefnb.cli import main
    from prefnb.paper import build_paper, verify

    outputs, paper, _ = study
    assert verify(outputs, paper) == []
    assert main(["verify", "--outputs", str(outputs), "--paper", str(paper)]) == 0

    metrics_path = next((outputs / "03_staged").glob("*/metrics.json"))
    original = metrics_path.read_text()
    metrics = json.loads(original)
    metrics["test/accuracy" if "test/accuracy" in metrics else "test/chrf"] += 0.25
    metrics_path.write_text(json.dumps(metrics))
    try:
        problems = verify(outputs, paper)
        assert any("runs.csv" in p for p in problems) and any("tables/03_staged" in p for p in problems)
        capsys.readouterr()
        assert main(["verify", "--outputs", str(outputs), "--paper", str(paper)]) == 1
        assert "stale" in capsys.readouterr().err
        build_paper(outputs, paper, render_output=False, figures=False)  # `prefnb paper` again
        assert verify(outputs, paper) == []
    finally:
        metrics_path.write_text(original)
    build_paper(outputs, paper, render_output=False, figures=False)

    figure = paper / "_generated" / "figures" / "beta.png"
    figure.unlink()
    assert any("missing figure" in p and "beta.png" in p for p in verify(outputs, paper))
    (paper / "_generated" / "tables" / "effects.md").unlink()
    assert any("effects.md" in p for p in verify(outputs, paper))


def test_verify_fails_on_a_cross_reference_the_generated_files_do_not_define(study):
    from prefnb.paper import build_paper, verify

    outputs, paper, _ = study
    build_paper(outputs, paper, render_output=False, figures=False)  # an earlier test removed some inputs
    qmd = paper / "index.qmd"
    original = qmd.read_text()
    try:
        qmd.write_text(original.replace("@fig-methods compares", "@fig-not-drawn and @fig-methods compare", 1))
        problems = verify(outputs, paper)
        assert [p for p in problems if "cross-reference" in p] == [
            next(p for p in problems if "@fig-not-drawn" in p)]  # the defined @fig-methods is not reported
    finally:
        qmd.write_text(original)
    assert verify(outputs, paper) == []


def test_quarto_config_carries_the_typst_and_gitignore_fixes():
    import yaml

    config = yaml.safe_load((PAPER_SRC / "_quarto.yml").read_text())
    typst = config["format"]["typst"]
    assert typst["citeproc"] is True
    assert "#show figure: set block(breakable: true)" in typst["include-in-header"]["text"]
    assert config["project"]["pre-render"].split()[:2] == ["prefnb", "verify"]
    lines = (PAPER_SRC / ".gitignore").read_text().splitlines()
    assert "/.quarto/" in lines and "**/*.quarto_ipynb" in lines  # verbatim, or quarto render rewrites the file


def test_preview_options_come_from_quarto_yml(tmp_path):
    from prefnb.paper import pandoc_options

    (tmp_path / "_quarto.yml").write_text("bibliography: refs.bib\ntoc: false\nnumber-sections: true\ncsl: x.csl\n"
                                          "format: {html: {html-math-method: mathml}, typst: {citeproc: false}}\n")
    html = pandoc_options(tmp_path, "html")
    assert "--toc" not in html and "--number-sections" in html and "--mathml" in html
    assert "--bibliography=refs.bib" in html and "--citeproc" in html and "--csl=x.csl" in html
    assert "--citeproc" not in pandoc_options(tmp_path, "typst")


def test_verify_reads_the_outputs_prefnb_paper_passed_to_quarto(study, monkeypatch, capsys):
    from prefnb.cli import main
    from prefnb.paper import OUTPUTS_ENV

    outputs, paper, _ = study
    monkeypatch.chdir(paper)  # as Quarto runs the pre-render: in the paper folder
    monkeypatch.setenv(OUTPUTS_ENV, str(outputs))
    assert main(["verify", "--paper", "."]) == 0


def test_findings_table_rows_and_verdicts_come_from_the_outputs(study):
    _, paper, _ = study
    findings = (paper / "_generated" / "tables" / "findings.md").read_text()
    assert "{#tbl-findings}" in findings
    for comparison in ("SFT − majority class", "staged (SFT→DPO) − SFT", "DPO alone − SFT", "LoRA − FFT",
                       "(reward, reference, β): best", "objective, after SFT: best", "objective, no SFT: best",
                       "objective, instruction-tuned start: best", "(SFT objective, learning rate) → DPO: best"):
        assert comparison in findings, comparison
    assert "resolved at 2 seeds" in findings
    methods = (paper / "_generated" / "tables" / "q-methods.md").read_text()
    assert "| paraphrase | majority class | untrained |" in methods  # the floor leads the question's table
    text = _expanded_qmd(paper)
    abstract = text.split("---", 2)[1]
    assert not re.search(r"\b(two|three|four|five|six|seven|eight|nine)\b", abstract)  # design facts are variables


needs_pdf = pytest.mark.skipif(__import__("prefnb.paper_pdf", fromlist=["available"]).available() is not None
                               or shutil.which("pdftotext") is None,
                               reason="the PDF preview needs the paper extra (pypandoc-binary, typst) and pdftotext")


@needs_pandoc
@needs_pdf
def test_pdf_preview_fits_every_table_and_resolves_every_citation(study, tmp_path):
    from prefnb.paper_pdf import check_pdf, render_pdf

    _, paper, rendered = study
    pdf = paper / "_preview" / "index.pdf"
    assert pdf in rendered
    notes: list[str] = []
    assert check_pdf(paper, pdf, notes) == [] and "citation keys resolved" in notes[0]
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
    assert "Rafailov" in text and "Appendix" in text
    # a table too wide for the page is found
    wide = tmp_path / "wide"
    shutil.copytree(paper, wide)
    md = wide / "_preview" / "index.md"
    md.write_text(md.read_text() + "\n\n| " + " | ".join(f"column{i}_" + "w" * 12 for i in range(12)) + " |\n|"
                  + "---|" * 12 + "\n| " + " | ".join(["x" * 20] * 12) + " |\n")
    assert any("outside the text area" in p for p in check_pdf(wide, render_pdf(wide, md)))


def test_conditional_content_keeps_what_the_metadata_says_as_quarto_does():
    from prefnb.paper import conditional

    text = "\n".join(["a", '::: {.content-visible when-meta="ran_x"}', "shown", "::: {.callout-note}", "note",
                      ":::", ":::", '::: {.content-hidden when-meta="ran_x"}', "not run", ":::",
                      '::: {.content-visible when-meta="ran_y"}', "y", ":::", "b"])
    problems: list[str] = []
    assert conditional(text, {"ran_x": True, "ran_y": False}, problems).split("\n") == [
        "a", "shown", "::: {.callout-note}", "note", ":::", "b"]
    assert conditional(text, {"ran_x": False, "ran_y": True}, problems).split("\n") == ["a", "not run", "y", "b"]
    assert problems == []
    conditional(text, {"ran_x": True}, problems)  # Quarto would read a missing key as false, silently
    assert problems == ["missing metadata: ran_y (a when-meta condition; not in metadata-files)"]


def test_a_reduced_profile_paper_shows_one_line_for_each_experiment_it_leaves_out(tmp_path):
    """The laptop profile's shape: 01-03 on sonnets with LoRA only. Its paper names what it does
    not run (abstract, sections, findings caption) instead of sections full of n/a."""
    import random

    import yaml
    from test_report import _write_run

    from prefnb.paper import build_paper

    rng, outputs = random.Random(3), tmp_path / "outputs"
    for seed in (0, 1, 2):
        sft = _write_run(outputs, rng, experiment="01_sft", task="sonnets", lora_r=16, seed=seed, group="sft")
        _write_run(outputs, rng, experiment="02_dpo", task="sonnets", lora_r=16, seed=seed, objective="dpo",
                   group="dpo")
        _write_run(outputs, rng, experiment="03_staged", task="sonnets", lora_r=16, seed=seed, objective="dpo",
                   init_from=str(sft), group="staged")
    paper = tmp_path / "paper"
    paper.mkdir()
    for name in ("index.qmd", "_quarto.yml", "references.bib"):
        shutil.copy(PAPER_SRC / name, paper / name)
    build_paper(outputs, paper, render_output=False)
    meta = yaml.safe_load((paper / "_generated" / "metadata.yml").read_text())
    assert meta["ran_03_staged"] and meta["ran_q1_sonnets"]
    assert not (meta["ran_04_reference_strength"] or meta["ran_q1_paraphrase"] or meta["ran_lora_and_fft"])
    text = _expanded_qmd(paper)
    abstract = text.split("---", 2)[1]
    assert "We compare SFT, DPO alone and staged SFT→DPO on sonnets, with LoRA." in abstract
    assert "does not run `04_reference_strength`, `05_lora_vs_fft`, `06_dpo_variants`, `07_sft_objectives`" in abstract
    assert "`06_dpo_variants` did not run in these outputs" in text and "@fig-variants" not in text
    assert "n/a" not in text.split("# Discussion")[1].split("# Limitations")[0]
    assert "On sonnets, in the task metric: staged SFT→DPO minus SFT" in text and "On paraphrase, in" not in text
    findings = (paper / "_generated" / "tables" / "findings.md").read_text()
    assert "Not made from these runs" in findings and "Q2 (reward, reference, β) (paraphrase, sonnets)" in findings
