"""latexocr tools: data preparation around the core in latexocr.py.

    python latexocr_tools.py normalize en-wiki-formulae-good.json wiki/formulas.txt \\
        --vocab data/model/vocab.json --exclude im2latex/gg/test.json
    python latexocr_tools.py normalize --check ../shared/data/im2latex100k/gg_processed/val.formulas.norm.txt

`normalize` turns raw LaTeX formulas, as people write them, into IM2LATEX-100K's normalized
token form, ready for `python latexocr.py render`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import latexocr as L

# --- normalizing raw LaTeX into IM2LATEX-100K tokens -----------------------------------------------
#
# IM2LATEX-100K's formulas were parsed by KaTeX and written back out, one token at a time: every
# script and command argument braced once (`x ^ { 2 }`, `\frac { 1 } { 2 }`), a brace group kept
# as a group, `{a \over b}` as `{ \frac { a } { b } }`, named operators spelled out
# (`\operatorname { s i n }`, `\operatorname* { l i m }` for those with limits), text as
# `\mathrm { ... }` with `~` for its spaces, and every array cell braced, every row ending in `\\`.

RAW_TOKEN = re.compile(r"\\(?:begin|end)\s*\{\s*[a-zA-Z*]+\s*\}|\\[a-zA-Z]+|\\.|\s+|-{2,3}|.", re.DOTALL)

NAMED_OPERATORS = {"arccos", "arcsin", "arctan", "arg", "cos", "cosh", "cot", "coth", "csc", "deg", "dim", "exp",
                   "hom", "ker", "lg", "ln", "log", "sec", "sin", "sinh", "tan", "tanh"}
LIMIT_OPERATORS = {"det", "gcd", "inf", "lim", "liminf", "limsup", "max", "min", "Pr", "sup"}
FRACTIONS = {r"\frac": r"\frac", r"\dfrac": r"\frac", r"\tfrac": r"\frac", r"\cfrac": r"\frac",
             r"\binom": r"\binom", r"\dbinom": r"\binom", r"\tbinom": r"\binom",
             r"\stackrel": r"\stackrel", r"\overset": r"\stackrel"}
INFIX_FRACTIONS = {r"\over": r"\frac", r"\choose": r"\binom", r"\atop": r"\atop"}
ONE_ARGUMENT = {r"\hat", r"\bar", r"\tilde", r"\vec", r"\dot", r"\ddot", r"\check", r"\breve", r"\acute",
                r"\grave", r"\widehat", r"\widetilde", r"\overline", r"\underline", r"\overbrace", r"\underbrace",
                r"\overrightarrow", r"\overleftarrow", r"\mathrm", r"\mathbf", r"\mathit", r"\mathsf",
                r"\mathcal", r"\boldsymbol", r"\bm", r"\phantom", r"\vphantom", r"\hphantom", r"\mathop",
                r"\mathrel", r"\mathbin", r"\mathord", r"\pmod", r"\boxed", r"\fbox"}
# Spellings IM2LATEX-100K never uses, as the nearest one it does.
RENAMED = {r"\boldsymbol": r"\mathbf", r"\bm": r"\mathbf", r"\lvert": "|", r"\rvert": "|",
           r"\lVert": r"\|", r"\rVert": r"\|", r"\>": r"\:",
           r"\implies": r"\Longrightarrow", r"\iff": r"\Longleftrightarrow", r"\dotsc": r"\ldots",
           r"\dotsb": r"\cdots", r"\dotsm": r"\cdots", r"\dotso": r"\ldots", "\\ ": "\\"}
TEXT_COMMANDS = {r"\text", r"\mbox", r"\textrm", r"\textnormal", r"\hbox", r"\textup", r"\textit", r"\textbf"}
MATRICES = {"matrix": ("", ""), "smallmatrix": ("", ""), "pmatrix": (r"\left(", r"\right)"),
            "bmatrix": (r"\left[", r"\right]"), "Bmatrix": (r"\left\{", r"\right\}"),
            "vmatrix": (r"\left|", r"\right|"), "Vmatrix": (r"\left\|", r"\right\|")}
ALIGNMENTS = {"aligned", "align", "align*", "split", "eqnarray", "eqnarray*", "alignat", "alignat*", "alignedat",
              "gathered", "gather", "gather*"}
DROPPED = {r"\limits", r"\nolimits", r"\displaylines", r"\nonumber", r"\notag"}
SPACES = {r"\,", r"\;", r"\:", r"\!", "\\", "~", r"\quad", r"\qquad", r"\enspace", r"\thinspace"}
COLORS = {r"\color", r"\textcolor"}


class NotNormalizable(ValueError):
    """A formula IM2LATEX-100K's tokens cannot express; str() is the reason, for counting."""


class FormulaParser:
    """A recursive-descent reader of one raw formula that writes IM2LATEX tokens as it goes."""

    def __init__(self, source: str):
        # Whitespace is one " " token (it matters in text only), a backslash before any of it is a
        # control space, and `\begin { x }` is spelled `\begin{x}`.
        tokens = RAW_TOKEN.findall(source)
        self.tokens = [" " if t.isspace() else "\\ " if re.fullmatch(r"\\\s", t) else
                       re.sub(r"\s+", "", t) if t.startswith(("\\begin", "\\end")) else t for t in tokens]
        self.at = 0

    def peek(self, text_mode: bool = False) -> str | None:
        if not text_mode:
            while self.at < len(self.tokens) and self.tokens[self.at] == " ":
                self.at += 1
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, text_mode: bool = False) -> str:
        token = self.peek(text_mode)
        if token is None:
            raise NotNormalizable("unbalanced braces or missing argument")
        self.at += 1
        return token

    def expect(self, token: str) -> None:
        if self.take() != token:
            raise NotNormalizable("unbalanced braces or missing argument")

    def formula(self) -> list[str]:
        out = self.expression(stop=())
        if self.peek() is not None:
            raise NotNormalizable("unbalanced braces or missing argument")
        return out

    def expression(self, stop: Sequence[str]) -> list[str]:
        """Atoms up to a stop token (not consumed); `\\over`-style infix splits it into a fraction."""
        atoms: list[list[str]] = []
        while (token := self.peek()) is not None and token not in stop:
            if token in INFIX_FRACTIONS:
                self.take()
                numerator = [t for atom in atoms for t in atom]
                denominator = self.expression(stop)
                if token == r"\atop":
                    return [*numerator, token, *denominator]
                return [INFIX_FRACTIONS[token], "{", *numerator, "}", "{", *denominator, "}"]
            if token in ("^", "_", "'", r"\sp", r"\sb"):
                base = atoms.pop() if atoms else []
                atoms.append(self.scripts(base))
            elif atom := self.atom():  # an empty atom (a color, \limits) takes no scripts
                atoms.append(atom)
        return [t for atom in atoms for t in atom]

    def scripts(self, base: list[str]) -> list[str]:
        """Base with its subscript and superscript, always in that order, each braced once."""
        sub = sup = None
        while (token := self.peek()) in ("^", "_", "'", r"\sp", r"\sb"):
            self.take()
            if token == "'":
                primes = [r"\prime"]
                while self.peek() == "'":
                    self.take()
                    primes.append(r"\prime")
                if self.peek() in ("^", r"\sp"):
                    self.take()
                    primes += self.argument(braced=False)
                if sup is not None:
                    raise NotNormalizable("double superscript")
                sup = primes
            elif token in ("_", r"\sb"):
                if sub is not None:
                    raise NotNormalizable("double subscript")
                sub = self.argument(braced=False)
            else:
                if sup is not None:
                    raise NotNormalizable("double superscript")
                sup = self.argument(braced=False)
        out = list(base)
        if sub is not None:
            out += ["_", "{", *sub, "}"]
        if sup is not None:
            out += ["^", "{", *sup, "}"]
        return out

    def argument(self, braced: bool = True) -> list[str]:
        """One argument's tokens: a brace group's content, or a single atom; braced=True wraps it."""
        if self.peek() == "{":
            self.take()
            inner = self.expression(stop=("}",))
            self.expect("}")
        elif self.peek() in (None, "}", "&", r"\\", "^", "_"):
            raise NotNormalizable("unbalanced braces or missing argument")
        else:
            inner = self.atom()
        return ["{", *inner, "}"] if braced else inner

    def raw_argument(self) -> str:
        """A `{...}` argument as plain text (a color, a length, a column layout)."""
        self.expect("{")
        depth, text = 1, []
        while True:
            token = self.take(text_mode=True)
            depth += {"{": 1, "}": -1}.get(token, 0)
            if depth == 0:
                return "".join(text)
            text.append(token)

    def text(self, command: str) -> list[str]:
        """Text mode: one token per character, `~` for a run of spaces."""
        self.expect("{")
        out: list[str] = []
        while (token := self.take(text_mode=True)) != "}":
            if token == " ":
                if out[-1:] != ["~"]:
                    out.append("~")
            elif token == "{":
                self.at -= 1
                out += self.text(command)[2:-1]
            elif token.startswith("\\") and token not in ("\\ ", r"\%", r"\&", r"\$"):
                raise NotNormalizable(f"command inside text: {token}")
            elif token == "$":
                raise NotNormalizable("math inside text")
            else:
                out.append("~" if token in ("\\ ", "~") else token)
        return [r"\mathrm", "{", *out, "}"] if command != r"\textbf" else [r"\mathbf", "{", *out, "}"]

    def delimiter(self) -> str:
        token = self.take()
        return RENAMED.get(token, token)

    def environment(self, begin: str) -> list[str]:
        name = begin[len(r"\begin{"): -1]
        if name in MATRICES:
            left, right = MATRICES[name]
            kind, layout = "matrix", []
        elif name == "array":
            layout = [c for c in self.raw_argument() if not c.isspace() and c != "|"]
            if any(c not in "lcr" for c in layout):
                raise NotNormalizable("array column layout other than l, c, r")
            kind, left, right = "array", "", ""
        elif name == "cases":
            kind, left, right, layout = "cases", "", "", []
        elif name in ALIGNMENTS:
            if name.startswith("alignat") or name == "alignedat":
                self.raw_argument()
            kind, left, right, layout = "array", "", "", []
        else:
            raise NotNormalizable(f"environment {name}")
        rows, row = [], []
        while True:
            cell = self.expression(stop=("&", r"\\", r"\end{" + name + "}", r"\hline"))
            token = self.take() if self.peek() is not None else None
            if token == r"\hline":
                raise NotNormalizable(r"\hline")
            row.append(cell)
            if token == "&":
                continue
            if token == r"\\" and self.peek() == "[":
                while self.take() != "]":
                    pass
            if token != r"\\" and token != r"\end{" + name + "}":
                raise NotNormalizable(f"unfinished environment {name}")
            if len(row) > 1 or row[0]:
                rows.append(row)
            row = []
            if token == r"\end{" + name + "}":
                break
        if not rows:
            raise NotNormalizable(f"empty environment {name}")
        if name in ALIGNMENTS:
            columns = max(len(r) for r in rows)
            layout = ["c"] if name.startswith("gather") else (["r", "l"] * columns)[:columns]
            if name.startswith("eqnarray"):
                layout = ["r", "c", "l"][:columns]
        out = [left] if left else []
        out.append(r"\begin{" + kind + "}")
        if kind == "array":
            out += ["{", *layout, "}"]
        for cells in rows:
            for number, cell in enumerate(cells):
                out += (["&"] if number else []) + ["{", *cell, "}"]
            out.append(r"\\")
        out.append(r"\end{" + kind + "}")
        return out + ([right] if right else [])

    def atom(self) -> list[str]:
        token = self.take()
        if token == "{":
            inner = self.expression(stop=("}",))
            self.expect("}")
            return ["{", *inner, "}"]
        if token == "}":
            raise NotNormalizable("unbalanced braces or missing argument")
        token = RENAMED.get(token, token)
        name = token[1:]
        if token == r"\left":
            opening = token + self.delimiter()
            inner = self.expression(stop=(r"\right",))
            if self.peek() != r"\right":
                raise NotNormalizable(r"\left without \right")
            return [opening, *inner, self.take() + self.delimiter()]
        if token == r"\right":
            raise NotNormalizable(r"\right without \left")
        if token.startswith(r"\begin{"):
            return self.environment(token)
        if token.startswith(r"\end{"):
            raise NotNormalizable(f"unmatched {token}")
        if token in FRACTIONS:
            return [FRACTIONS[token], *self.argument(), *self.argument()]
        if token == r"\sqrt":
            index = []
            if self.peek() == "[":
                self.take()
                index = ["[", *self.expression(stop=("]",)), "]"]
                self.expect("]")
            return [token, *index, *self.argument()]
        if token == r"\operatorname":
            starred = self.peek() == "*"
            if starred:
                self.take()
            letters = self.argument(braced=False)
            return [r"\operatorname*" if starred else r"\operatorname", "{", *letters, "}"]
        if name in NAMED_OPERATORS:
            return [r"\operatorname", "{", *name, "}"]
        if name in LIMIT_OPERATORS:
            return [r"\operatorname*", "{", *name, "}"]
        if token in TEXT_COMMANDS:
            return self.text(token)
        if token in COLORS:
            self.raw_argument()
            return self.argument(braced=False) if token == r"\textcolor" else []
        if token in (r"\hspace", r"\vspace"):
            if self.peek() == "*":
                self.take()
            return [token, "{", *self.raw_argument().replace(" ", ""), "}"]
        if token in ONE_ARGUMENT:
            return [token, *self.argument()]
        if token in DROPPED:
            return []
        if token in (r"\big", r"\Big", r"\bigg", r"\Bigg", r"\bigl", r"\bigr", r"\Bigl", r"\Bigr", r"\biggl",
                     r"\biggr", r"\Biggl", r"\Biggr"):
            return [token, self.delimiter()]
        if token in ("&", r"\\"):
            raise NotNormalizable(f"{token} outside an array")
        if token in (r"\label", r"\tag", r"\ref", r"\eqref", r"\underset"):
            raise NotNormalizable(f"{token}")
        if token in ("$", "%", "#"):
            raise NotNormalizable(f"stray {token}")
        return [token]


def normalize_formula(source: str) -> list[str]:
    """IM2LATEX-100K tokens of one raw LaTeX formula; raises NotNormalizable with the reason."""
    tokens = FormulaParser(source).formula()
    if not tokens:
        raise NotNormalizable("empty formula")
    return tokens


def without_outer_spacing(tokens: list[str]) -> list[str]:
    r"""Spacing at either end of a formula shows no ink (Wikipedia ends many with `\,\!`), so no
    model can read it off an image."""
    start, end = 0, len(tokens)
    while start < end and tokens[start] in SPACES:
        start += 1
    while end > start and tokens[end - 1] in SPACES:
        end -= 1
    return tokens[start:end]


def read_raw_formulas(path: Path) -> list[str]:
    """Raw formulas of a JSON object (id -> LaTeX, as texvcjs's test data) or a text file, one a line."""
    if not path.is_file():
        raise L.UserError(f"formula source not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise L.UserError(f"formula source {path} is not UTF-8 text: {error}") from None
    if path.suffix == ".json":
        try:
            formulas = json.loads(text)
        except json.JSONDecodeError as error:
            raise L.UserError(f"{path} is not valid JSON ({error}); give a JSON object of id -> formula") from None
        if not isinstance(formulas, dict) or not all(isinstance(v, str) for v in formulas.values()):
            raise L.UserError(f"{path} is not a JSON object of id -> formula string")
        return list(formulas.values())
    return [line for line in text.splitlines() if line.strip()]


def normalize_formulas(sources: Sequence[str], vocab: L.Vocabulary, excluded: set[str],
                       max_tokens: int) -> tuple[list[str], dict]:
    """Normalized, distinct, in-vocabulary formulas of at most max_tokens tokens, none of them
    excluded, in source order; and the counts of what was dropped, by reason."""
    kept, seen = [], set()
    reasons: collections.Counter = collections.Counter()
    unknown: collections.Counter = collections.Counter()
    for source in sources:
        try:
            tokens = without_outer_spacing(normalize_formula(source))
            if not tokens:
                raise NotNormalizable("only spacing")
        except NotNormalizable as error:
            reasons[f"not normalizable: {error}"] += 1
            continue
        outside = sorted({t for t in tokens if t not in vocab.ids})
        formula = " ".join(tokens)
        if outside:
            reasons["token outside the vocabulary"] += 1
            unknown.update(outside)
        elif len(tokens) > max_tokens:
            reasons[f"over {max_tokens} tokens"] += 1
        elif formula in excluded:
            reasons["excluded formula"] += 1
        elif formula in seen:
            reasons["duplicate"] += 1
        else:
            seen.add(formula)
            kept.append(formula)
    report = {"formulas": len(sources), "kept": len(kept), "dropped": dict(reasons.most_common()),
              "tokens_outside_vocabulary": dict(unknown.most_common(50))}
    return kept, report


# --- writing normalized formulas back the way a person would (to check the normalizer) --------------

def group_end(tokens: Sequence[str], start: int) -> int:
    """Index just past the brace group that opens at tokens[start]."""
    depth = 0
    for index in range(start, len(tokens)):
        depth += {"{": 1, "}": -1}.get(tokens[index], 0)
        if depth == 0:
            return index + 1
    raise ValueError("unbalanced braces")


def environment_end(tokens: Sequence[str], start: int) -> int:
    r"""Index of the `\end{...}` that closes the `\begin{...}` at tokens[start]."""
    depth = 0
    for index in range(start, len(tokens)):
        depth += tokens[index].startswith(r"\begin{") - tokens[index].startswith(r"\end{")
        if depth == 0:
            return index
    raise ValueError("unbalanced environments")


def humanize_tokens(tokens: Sequence[str]) -> list[str]:
    """Raw-LaTeX pieces of normalized tokens, as a person types them: named operators as `\\sin`,
    primes as `'`, single-token arguments unbraced, matrices and text in their usual spelling."""
    out: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else None
        if token in (r"\operatorname", r"\operatorname*") and following == "{":
            end = group_end(tokens, index + 1)
            name = "".join(tokens[index + 2: end - 1])
            if name in (LIMIT_OPERATORS if token.endswith("*") else NAMED_OPERATORS):
                out.append("\\" + name)
            else:
                out += [token, "{" + name + "}"]
            index = end
        elif token == r"\mathrm" and following == "{":
            end = group_end(tokens, index + 1)
            inner = tokens[index + 2: end - 1]
            if "~" in inner and all(len(t) == 1 for t in inner):
                out.append(r"\text{" + "".join(" " if t == "~" else t for t in inner) + "}")
            elif all(len(t) == 1 and t.isalpha() for t in inner):
                out.append(r"\mathrm{" + "".join(inner) + "}")
            else:
                out += [token, *humanize_argument(tokens[index + 1: end])]
            index = end
        elif token in ("^", "_") and following == "{":
            end = group_end(tokens, index + 1)
            inner = tokens[index + 2: end - 1]
            if token == "^" and inner and all(t == r"\prime" for t in inner):
                out.append("'" * len(inner))
            else:
                out += [token, *humanize_argument(tokens[index + 1: end])]
            index = end
        elif token in (r"\frac", r"\binom", r"\sqrt", *ONE_ARGUMENT) and following == "{":
            end = group_end(tokens, index + 1)
            arguments = [tokens[index + 1: end]]
            if token in (r"\frac", r"\binom") and end < len(tokens) and tokens[end] == "{":
                second = group_end(tokens, end)
                arguments.append(tokens[end: second])
                end = second
            out.append(token)
            for argument in arguments:
                out += humanize_argument(argument)
            index = end
        elif token == r"\left(" and following == r"\begin{matrix}":
            end = environment_end(tokens, index + 1)
            if end + 1 < len(tokens) and tokens[end + 1] == r"\right)":
                out += [r"\begin{pmatrix}", *humanize_cells(tokens[index + 2: end]), r"\end{pmatrix}"]
                index = end + 2
            else:
                out.append(token)
                index += 1
        elif token in (r"\begin{matrix}", r"\begin{cases}", r"\begin{array}"):
            closing = r"\end" + token[len(r"\begin"):]
            end = environment_end(tokens, index)
            start = index + 1
            if token == r"\begin{array}":
                start = group_end(tokens, index + 1)
                out.append(token + "{" + "".join(tokens[index + 2: start - 1]) + "}")
            else:
                out.append(token)
            out += [*humanize_cells(tokens[start: end]), closing]
            index = end + 1
        else:
            out.append(token)
            index += 1
    return out


def humanize_argument(group: Sequence[str]) -> list[str]:
    """A braced argument: one plain token loses its braces (but a `-`, which could join a `-` after
    it into `--`); otherwise its content is humanized."""
    inner = list(group[1:-1])
    if len(inner) == 1 and inner[0] not in ("{", "}", "&", r"\\", "-") and not inner[0].startswith((r"\left", r"\right")):
        return [inner[0]]
    return ["{", *humanize_tokens(inner), "}"]


def humanize_cells(tokens: Sequence[str]) -> list[str]:
    """Matrix rows written without cell braces or the last `\\\\`."""
    out: list[str] = []
    index = 0
    while index < len(tokens):
        if tokens[index] == "{":
            end = group_end(tokens, index)
            out += humanize_tokens(tokens[index + 1: end - 1])
            index = end
        else:
            out.append(tokens[index])
            index += 1
    return out[:-1] if out and out[-1] == r"\\" else out


def humanize(formula: str) -> str:
    """A normalized formula as a person types it: no spaces but where LaTeX needs one (after a
    control word followed by a letter, and in a control space)."""
    text = ""
    for piece in humanize_tokens(formula.split()):
        if re.search(r"\\[a-zA-Z]+$", text) and re.match(r"[a-zA-Z]", piece):
            text += " "
        text += "\\ " if piece == "\\" else piece
    return text


def check_round_trip(formulas: Sequence[str]) -> tuple[float, float, list[dict[str, str]]]:
    """The share of normalized formulas that come back identical from their humanized spelling;
    the share that come back as the normalizer writes the formula itself (IM2LATEX-100K is not
    consistent: `\frac 1 2` beside `\frac { 1 } { 2 }`); and the ones that do not come back."""
    failures, canonical = [], 0
    for formula in formulas:
        try:
            written = humanize(formula)
        except ValueError as error:  # unbalanced to begin with
            failures.append({"formula": formula, "written": f"<{error}>", "normalized": ""})
            continue
        try:
            back = " ".join(normalize_formula(written))
        except NotNormalizable as error:
            back = f"<{error}>"
        if back != formula:
            failures.append({"formula": formula, "written": written, "normalized": back})
            with contextlib.suppress(NotNormalizable):
                canonical += back == " ".join(normalize_formula(formula))
    total = max(len(formulas), 1)
    return 1 - len(failures) / total, 1 - (len(failures) - canonical) / total, failures


# --- commands ----------------------------------------------------------------------------------------

def command_normalize(args) -> int:
    if args.check:
        formulas = [" ".join(line.split()) for line in read_raw_formulas(Path(args.check))]
        identical, canonical, failures = check_round_trip(formulas)
        print(f"written as a person would and normalized back, {len(formulas)} formulas: {100 * identical:.2f} % "
              f"come back identical, {100 * canonical:.2f} % as the normalizer writes the formula itself")
        if args.report:
            L.write_json_atomic(Path(args.report), failures)
        return 0
    if not args.source or not args.out:
        raise L.UserError("normalize needs a source and an output file (or --check FILE)")
    out = Path(args.out)
    if out.exists():
        raise L.UserError(f"{out} already exists; choose another output file")
    vocab = L.load_vocabulary(args.vocab)
    sources = read_raw_formulas(Path(args.source))
    kept, report = normalize_formulas(sources, vocab, L.excluded_formulas(args.exclude), args.max_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text("".join(f + "\n" for f in kept), encoding="utf-8")
    temporary.replace(out)
    report_path = Path(args.report) if args.report else out.with_name(out.stem + "_report.json")
    L.write_json_atomic(report_path, report)
    print(f"kept {report['kept']} of {report['formulas']} formulas in {out}; dropped: "
          + ", ".join(f"{n} {reason}" for reason, n in report["dropped"].items()) + f" (details: {report_path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latexocr_tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True, metavar="command")
    normalize = commands.add_parser("normalize", help="raw LaTeX formulas -> IM2LATEX-normalized, one a line")
    normalize.add_argument("source", nargs="?", help="a JSON object of id -> formula, or a text file, one a line")
    normalize.add_argument("out", nargs="?", help="the normalized formulas, one a line (never overwritten)")
    normalize.add_argument("--vocab", default=str(L.MODULE_DIR / "data" / "model" / "vocab.json"),
                           help="formulas with a token outside this vocabulary are dropped")
    normalize.add_argument("--exclude", action="append", default=[],
                           help="a split file or formula file whose formulas are dropped (repeatable)")
    normalize.add_argument("--max-tokens", type=int, default=150)
    normalize.add_argument("--report", help="where the counts go (default: <out stem>_report.json)")
    normalize.add_argument("--check", metavar="FILE",
                           help="instead: write each normalized formula of FILE as a person would, normalize it "
                                "back, and report the share that comes back identical")
    normalize.set_defaults(run=command_normalize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except L.UserError as error:
        print(f"latexocr_tools: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
