"""Tests of latexocr_tools.py: the formula normalizer and its command."""

import json
import os
import shutil
from pathlib import Path

import pytest

import latexocr as L
import latexocr_tools as T

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
SHARED = ROOT.parent / "shared" / "data" / "im2latex100k"

# (as a person writes it, as IM2LATEX-100K writes it)
NORMALIZED = [
    ("x^2", "x ^ { 2 }"),
    ("x^2_i", "x _ { i } ^ { 2 }"),  # subscript first, always
    ("x_{i}^{2}", "x _ { i } ^ { 2 }"),
    ("x^{{2}}", "x ^ { { 2 } }"),  # a group the writer braced stays a group
    ("\\frac12", "\\frac { 1 } { 2 }"),
    ("\\frac ab+\\tfrac{1}{x}", "\\frac { a } { b } + \\frac { 1 } { x }"),
    ("\\dfrac{\\partial f}{\\partial x}", "\\frac { \\partial f } { \\partial x }"),
    ("{a \\over b+c}", "{ \\frac { a } { b + c } }"),
    ("{n \\choose k}", "{ \\binom { n } { k } }"),
    ("x \\atop y", "x \\atop y"),
    ("\\sin^2 x+\\cos x", "\\operatorname { s i n } ^ { 2 } x + \\operatorname { c o s } x"),
    ("\\lim_{n\\to\\infty}a_n", "\\operatorname* { l i m } _ { n \\to \\infty } a _ { n }"),
    ("\\operatorname{sgn}(x)", "\\operatorname { s g n } ( x )"),
    ("\\det A", "\\operatorname* { d e t } A"),
    ("f'(x)+g''", "f ^ { \\prime } ( x ) + g ^ { \\prime \\prime }"),
    ("x'_1", "x _ { 1 } ^ { \\prime }"),
    ("x'^2", "x ^ { \\prime 2 }"),
    ("\\left( x \\right)^2", "\\left( x \\right) ^ { 2 }"),
    ("\\left \\{ x \\right.", "\\left\\{ x \\right."),
    ("\\left\\lvert x\\right\\rvert", "\\left| x \\right|"),
    ("\\big( x \\Bigr]", "\\big ( x \\Bigr ]"),
    ("\\begin{pmatrix} a & b \\\\ c & d \\end{pmatrix}",
     "\\left( \\begin{matrix} { a } & { b } \\\\ { c } & { d } \\\\ \\end{matrix} \\right)"),
    ("\\begin{array}{|c|l|} 1 & 2 \\\\ \\end{array}", "\\begin{array} { c l } { 1 } & { 2 } \\\\ \\end{array}"),
    ("\\begin{aligned} a &= b \\\\ c &= d \\end{aligned}",
     "\\begin{array} { r l } { a } & { = b } \\\\ { c } & { = d } \\\\ \\end{array}"),
    ("f(x)=\\begin{cases} 1 & x>0 \\\\ 0 & \\text{otherwise} \\end{cases}",
     "f ( x ) = \\begin{cases} { 1 } & { x > 0 } \\\\ { 0 } & { \\mathrm { o t h e r w i s e } } \\\\ \\end{cases}"),
    ("\\text{if } x", "\\mathrm { i f ~ } x"),
    ("\\mathrm{Tr}\\,M", "\\mathrm { T r } \\, M"),
    ("\\sqrt[3]{x}+\\sqrt2", "\\sqrt [ 3 ] { x } + \\sqrt { 2 }"),
    ("a\\hspace{1cm}b", "a \\hspace { 1 c m } b"),
    ("\\color{red} x+\\textcolor{blue}{y}", "x + y"),
    ("\\sum\\limits_{i=1}^n i", "\\sum _ { i = 1 } ^ { n } i"),
    ("123", "1 2 3"),
    ("\\alpha\\beta", "\\alpha \\beta"),
    ("a\\ b", "a \\ b"),
    ("\\boldsymbol{v}", "\\mathbf { v }"),
    ("\\not=", "\\not ="),
    ("\\overset{!}{=}", "\\stackrel { ! } { = }"),
    ("{}^{14}C", "{ } ^ { 1 4 } C"),
    ("a \\sp 2 \\sb 1", "a _ { 1 } ^ { 2 }"),
    ("{\\rm d}x", "{ \\rm d } x"),
]

REFUSED = [
    ("x^2^3", "double superscript"),
    ("x_1_2", "double subscript"),
    ("\\frac{1}", "missing argument"),
    ("{x", "unbalanced"),
    ("x}", "unbalanced"),
    ("\\left( x", "\\left without \\right"),
    ("x \\right)", "\\right without \\left"),
    ("a \\\\ b", "outside an array"),
    ("\\begin{tabular}{c} a \\end{tabular}", "environment tabular"),
    ("\\begin{array}{p{2cm}} a \\end{array}", "column layout"),
    ("x \\label{eq}", "\\label"),
    ("\\text{$x$}", "math inside text"),
    ("\\begin{matrix} a \\hline b \\end{matrix}", "\\hline"),
    ("\\underset{a}{b}", "\\underset"),
]


@pytest.mark.parametrize("written, normalized", NORMALIZED)
def test_normalizer_writes_im2latex_tokens(written, normalized):
    assert " ".join(T.normalize_formula(written)) == normalized
    if "\\begin" not in normalized:  # an array cell's braces are a group inside the cell, as in KaTeX
        assert " ".join(T.normalize_formula(normalized)) == normalized


@pytest.mark.parametrize("written, reason", REFUSED)
def test_normalizer_refuses_what_im2latex_cannot_express(written, reason):
    with pytest.raises(T.NotNormalizable, match=__import__("re").escape(reason)):
        T.normalize_formula(written)


# Normalized formulas of IM2LATEX-100K's own kinds, each written the way a person would by
# `humanize`, and the spelling it gives (checked by eye against the normalized form).
HUMANIZED = [
    ("x ^ { 2 } + y _ { i j }", "x^2+y_{ij}"),
    ("\\frac { 1 } { 2 } \\alpha x", "\\frac12\\alpha x"),
    ("\\operatorname { s i n } \\theta + \\operatorname* { l i m } _ { n } a", "\\sin\\theta+\\lim_na"),
    ("f ^ { \\prime \\prime } ( x )", "f''(x)"),
    ("\\mathrm { T r } \\, \\mathrm { ~ a n d ~ } x", "\\mathrm{Tr}\\,\\text{ and }x"),
    ("\\left( \\begin{matrix} { a } & { b } \\\\ { c } & { d } \\\\ \\end{matrix} \\right)",
     "\\begin{pmatrix}a&b\\\\c&d\\end{pmatrix}"),
    ("\\begin{array} { c l } { a ^ { 2 } } & { \\beta } \\\\ \\end{array}", "\\begin{array}{cl}a^2&\\beta\\end{array}"),
    ("x ^ { - } - y", "x^{-}-y"),
    ("a \\ b", "a\\ b"),
    ("\\sqrt [ 3 ] { x } + \\hat { a } _ { \\mu }", "\\sqrt[3]{x}+\\hat a_\\mu"),
]


@pytest.mark.parametrize("normalized, written", HUMANIZED)
def test_humanized_formulas_normalize_back(normalized, written):
    assert T.humanize(normalized) == written
    assert " ".join(T.normalize_formula(written)) == normalized


def test_round_trip_check_of_the_shipped_captions():
    """The shipped sample set's captions come back as the normalizer writes them; those that do
    not come back identical are the sample's own unbraced arguments (`\\frac 1 2`)."""
    captions = [e["caption"] for e in json.loads((DATA / "train.json").read_text()).values()]
    identical, canonical, failures = T.check_round_trip(captions)
    assert canonical >= 0.98 and identical >= 0.9
    assert any("\\frac 1" in f["formula"] or "\\sqrt 2" in f["formula"] for f in failures)


def test_normalize_formulas_drops_and_counts_by_reason(vocab):
    sources = ["x^2", "x^{2}", "\\mathbb{R}^n", "a+b+c+d+e", "x^2^3", "\\frac12", "", "\\,\\!", "y\\,\\!"]
    kept, report = T.normalize_formulas(sources, vocab, excluded={"\\frac { 1 } { 2 }"}, max_tokens=7)
    assert kept == ["x ^ { 2 }", "y"]
    assert report["formulas"] == 9 and report["kept"] == 2
    assert report["dropped"] == {"duplicate": 1, "token outside the vocabulary": 1, "over 7 tokens": 1,
                                 "not normalizable: double superscript": 1, "excluded formula": 1,
                                 "not normalizable: empty formula": 1, "not normalizable: only spacing": 1}
    assert report["tokens_outside_vocabulary"] == {"\\mathbb": 1}


@pytest.fixture(scope="module")
def vocab():
    return L.load_vocabulary(DATA / "model" / "vocab.json")


def run_tools(argv, capsys):
    code = T.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_normalize_command_reads_json_or_lines_and_never_overwrites(tmp_path, capsys):
    source = tmp_path / "wiki.json"
    source.write_text(json.dumps({"a": "\\sin x", "b": "\\frac{1}{2}", "c": "\\mathbb{Z}", "d": "x^2^3"}))
    (tmp_path / "test.txt").write_text("\\frac { 1 } { 2 }\n")
    out = tmp_path / "out" / "formulas.txt"
    code, printed, err = run_tools(["normalize", source, out, "--exclude", tmp_path / "test.txt"], capsys)
    assert code == 0, err
    assert out.read_text() == "\\operatorname { s i n } x\n"
    report = json.loads((tmp_path / "out" / "formulas_report.json").read_text())
    assert report["kept"] == 1 and report["dropped"]["excluded formula"] == 1
    assert "kept 1 of 4 formulas" in printed
    code, _, err = run_tools(["normalize", source, out], capsys)
    assert code == 2 and "already exists" in err and out.read_text() == "\\operatorname { s i n } x\n"
    lines = tmp_path / "raw.txt"
    lines.write_text("x^2\n\n\\alpha_1\n")
    code, _, err = run_tools(["normalize", lines, tmp_path / "lines.txt"], capsys)
    assert code == 0 and (tmp_path / "lines.txt").read_text() == "x ^ { 2 }\n\\alpha _ { 1 }\n"


@pytest.mark.parametrize("content, message", [(None, "not found"), ("[1, 2]", "JSON object of id -> formula"),
                                              ("{oops", "not valid JSON")])
def test_normalize_command_errors_name_the_file(tmp_path, capsys, content, message):
    source = tmp_path / "wiki.json"
    if content is not None:
        source.write_text(content)
    code, _, err = run_tools(["normalize", source, tmp_path / "out.txt"], capsys)
    assert code == 2 and message in err and str(source) in err and err.count("\n") == 1
    assert not (tmp_path / "out.txt").exists()


def test_normalize_check_reports_the_round_trip(tmp_path, capsys):
    (tmp_path / "norm.txt").write_text("x ^ { 2 }\n\\frac 1 2\n")
    code, printed, err = run_tools(["normalize", "--check", tmp_path / "norm.txt", "--report",
                                    tmp_path / "failures.json"], capsys)
    assert code == 0, err
    assert "50.00 % come back identical, 100.00 % as the normalizer writes" in printed
    assert [f["formula"] for f in json.loads((tmp_path / "failures.json").read_text())] == ["\\frac 1 2"]


needs_tex = pytest.mark.skipif(
    not (shutil.which("pdflatex") and shutil.which("gs")) and not os.environ.get("LATEXOCR_REQUIRE_TEX"),
    reason="pdflatex and Ghostscript are not installed (.ci/run installs them)")


@needs_tex
def test_normalized_formulas_compile():
    """Every normalized case above is LaTeX that renders (one document, all of them)."""
    failures: list = []
    images = L.render_batch([normalized for _, normalized in NORMALIZED], "cm", L.RenderSettings(per_document=64),
                            failures)
    assert failures == [] and all(image is not None for image in images)
