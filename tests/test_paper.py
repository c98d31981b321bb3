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
    assert rendered == [paper / "_preview" / "index.html"]
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
    for fig_id in re.findall(r"\{#(fig-[\w-]+)\}", text):
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
