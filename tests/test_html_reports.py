"""The HTML pages people look at: the run report, the experiment table and `diffinf ledger
--html` embed every picture as a base64 PNG (one self-contained file each) and hold each named
plot. Built from benchmarks/html_check.py's hand-made samples; no browser needed (that script
also renders the pages headless when chromium is installed)."""

from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import pytest

from diffinf_ray.render import page_images

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# page -> the alt text of every picture it must embed
NAMED = {
    "run_report": ["score histogram", "precision at k", "young", "middle", "old",
                   "gate accepted", "gate rejected"],
    "experiment": ["Detection: precision@k per detector",
                   "Accuracy and paired differences per treatment (95% t intervals over "
                   "seeds): age",
                   "Accuracy and paired differences per treatment (95% t intervals over "
                   "seeds): age, best-validation checkpoint", "Accuracy vs noise rate",
                   "Before/after edits, age, label young (seed 0)"],
    "ledger": ["paired differences: diffinf - noisy"],
}


def _html_check():
    spec = importlib.util.spec_from_file_location("html_check", BENCHMARKS / "html_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return _html_check().build_samples(tmp_path_factory.mktemp("html"))


def _decoded_pngs(page: str) -> dict[str, tuple[int, int]]:
    """{alt: (width, height)} of the page's images; fails on any that is not an embedded PNG."""
    from PIL import Image

    sizes = {}
    for alt, src in page_images(page):
        assert src.startswith("data:image/png;base64,"), f"{alt}: not embedded: {src[:60]}"
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 0, alt
        sizes[alt] = image.size
    return sizes


@pytest.mark.parametrize("name", sorted(NAMED))
def test_every_picture_is_an_embedded_png_and_each_named_plot_is_there(samples, name):
    page = samples[name].read_text()
    sizes = _decoded_pngs(page)
    assert sorted(sizes) == sorted(NAMED[name])
    assert "src='data:" in page and "src=\"" not in page  # nothing linked by file name
    problems = _html_check().image_problems(page)[1]
    assert problems == []


def test_the_check_names_a_linked_or_broken_image():
    check = _html_check()
    good_png = base64.b64encode(_png()).decode()
    page = (f"<img alt='ok' src='data:image/png;base64,{good_png}'>"
            "<img alt='linked' src='grid_young.png'>"
            "<img alt='junk' src='data:image/png;base64,aGVsbG8='>")
    good, problems = check.image_problems(page)
    assert good == [("ok", (4, 3))]
    assert problems[0].startswith("linked: not embedded")
    assert problems[1].startswith("junk: does not decode")
    with pytest.raises(AssertionError, match="linked: not embedded"):
        _decoded_pngs(page)


def test_the_ledger_command_writes_the_page(tmp_path, capsys):
    from diffinf_ray.cli import main

    ledger = Path(__file__).resolve().parents[1] / "benchmarks" / "ledger"
    page = tmp_path / "out" / "ledger.html"
    assert main(["ledger", "--ledger", str(ledger), "--a", "diffinf", "--b", "noisy",
                 "--html", str(page)]) == 0
    assert f"written to {page}" in capsys.readouterr().out
    text = page.read_text()
    assert list(_decoded_pngs(text)) == ["paired differences: diffinf - noisy"]
    assert "<td>#1</td>" in text


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()
