"""report.html: one self-contained page that parses, embeds every figure of report.md, and
carries the tables and findings with their numbers."""

import base64
import os
import re
from html.parser import HTMLParser

import pytest

pytestmark = pytest.mark.slow  # one tiny report run: about 45 s of CPU
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from hesskit._src import report  # noqa: E402

TINY = [
    *("--model", "linear", "--steps", "4", "--every", "2", "--k", "2", "--subset", "60"),
    *("--batch-size", "8", "--fraction", "0.2", "--trace-probes", "30"),
    *("--density-runs", "2", "--density-iters", "20", "--optimizer", "adam", "--adam-probes", "8"),
]
VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Page(HTMLParser):
    """Collects the tags, the attributes that load resources, and the text; checks nesting."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.refs, self.tags = [], [], [], [], []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        for name in ("src", "href"):
            if name in attrs:
                self.refs.append(attrs[name])
        if tag == "img":
            self.images.append(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-html")
    args = report.parse_args(["report", *TINY, "--out", str(out)])
    rep = report.run_report(args, log=lambda line: None)
    with open(out / "report.html", encoding="utf-8") as fh:
        source = fh.read()
    parser = _Page()
    parser.feed(source)
    parser.close()
    return out, rep, source, parser


def test_page_parses_and_is_self_contained(page):
    _, _, source, parsed = page
    assert source.startswith("<!DOCTYPE html>")
    assert not parsed.errors and not parsed.stack, (parsed.errors, parsed.stack)
    assert {"html", "head", "body", "table", "img"} <= set(parsed.tags)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    # Nothing loads from outside the file: every reference is an embedded data: URI.
    assert parsed.refs and all(r.startswith("data:image/png;base64,") for r in parsed.refs)
    assert not re.search(r"url\(\s*['\"]?(?!data:)", source)


def test_every_figure_of_the_markdown_is_embedded(page):
    out, _, _, parsed = page
    with open(out / "report.md", encoding="utf-8") as fh:
        figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", fh.read())
    assert len(figures) == 7  # loss, tracks, density, two directional, steps, adam
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in parsed.images}
    assert len(parsed.images) == len(figures)
    for fig in figures:
        with open(os.path.join(out, fig), "rb") as fh:
            assert fh.read() in embedded, fig
    assert all(img.get("alt") for img in parsed.images)


def test_tables_findings_and_guide_carry_the_numbers(page):
    _, rep, _, parsed = page
    text = " ".join(" ".join(parsed.text).split())
    assert "How to read this" in text
    res = rep["models"][0]
    for c in res["checkpoints"]:
        assert report._fmt(c["lambda_max"]) in text and report._fmt(c["lambda_min"]) in text
    for line in report._findings(res):
        assert " ".join(line.removeprefix("- ").split()) in text
    # checkpoints, directions, and Adam's per-checkpoint and per-layer tables
    assert parsed.tags.count("table") == 4
    assert res["final"]["classification"] in text
    assert "Adam against the Hessian" in text and "4 Adam steps" in text
    # Adam trains the report's model here: the section reads the training run's own state.
    adam = res["adam"]
    assert adam["run"] == "the training run" and [c["step"] for c in adam["checkpoints"]] == [2, 4]
    for line in report._adam_findings(adam):
        assert " ".join(line.removeprefix("- ").split()) in text
