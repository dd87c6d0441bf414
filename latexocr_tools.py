"""latexocr tools: data preparation, rendering, export, the web page and the benchmark, around the core
model in latexocr.py (which never imports this module).

    python latexocr_tools.py prepare --root ~/im2latex100k --out my_data --copy-images
    python latexocr_tools.py normalize en-wiki-formulae-good.json wiki/formulas.txt --exclude my_data/test.json
    python latexocr_tools.py render wiki/formulas.txt wiki/renders --dpi 160,200,250
    python latexocr_tools.py combine all --add my_data/train.json=my_data/images --add wiki/renders/train.json=wiki/renders/images
    python latexocr_tools.py export runs/small my_model --bucket-heights 32,64,128,192
    python latexocr_tools.py serve                 # web page and JSON API on http://127.0.0.1:8000/
    python latexocr_tools.py bench
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

import latexocr as L
from latexocr import (EOS_ID, MODULE_DIR, PAD_ID, SOS_ID, SPLITS, Config, LatexOCR, Predictor, UserError,
                      compact_latex, count_params, decode_image, detokenize, encode_memory,
                      find_checkpoint_dir, formula_lines, load_predictor, load_split,
                      open_image, read_split_file, resolve_path, traced_program_dir, write_json_atomic)


# --- IM2LATEX-100K as downloaded -> split files ---------------------------------------------------

def image_header_problem(path: Path) -> str | None:
    """Why an image file cannot be used, judged from its header alone; None when it looks usable."""
    try:
        with Image.open(path) as image:
            return "image over the pixel limit" if image.width * image.height > L.MAX_IMAGE_PIXELS else None
    except Image.DecompressionBombError:
        return "image over the pixel limit"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "not an image Pillow reads"


def read_split_list(path: Path) -> list[tuple[str, int]]:
    """(image name, formula index) from either split-list layout: harvardnlp's filtered
    `image.png index` or the raw Zenodo `index image render_type`."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 2 and fields[1].isdigit():
            name, index = fields[0], int(fields[1])
        elif len(fields) == 3 and fields[0].isdigit():
            name, index = fields[1] if fields[1].endswith(".png") else fields[1] + ".png", int(fields[0])
        else:
            raise UserError(f"{path}:{number}: expected `image index` or `index image type`, got {line!r}")
        pairs.append((name, index))
    return pairs


def find_original_layout(root: Path) -> tuple[Path, dict[str, Path], Path]:
    formulas = next((root / n for n in ("im2latex_formulas.norm.lst", "formulas.norm.lst")
                     if (root / n).is_file()), None)
    if formulas is None:
        raise UserError(f"{root} holds no im2latex_formulas.norm.lst (or formulas.norm.lst)")
    lists = {}
    for split in SPLITS:
        for name in (f"im2latex_{split}_filter.lst", f"{split}_filter.lst", f"im2latex_{split}.lst"):
            if (root / name).is_file():
                lists[split] = root / name
                break
    if not lists:
        raise UserError(f"{root} holds no split lists (im2latex_{{train,validate,test}}_filter.lst)")
    images = next((root / n for n in ("formula_images_processed", "images_processed", "formula_images")
                   if (root / n).is_dir()), None)
    if images is None:
        raise UserError(f"{root} holds no image folder (formula_images_processed/ or images_processed/)")
    return formulas, lists, images


# The `gg_processed` layout of IM2LATEX-100K: per split, `images_<stem>/N.png`, the formulas of that
# split (`<stem>.formulas.norm.txt`) and `<stem>.matching.txt` (`N.png line`).
GG_SPLIT_STEMS = {"train": "train", "validate": "val", "test": "test"}


def is_gg_layout(root: Path) -> bool:
    return any((root / f"{stem}.matching.txt").is_file() for stem in GG_SPLIT_STEMS.values())


def pairs_from_gg_layout(root: Path):
    """(split, image path relative to root, formula); a split whose formulas file is absent (the
    train split's, in the public copy) is left out."""
    for split, stem in GG_SPLIT_STEMS.items():
        formulas_path, matching = root / f"{stem}.formulas.norm.txt", root / f"{stem}.matching.txt"
        if not (formulas_path.is_file() and matching.is_file()):
            continue
        formulas = formulas_path.read_text(encoding="utf-8", errors="replace").splitlines()
        for name, index in read_split_list(matching):
            yield split, f"images_{stem}/{name}", formulas[index] if 0 <= index < len(formulas) else None


def pairs_from_original(formulas_path: Path, lists: dict[str, Path]):
    formulas = formulas_path.read_text(encoding="utf-8", errors="replace").splitlines()
    for split, list_path in lists.items():
        for name, index in read_split_list(list_path):
            formula = formulas[index] if 0 <= index < len(formulas) else None
            yield split, name, formula


def pairs_from_csv(csv_paths: dict[str, Path]):
    for split, path in csv_paths.items():
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            if not reader.fieldnames or not {"formula", "image"} <= set(reader.fieldnames):
                raise UserError(f"{path}: expected a CSV with `formula,image` columns")
            for row in reader:
                yield split, row["image"], row["formula"]


def prepare(pairs, images: Path, out: Path, copy_images: bool) -> dict[str, dict[str, int]]:
    """Write `<split>.json` files; every skipped pair is counted and listed in prepare_report.json."""
    splits: dict[str, dict[str, dict]] = {s: {} for s in SPLITS}
    skipped: dict[str, dict[str, list[str]]] = {s: collections.defaultdict(list) for s in SPLITS}
    for split, name, formula in pairs:
        if formula is None:
            skipped[split]["formula index out of range"].append(name)
        elif not formula.split():
            skipped[split]["empty formula"].append(name)
        elif not (images / name).is_file():
            skipped[split]["image missing"].append(name)
        elif problem := image_header_problem(images / name):
            skipped[split][problem].append(name)
        elif name in splits[split]:
            skipped[split]["duplicate image name"].append(name)
        else:
            tokens = formula.split()
            splits[split][name] = {"img_path": name, "caption": " ".join(tokens), "caption_len": len(tokens)}
    out.mkdir(parents=True, exist_ok=True)
    if copy_images:
        (out / "images").mkdir(exist_ok=True)
    report = {}
    for split in SPLITS:
        if not splits[split] and not skipped[split]:
            continue
        write_json_atomic(out / f"{split}.json", splits[split])
        if copy_images:
            for name in splits[split]:
                (out / "images" / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(images / name, out / "images" / name)
        report[split] = {"written": len(splits[split]), **{k: len(v) for k, v in skipped[split].items()}}
    write_json_atomic(out / "prepare_report.json",
                      {"counts": report, "skipped": {s: dict(v) for s, v in skipped.items() if v}})
    return report


# --- merging split files --------------------------------------------------------------------------

def formula_key(caption: str) -> str:
    return " ".join(caption.split())


def excluded_formulas(paths: Sequence[str]) -> set[str]:
    """Formulas never to train on: the captions of split files, or text files of one formula a line."""
    return {formula_key(line) for path in paths for line in formula_lines(path) if line.split()}


def combine_splits(sources: Sequence[tuple[str, Path]], excluded: set[str], holdout: int, holdout_from: str,
                   seed: int, max_tokens: int = 0) -> tuple[dict, dict, dict]:
    """One train split from several (each with its image folder; image paths made absolute and
    names prefixed `<source number>-`), without the excluded formulas. With `holdout`, that many
    distinct formulas of the `holdout_from` source become the validate split, and every other
    entry of those formulas leaves the train split, so no validation formula is trained on.
    max_tokens > 0 then keeps only training captions of at most that many tokens (the same
    validate split as without it, for a curriculum that starts on short formulas).
    Returns train, validate and the counts by reason."""
    pooled, counts = [], collections.Counter()
    for number, (path, images) in enumerate(sources, 1):
        for name, entry in read_split_file(path)[0].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("caption"), str)
                    and isinstance(entry.get("img_path"), str) and entry["caption"].split()):
                counts["entry lacks img_path or caption"] += 1
            elif formula_key(entry["caption"]) in excluded:
                counts["excluded formula"] += 1
            else:
                tokens = entry["caption"].split()
                pooled.append((path, f"{number}-{name}", {"img_path": str((images / entry["img_path"]).absolute()),
                                                          "caption": " ".join(tokens), "caption_len": len(tokens)}))
    # Pooled captions are already in formula_key form.
    candidates = sorted({e["caption"] for path, _, e in pooled if path == holdout_from})
    if holdout > len(candidates):
        raise UserError(f"--holdout {holdout} is more than the {len(candidates)} usable formulas of {holdout_from}")
    held = set(np.random.default_rng(seed).permutation(candidates)[:holdout].tolist())
    train, validate, validated = {}, {}, set()
    for path, name, entry in pooled:
        key = entry["caption"]
        if key not in held and 0 < max_tokens < entry["caption_len"]:
            counts[f"training caption over {max_tokens} tokens"] += 1
        elif key not in held:
            train[name] = entry
        elif path == holdout_from and key not in validated:
            validate[name] = entry
            validated.add(key)
        else:
            counts["other entry of a validation formula"] += 1
    return train, validate, {"train": len(train), "validate": len(validate), **counts}


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
                r"\mathcal", r"\phantom", r"\vphantom", r"\hphantom", r"\mathop",
                r"\mathrel", r"\mathbin", r"\mathord", r"\pmod", r"\boxed", r"\fbox"}
# Spellings IM2LATEX-100K never uses, as the nearest one it does; a control space is the token
# `\` (its space is the separator between tokens).
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
DROPPED = {r"\limits", r"\nolimits", r"\nonumber", r"\notag"}
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


def group_end(tokens: Sequence[str], start: int) -> int:
    """Index just past the brace group that opens at tokens[start]."""
    depth = 0
    for index in range(start, len(tokens)):
        depth += {"{": 1, "}": -1}.get(tokens[index], 0)
        if depth == 0:
            return index + 1
    raise ValueError("unbalanced braces")


# Spellings of one glyph between which IM2LATEX-100K's formulas (train and val) mostly use the
# second, where Wikipedia mostly uses the first (\to 170 : \rightarrow 355 there, 1,932 : 1,116 in
# Wikipedia; \mathbf 192 : \bf 948, 19,328 : 0). No image tells them apart, so a model trained on
# both guesses; training captions use the spelling a test formula most likely has.
SAME_GLYPH = {r"\to": r"\rightarrow", r"\le": r"\leq", r"\ge": r"\geq", r"\ne": r"\neq", r"\lbrace": r"\{",
              r"\rbrace": r"\}", r"\lbrack": "[", r"\rbrack": "]", r"\vert": "|", r"\Vert": r"\|", r"\land": r"\wedge"}
FONT_SWITCHES = {r"\mathbf": r"\bf", r"\mathcal": r"\cal", r"\mathit": r"\it"}


def majority_spelling(tokens: Sequence[str]) -> list[str]:
    r"""Normalized tokens respelled as IM2LATEX-100K mostly writes the same glyphs: `\mathbf { x }`
    as `{ \bf x }` (`_ { \bf x }` alone in a group), `\to` as `\rightarrow`, ... (SAME_GLYPH)."""
    out: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in FONT_SWITCHES and tokens[index + 1: index + 2] == ["{"]:
            end = group_end(tokens, index + 1)
            switched = [FONT_SWITCHES[token], *majority_spelling(tokens[index + 2: end - 1])]
            alone = out[-1:] == ["{"] and tokens[end: end + 1] == ["}"]
            out += switched if alone else ["{", *switched, "}"]
            index = end
        else:
            out.append(SAME_GLYPH.get(token, token))
            index += 1
    return out


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
        raise UserError(f"formula source not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"formula source {path} is not UTF-8 text: {error}") from None
    if path.suffix == ".json":
        try:
            formulas = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not valid JSON ({error}); give a JSON object of id -> formula") from None
        if not isinstance(formulas, dict) or not all(isinstance(v, str) for v in formulas.values()):
            raise UserError(f"{path} is not a JSON object of id -> formula string")
        return list(formulas.values())
    return [line for line in text.splitlines() if line.strip()]


def normalize_formulas(sources: Sequence[str], vocab: L.Vocabulary, excluded: set[str],
                       max_tokens: int) -> tuple[list[str], dict]:
    """Normalized formulas in IM2LATEX-100K's majority spelling, distinct, in-vocabulary, of at most
    max_tokens tokens, none of them excluded, in source order; and the counts of what was dropped, by reason."""
    kept, seen = [], set()
    reasons: collections.Counter = collections.Counter()
    unknown: collections.Counter = collections.Counter()
    for source in sources:
        try:
            tokens = majority_spelling(without_outer_spacing(normalize_formula(source)))
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
    """A normalized formula as a person types it (see humanize_tokens and compact_latex)."""
    return compact_latex(humanize_tokens(formula.split()))


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


# --- rendering formulas into training images ------------------------------------------------------

TEX_PACKAGES = "texlive-latex-base texlive-latex-recommended texlive-fonts-recommended ghostscript"


# Math fonts to vary the look of renderings: Computer Modern (IM2LATEX-100K's), Times, Palatino.
RENDER_FONTS = {"cm": "", "times": r"\usepackage{txfonts}", "palatino": r"\usepackage{pxfonts}"}


# IM2LATEX-100K's look: a 10pt article with amsmath, one `\[ ... \]` per page, rendered at 200 dpi,
# cropped, padded 8 px, halved. The page is wider than any IM2LATEX-100K formula (the widest are
# about 8 inches) yet small enough to rasterise quickly; ink touching its edge means it did not fit.
RENDER_DOCUMENT = r"""\documentclass[10pt]{article}
\usepackage{amsmath,amssymb}
%s
\pagestyle{empty}
\pdfpagewidth=12in \pdfpageheight=5in \textwidth=11in \textheight=4.5in
\hoffset=-1in \voffset=-1in \oddsidemargin=0.5in \topmargin=0.25in \headheight=0pt \headsep=0pt
\begin{document}
%s
\end{document}
"""


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    dpis: tuple[int, ...] = (200,)
    fonts: tuple[str, ...] = ("cm",)
    per_document: int = 32
    timeout: float = 120.0


def require_tex_tools() -> None:
    missing = [tool for tool in ("pdflatex", "gs") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"rendering needs {' and '.join(missing)}, which are not installed; on Debian or Ubuntu: "
                        f"apt-get install --no-install-recommends {TEX_PACKAGES}")


def latex_error(log: str) -> str:
    """The first `! ...` error line of a LaTeX log, with the line it points at."""
    lines = log.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("!"):
            context = next((l.strip() for l in lines[number + 1: number + 4] if l.startswith("l.")), "")
            return f"{line[1:].strip()} {context}".strip()
    return "LaTeX failed without an error line"


def finish_rendering(page: np.ndarray) -> np.ndarray | None:
    """Crop a rendered page (uint8 gray, white paper) to its ink, pad 8 px of paper, halve; None when
blank; ValueError when the ink reaches the page's edge."""
    ink = page < 250
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(ink[rows[0]: rows[-1] + 1].any(axis=0))
    if rows[0] == 0 or cols[0] == 0 or rows[-1] == page.shape[0] - 1 or cols[-1] == page.shape[1] - 1:
        raise ValueError("does not fit on the page")
    ink = page[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    padded = np.pad(ink, 8, constant_values=255)
    return np.asarray(Image.fromarray(padded).reduce(2))


SPACED_LENGTH = re.compile(r"(\\[hv]space\s*\*?\s*\{)([^{}]*)\}")


def latex_source(formula: str) -> str:
    r"""A normalized formula as LaTeX can compile it: normalization spaced out the units of
    lengths (`\hspace { 1 c m }`), which LaTeX refuses; they are joined back."""
    return SPACED_LENGTH.sub(lambda m: m.group(1) + m.group(2).replace(" ", "") + "}", formula)


def render_document(formulas: Sequence[str], font: str, dpis: Sequence[int], folder: Path,
                    timeout: float) -> tuple[list[dict[int, np.ndarray]] | None, str]:
    """One LaTeX document, one formula per page: per formula {dpi: image}, or None and the error."""
    import subprocess

    body = "\n".join(f"\\[ {latex_source(formula)} \\]\n\\newpage" for formula in formulas)
    (folder / "doc.tex").write_text(RENDER_DOCUMENT % (RENDER_FONTS[font], body))
    latex = ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "doc.tex"]
    try:
        done = subprocess.run(latex, cwd=folder, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"pdflatex took over {timeout:g} s"
    if done.returncode != 0:
        return None, latex_error(done.stdout.decode("utf-8", "replace"))
    images: list[dict[int, np.ndarray]] = [{} for _ in formulas]
    for dpi in dpis:
        # Raw PGM pages: the same pixels as PNG, without compressing and decompressing them (4x faster).
        ghostscript = ["gs", "-q", "-dSAFER", "-dBATCH", "-dNOPAUSE", "-sDEVICE=pgmraw", f"-r{dpi}",
                       "-o", f"page-{dpi}-%05d.pgm", "doc.pdf"]
        done = subprocess.run(ghostscript, cwd=folder, capture_output=True, timeout=timeout)
        pages = sorted(folder.glob(f"page-{dpi}-*.pgm"))
        if done.returncode != 0 or len(pages) != len(formulas):
            return None, f"Ghostscript gave {len(pages)} pages for {len(formulas)} formulas"
        for index, page in enumerate(pages):
            try:
                image = finish_rendering(np.asarray(Image.open(page)))
            except ValueError as error:
                return None, str(error)
            if image is None:
                return None, "renders as a blank page"
            images[index][dpi] = image
    return images, ""


def render_batch(formulas: Sequence[str], font: str, settings: RenderSettings,
                 failures: list[tuple[int, str]], start: int = 0) -> list[dict[int, np.ndarray] | None]:
    """Render formulas[i] for every dpi; a failing document is split in half and each half retried,
    so one bad formula costs a few extra runs, and it alone is reported (index, error)."""
    with tempfile.TemporaryDirectory(prefix="latexocr-render-") as folder:
        images, error = render_document(formulas, font, settings.dpis, Path(folder), settings.timeout)
    if images is not None:
        return images
    if len(formulas) == 1:
        failures.append((start, error))
        return [None]
    half = len(formulas) // 2
    return (render_batch(formulas[:half], font, settings, failures, start)
            + render_batch(formulas[half:], font, settings, failures, start + half))


def render_formulas(formulas_path: Path, out: Path, split: str, settings: RenderSettings,
                    workers: int, progress: bool) -> dict[str, Any]:
    """Render every non-empty line of a formula file into `out/images/` and write `out/<split>.json`
    (image name -> img_path, caption, caption_len) and `out/render_report.json` (formulas that did
    not compile, with LaTeX's error)."""
    from tqdm import tqdm

    require_tex_tools()
    if not formulas_path.is_file():
        raise UserError(f"formula file not found: {formulas_path}")
    if (out / f"{split}.json").exists():
        raise UserError(f"{out / f'{split}.json'} already exists; choose another output folder or split name")
    try:
        lines = formulas_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"formula file {formulas_path} is not UTF-8 text: {error}") from None
    numbered = [(number, " ".join(line.split())) for number, line in enumerate(lines, 1) if line.split()]
    (out / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(font, numbered[start: start + settings.per_document])
            for font in settings.fonts for start in range(0, len(numbered), settings.per_document)]
    entries: dict[str, dict[str, Any]] = {}
    failed: dict[int, dict[str, str]] = {}

    def run(job) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
        """Render one document's formulas; (image name, formula) of each image written, and the failures."""
        font, batch = job
        failures: list[tuple[int, str]] = []
        written = []
        for (number, formula), renderings in zip(batch, render_batch([f for _, f in batch], font, settings, failures)):
            for dpi, image in (renderings or {}).items():
                name = f"{number:06d}_{font}_{dpi}.png"
                Image.fromarray(image).save(out / "images" / name)
                written.append((name, formula))
        return written, [{"line": batch[i][0], "formula": batch[i][1], "font": font, "error": e} for i, e in failures]

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for written, failures in tqdm(pool.map(run, jobs), total=len(jobs), disable=not progress,
                                      desc="render", unit="document"):
            for failure in failures:
                failed.setdefault(failure["line"], failure)
            for name, formula in written:
                entries[name] = {"img_path": name, "caption": formula, "caption_len": len(formula.split())}
    write_json_atomic(out / f"{split}.json", dict(sorted(entries.items())))
    report = {"formulas": len(numbered), "rendered_formulas": len({name.split("_")[0] for name in entries}),
              "images": len(entries), "failed_formulas": len(failed), "dpis": list(settings.dpis),
              "fonts": list(settings.fonts), "failed": [failed[n] for n in sorted(failed)]}
    write_json_atomic(out / "render_report.json", report)
    return report


# --- a training run's weights as an inference checkpoint ------------------------------------------

def export_model(run: Path, out: Path, weights: str, buckets: dict[str, tuple[int, ...]]) -> int:
    """Write a training run's latest step into out (a new folder) as an inference checkpoint: its
    moving average of the weights (weights="average") or its weights ("last"), float16 with a new
    checksum, read through `buckets` (data.bucket_heights / bucket_widths) where given, else the
    buckets it was trained with. Few buckets mean few compiled encoders for predict and serve.
    Returns the step."""
    steps = L.checkpoint_steps(run) if run.is_dir() else []
    if not steps:
        raise UserError(f"{run} holds no training checkpoints (give the checkpoint_dir of a `latexocr.py train` run)")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new folder to export into")
    step = steps[-1]
    item = {"average": "ema_params", "last": "params"}[weights]
    if not (run / str(step) / item).is_dir():
        raise UserError(f"{run / str(step)} holds no moving average of the weights (training.ema_decay was 0); "
                        "export its weights with --weights last")
    metadata = L.read_metadata(run, step)
    cfg = L.network_config_from_metadata(metadata, run / str(step))
    data = {**metadata["data"], **{name: list(values) for name, values in buckets.items()}}
    model_section = L.ModelSection(cell_height=cfg.cell_height, cell_width=cfg.cell_width,
                                   stem_convolutions=cfg.stem_convolutions, max_seq_len=cfg.max_seq_len)
    L.validate_config(Config(data=L.data_section(data), model=model_section))
    shapes = L.abstract(jax.eval_shape(lambda: L.init_params(LatexOCR(cfg), 0)))
    params = L.restore_items(run, step, {item: shapes})[item]
    exported = {**{k: v for k, v in metadata.items() if k != "params_sha256"}, "data": data,
                "exported_from": {"run": str(run), "step": step, "weights": weights}}
    manager = L.checkpoint_manager(out, 1)
    L.save_checkpoint(manager, step, L.to_storage(params), exported)
    manager.wait_until_finished()
    manager.close()
    return step


# --- attention pictures ---------------------------------------------------------------------------

def cross_attention_maps(model: LatexOCR, params: Any, images: jax.Array, tokens: jax.Array, layer: int) -> jax.Array:
    """Teacher-forced over token rows [B, L] (<SOS> first): for the token predicted at each of
    the L - 1 positions, decoder layer `layer`'s cross-attention over the image cells,
    averaged over heads, as [B, L - 1, cell rows, cell cols]."""
    _, state = model.apply({"params": params}, images, tokens[:, :-1], mutable=["intermediates"])
    weights = state["intermediates"][f"blocks_{layer}"]["cross_attention"]["weights"][0]  # [B, H, L-1, cells]
    rows, cols = model.cfg.cell_grid(images.shape)
    return weights.mean(1).reshape(*weights.shape[:1], weights.shape[2], rows, cols)


class AttentionMaps:
    """Where a predictor's decoder looked for each token of an answer; its pass compiles once."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.maps = jax.jit(functools.partial(cross_attention_maps, predictor.model), static_argnames="layer")

    def __call__(self, canvas: np.ndarray, tokens: Sequence[str], layer: int = -1) -> np.ndarray:
        """[len(tokens), rows, cols], each map summing to 1 (cross-attention of decoder layer
        `layer`, averaged over heads)."""
        predictor = self.predictor
        layers = predictor.model.cfg.decoder_layers
        if not -layers <= layer < layers:
            raise UserError(f"attention layer {layer} does not exist: the decoder has {layers} layers "
                            f"(0..{layers - 1}, or -1 for the last)")
        ids = [SOS_ID, *predictor.vocab.encode(tokens), EOS_ID]
        buckets = predictor.data.sequence_buckets
        length = L.sequence_bucket(len(ids), predictor.data) if len(ids) <= max(buckets) else len(ids)
        rows = L.token_array([np.asarray(ids[1:])], length)
        maps = self.maps(predictor.params, jnp.asarray(canvas)[None, ..., None], jnp.asarray(rows), layer=layer % layers)
        return np.asarray(maps[0, : len(tokens)])


def attention_picture(canvas: np.ndarray, tokens: Sequence[str], maps: np.ndarray, max_width: int = 1600) -> Image.Image:
    """A grid with one panel per token: the model's input canvas (ink dark on white) under a red
    heat map of that token's attention (stretched from its own minimum to maximum), the token
    written above."""
    from PIL import ImageDraw

    height, width = canvas.shape
    label_height, gap = 16, 6
    columns = max(1, min(len(tokens), (max_width + gap) // (width + gap)))
    grid_rows = max(1, math.ceil(len(tokens) / columns))
    picture = Image.new("RGB", (columns * (width + gap) - gap, grid_rows * (height + label_height + gap) - gap), "white")
    draw = ImageDraw.Draw(picture)
    paper = (255.0 - 200.0 * np.clip(canvas, 0.0, 1.0))[..., None].repeat(3, -1)
    red = np.array([230.0, 20.0, 20.0])
    for i, (token, heat) in enumerate(zip(tokens, maps)):
        scale = (height // heat.shape[0], width // heat.shape[1])
        spread = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
        alpha = 0.7 * np.kron(spread, np.ones(scale))[..., None]
        panel = Image.fromarray((paper * (1 - alpha) + red * alpha).astype(np.uint8))
        x, y = (i % columns) * (width + gap), (i // columns) * (height + label_height + gap)
        draw.text((x + 2, y + 2), token, fill="black")
        picture.paste(panel, (x, y + label_height))
    return picture


def attention_path(base: str, image: str, several: bool) -> Path:
    """--out FILE.png for one image; FILE_<image stem>.png each when there are several."""
    path = Path(base).with_suffix(".png")
    return path.with_name(f"{path.stem}_{Path(image).stem}.png") if several else path


# --- web page and JSON API ------------------------------------------------------------------------

STATIC_DIR = MODULE_DIR / "static"


MAX_BEAM_WIDTH = 10


STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
                ".woff2": "font/woff2", ".png": "image/png"}


class HTTPError(Exception):
    """A request the service refuses: the HTTP status and a message for the JSON body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class OCRService:
    """The model behind `serve`: loaded and compiled once; requests are read and preprocessed
    in parallel, and decode one at a time (they share the device and the jitted decoders)."""

    def __init__(self, predictor: Predictor, max_bytes: int):
        import threading

        self.predictor, self.max_bytes = predictor, max_bytes
        self.attention = AttentionMaps(predictor)
        self.lock = threading.Lock()

    def warm_up(self) -> None:
        """Compile greedy decoding and the attention pass for every image bucket now, not on the first requests."""
        data = self.predictor.data
        for height in data.bucket_heights:
            for width in data.bucket_widths:
                blank = np.zeros((height, width), np.float32)
                self.predictor.predict_images([blank], 1, batch_size=1)
                self.attention(blank, ["x"])

    def canvases(self, body: bytes) -> list[L.SizedImage]:
        try:
            return self.predictor.preprocess(decode_image(io.BytesIO(body), "upload"), "upload")
        except UserError as error:
            raise HTTPError(400, str(error)) from None

    def predict(self, body: bytes, beam_width: int) -> dict[str, Any]:
        variants = self.canvases(body)
        start = time.perf_counter()
        with self.lock:
            [reading] = self.predictor.read_images([variants], beam_width, batch_size=1)
        return {"latex": detokenize(reading.tokens), "tokens": reading.tokens, "score": round(reading.score, 4),
                "sizes_read": reading.sizes_read, "seconds": round(time.perf_counter() - start, 4)}

    def attention_png(self, body: bytes, beam_width: int, layer: int) -> bytes:
        variants = self.canvases(body)
        with self.lock:
            [reading] = self.predictor.read_images([variants], beam_width, batch_size=1)
            canvas = variants[reading.variant].image
            maps = self.attention(canvas, reading.tokens, layer)
        buffer = io.BytesIO()
        attention_picture(canvas, reading.tokens, maps).save(buffer, "PNG")
        return buffer.getvalue()

    def health(self) -> dict[str, Any]:
        cfg = self.predictor.model.cfg
        return {"status": "ok", "parameters": count_params(self.predictor.params), "vocabulary": len(self.predictor.vocab),
                "decoder_layers": cfg.decoder_layers, "max_beam_width": MAX_BEAM_WIDTH, "max_bytes": self.max_bytes,
                "device": jax.devices()[0].platform}


def request_options(query: dict[str, list[str]], fields: dict[str, str]) -> tuple[int, int]:
    """(beam width, attention layer) from the query string or form fields: method greedy|beam, beam N, layer L."""
    values = {**{k: v[-1] for k, v in query.items()}, **fields}
    method = values.get("method", "beam" if "beam" in values else "greedy")
    try:
        width = int(values.get("beam", 5)) if method == "beam" else 1
        layer = int(values.get("layer", -1))
    except ValueError:
        raise HTTPError(400, "beam and layer must be integers") from None
    if method not in ("greedy", "beam"):
        raise HTTPError(400, f"method must be 'greedy' or 'beam', not {method!r}")
    if not 1 <= width <= MAX_BEAM_WIDTH:
        raise HTTPError(400, f"beam must be between 1 and {MAX_BEAM_WIDTH}")
    return width, layer


def image_and_fields(content_type: str, body: bytes) -> tuple[bytes, dict[str, str]]:
    """The image bytes and the text fields of a request: a multipart form (its file part, or the
    part named `image`) or the raw body."""
    if not content_type.startswith("multipart/form-data"):
        return body, {}
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise HTTPError(400, "malformed multipart body")
    image, fields = None, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is not None or name == "image":
            image = payload if image is None else image
        elif name:
            fields[name] = payload.decode("utf-8", "replace")
    if image is None:
        raise HTTPError(400, "the form has no image file part")
    return image, fields


def make_handler(service: OCRService):
    """The request handler class for `service` (http.server builds one handler per request)."""
    from http.server import BaseHTTPRequestHandler
    from urllib.parse import parse_qs, urlsplit

    routes = {"/": "GET", "/api/health": "GET", "/api/predict": "POST", "/api/attention": "POST"}

    class Handler(BaseHTTPRequestHandler):
        server_version = "latexocr"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"[serve] {self.address_string()} {format % args}\n")

        def send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, status: int, value: dict[str, Any], **headers: str) -> None:
            self.send(status, json.dumps(value, ensure_ascii=False).encode(), "application/json", **headers)

        def answer(self, method: str) -> None:
            url = urlsplit(self.path)
            try:
                if method == "GET" and url.path.startswith("/static/"):
                    return self.static_file(url.path[len("/static/"):])
                if url.path not in routes:
                    raise HTTPError(404, f"no such path: {url.path}")
                if routes[url.path] != method:
                    self.close_connection = True  # a body sent with the wrong method is left unread
                    return self.send_json(405, {"error": f"{url.path} takes {routes[url.path]}, not {method}"},
                                          Allow=routes[url.path])
                if url.path == "/":
                    return self.static_file("index.html")
                if url.path == "/api/health":
                    return self.send_json(200, service.health())
                image, fields = image_and_fields(self.headers.get("Content-Type", ""), self.read_body())
                width, layer = request_options(parse_qs(url.query), fields)
                if url.path == "/api/predict":
                    return self.send_json(200, service.predict(image, width))
                return self.send(200, service.attention_png(image, width, layer), "image/png")
            except (HTTPError, UserError) as error:
                # The body may be unread: the connection cannot carry another request.
                self.close_connection = True
                self.send_json(getattr(error, "status", 400), {"error": str(error)})

        def read_body(self) -> bytes:
            """The request body, refused unread (and the connection closed) when over the limit."""
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise HTTPError(411, "send the image with a Content-Length header")
            if int(length) > service.max_bytes:
                # Read and drop a moderately large body so the client sees the answer, not a reset.
                remaining = int(length) if int(length) <= 8 * service.max_bytes else 0
                while remaining > 0:
                    chunk = self.rfile.read(min(1 << 16, remaining))
                    remaining = remaining - len(chunk) if chunk else 0
                raise HTTPError(413, f"request body of {int(length):,} bytes is over the {service.max_bytes:,} byte limit")
            if int(length) == 0:
                raise HTTPError(400, "empty body: send the image bytes or a multipart form with an image")
            return self.rfile.read(int(length))

        def static_file(self, name: str) -> None:
            path = (STATIC_DIR / name).resolve()
            if STATIC_DIR.resolve() not in path.parents or not path.is_file() or path.suffix not in STATIC_TYPES:
                raise HTTPError(404, f"no such file: /static/{name}")
            self.send(200, path.read_bytes(), STATIC_TYPES[path.suffix], Cache_Control="max-age=3600")

        def do_GET(self) -> None:
            self.answer("GET")

        def do_POST(self) -> None:
            self.answer("POST")

        def do_PUT(self) -> None:
            self.answer("PUT")

        def do_DELETE(self) -> None:
            self.answer("DELETE")

        def do_PATCH(self) -> None:
            self.answer("PATCH")

    return Handler


def make_server(service: OCRService, host: str, port: int):
    """A threaded HTTP server for `service` on host:port (port 0: any free port)."""
    from http.server import ThreadingHTTPServer

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # socketserver's default of 5 waiting connections reset the 20th concurrent client of a busy machine
        request_queue_size = 128

    return Server((host, port), make_handler(service))


# --- benchmark ------------------------------------------------------------------------------------

def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def timed_predict_process(images: Sequence[Path], checkpoint: str, cache_dir: str,
                          beam_width: int = 1) -> tuple[float, float]:
    """Wall seconds from process start to the printed answers of a `predict` of the images, and
    the process's peak resident memory in MB."""
    import subprocess

    env = {**os.environ, "LATEXOCR_CACHE_DIR": cache_dir}
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(MODULE_DIR / "latexocr.py"), "predict", *map(str, images),
                                    "--checkpoint", checkpoint, "--beam", str(beam_width)],
                                   stdout=subprocess.DEVNULL, stderr=errors, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise UserError(f"bench: predict of {images[0]} and others failed: "
                            f"{errors.read().decode(errors='replace').strip()}")
    # ru_maxrss is in kilobytes on Linux.
    return seconds, usage.ru_maxrss / 1024


# A user's `predict` call: one image, a page's worth, a folder's.
PROCESS_IMAGE_COUNTS = (1, 21, 100)


def predict_process_measures(images: list[Path], checkpoint: str, repeats: int, each) -> dict[str, float]:
    """Whole `predict` processes on the first 1, 21 and 100 images, greedy and beam 5, with a warm
    compile cache (a first run warms it): wall seconds, peak memory, and the seconds each image
    beyond the first adds."""
    results = {}
    counts = sorted({min(count, len(images)) for count in PROCESS_IMAGE_COUNTS})
    with tempfile.TemporaryDirectory() as cache_dir:
        for name, width in (("greedy", 1), ("beam5", 5)):
            for count in each(counts, f"predict processes, {name}"):
                timed_predict_process(images[:count], checkpoint, cache_dir, width)
                runs = [timed_predict_process(images[:count], checkpoint, cache_dir, width) for _ in range(repeats)]
                seconds, rss = np.median(runs, axis=0)
                results[f"process_{name}_{count}_s"], results[f"process_{name}_{count}_rss_mb"] = seconds, rss
                if count > 1:
                    one = results[f"process_{name}_{counts[0]}_s"]
                    results[f"process_{name}_{count}_added_s_per_image"] = (seconds - one) / (count - 1)
    return {key: float(value) for key, value in results.items()}


# The training step `bench` times: a batch of 16 images of 64 x 320 px with 100-token captions, the
# shape the original project's design was measured at on this kind of CPU (22.2 samples/s).
TRAIN_STEP_SHAPE = dict(batch=16, height=64, width=320, tokens=100)


def train_step_samples_per_s(predictor: Predictor, repeats: int) -> float:
    """Samples/s of the cross-entropy + CTC training step (the default training settings) on the
    predictor's model and parameters, at TRAIN_STEP_SHAPE, after compiling; median of `repeats`
    timings of 5 steps each."""
    shape = TRAIN_STEP_SHAPE
    training = L.TrainingSection()
    optimizer = L.make_optimizer(training)
    step = L.make_train_step(predictor.model, optimizer, training.label_smoothing, training.ctc_weight)
    rng = np.random.default_rng(0)
    batch = {"images": jnp.asarray(rng.random((shape["batch"], shape["height"], shape["width"], 1), np.float32)),
             "tokens": jnp.asarray(rng.integers(7, predictor.model.cfg.vocab_size, (shape["batch"], shape["tokens"] + 1)),
                                   jnp.int32)}
    state = [jax.tree.map(jnp.array, predictor.params), None]
    state[1] = optimizer.init(state[0])

    def five_steps():
        for _ in range(5):
            state[0], state[1], metrics = step(state[0], state[1], batch, jax.random.PRNGKey(0), training.lr)
        jax.block_until_ready(metrics)

    five_steps()
    return 5 * shape["batch"] / median_seconds(five_steps, repeats)


BENCH_TARGETS = {  # for the `small` model on a 2-core CPU: (direction, value)
    "cold_predict_warm_cache_s": ("<=", 3.0), "greedy_ms": ("<=", 100.0), "beam5_ms": ("<=", 500.0),
    "predict_peak_rss_mb": ("<=", 400.0), "kv_cache_speedup": (">=", 5.0),
    "process_greedy_21_added_s_per_image": ("<=", 0.1), "process_beam5_21_added_s_per_image": ("<=", 0.3),
    "process_greedy_21_rss_mb": ("<=", 500.0), "train_step_samples_per_s": (">=", 22.2),
}


class UncachedDecoder:
    """Greedy decoding as the original project did it, for `bench` to compare with: every step
    re-runs the decoder over the whole prefix instead of reading a KV cache (the image is still
    encoded once). Prefix lengths are rounded up to a power of two, at least 16, so that only a
    few shapes compile."""

    def __init__(self, predictor: Predictor):
        model = predictor.model
        self.predictor = predictor
        self.cross_kv = jax.jit(lambda p, images: encode_memory(model, p, images).keys_values)
        self.prefix_logits = jax.jit(
            lambda p, tokens, cross_kv: model.apply({"params": p}, tokens, cross_kv, method=LatexOCR.decode))

    def __call__(self, images: np.ndarray) -> list[list[str]]:
        params = self.predictor.params
        cross_kv = self.cross_kv(params, jnp.asarray(images))
        length = self.predictor.model.cfg.max_seq_len
        tokens = np.full((images.shape[0], length), PAD_ID, np.int32)
        tokens[:, 0] = SOS_ID
        done = np.zeros(images.shape[0], bool)
        for position in range(length - 1):
            width = min(length, max(16, 1 << position.bit_length()))
            logits = self.prefix_logits(params, jnp.asarray(tokens[:, :width]), cross_kv)
            next_token = np.where(done, PAD_ID, np.asarray(jnp.argmax(logits[:, position], -1)))
            tokens[:, position + 1] = next_token
            done |= next_token == EOS_ID
            if done.all():
                break
        return [self.predictor.vocab.decode(row) for row in tokens]


def bench(predictor: Predictor, checkpoint: str, images: list[Path], repeats: int, long_images: int,
          progress: bool) -> dict[str, Any]:
    """Speed and memory of decoding with one model on the given images (see `command_bench`)."""
    import resource
    from tqdm import tqdm

    def each(items, desc):
        return tqdm(items, desc=desc, disable=not progress, leave=False)

    results: dict[str, Any] = {"images": len(images), "device": jax.devices()[0].device_kind,
                               "params": count_params(predictor.params)}
    with tempfile.TemporaryDirectory() as scratch:
        # Each repeat compiles into an empty cache directory, then reads it back in a new process.
        runs = [(timed_predict_process(images[:1], checkpoint, str(Path(scratch) / str(run))),
                 timed_predict_process(images[:1], checkpoint, str(Path(scratch) / str(run))))
                for run in each(range(repeats), "cold predict")]
    (cold, cold_rss), (warm, warm_rss) = (np.median([run[i] for run in runs], axis=0) for i in (0, 1))
    results.update(cold_predict_empty_cache_s=float(cold), cold_predict_empty_cache_rss_mb=float(cold_rss),
                   cold_predict_warm_cache_s=float(warm), predict_peak_rss_mb=float(warm_rss))
    results.update(predict_process_measures(images, checkpoint, repeats, each))

    start = time.perf_counter()
    variants = [predictor.preprocess(open_image(path), str(path)) for path in images]
    results["preprocess_ms"] = 1000 * (time.perf_counter() - start) / len(images)
    sizes_read = []
    for canvases in each(variants, "compiling"):  # every shape used, once per decoder
        for _, canvas in canvases:
            jax.block_until_ready(predictor.encode(canvas[None, ..., None]))
        sizes_read.append(predictor.read_images([canvases], 1, batch_size=1)[0].sizes_read)
        predictor.read_images([canvases], 5, batch_size=1)
    results["sizes_read_mean"] = float(np.mean(sizes_read))
    per_image = {"encoder": [], "greedy": [], "beam5": []}
    lengths = []
    for canvases in each(variants, "batch 1"):
        first = canvases[0].image[None, ..., None]
        per_image["encoder"].append(median_seconds(
            lambda: jax.block_until_ready(predictor.encode(first)), repeats))
        per_image["greedy"].append(median_seconds(lambda: predictor.read_images([canvases], 1, batch_size=1), repeats))
        per_image["beam5"].append(median_seconds(lambda: predictor.read_images([canvases], 5, batch_size=1), repeats))
        lengths.append(len(predictor.decode_batch(first, 1)[0][0]))
    results.update({f"{name}_ms": 1000 * float(np.median(times)) for name, times in per_image.items()})
    results["greedy_tokens_median"] = float(np.median(lengths))

    predictor.read_images(variants, batch_size=32)
    seconds = median_seconds(lambda: predictor.read_images(variants, batch_size=32), repeats)
    results["throughput_batch32_images_per_s"] = len(variants) / seconds

    batch_of_one = [canvases[0].image[None, ..., None] for canvases in variants]
    long = [image for image, length in zip(batch_of_one, lengths) if length >= 100][:long_images]
    results["long_images"] = len(long)
    if long:
        uncached_decode = UncachedDecoder(predictor)
        for image in long:
            uncached_decode(image)
        cached = [median_seconds(lambda: predictor.decode_batch(image, 1), repeats) for image in each(long, "cached")]
        uncached = [median_seconds(lambda: uncached_decode(image), repeats)
                    for image in each(long, "no cache")]
        results.update(long_cached_ms=1000 * float(np.median(cached)), long_uncached_ms=1000 * float(np.median(uncached)),
                       kv_cache_speedup=float(np.median(np.array(uncached) / np.array(cached))))
    results["train_step_samples_per_s"] = train_step_samples_per_s(predictor, repeats)
    results["bench_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


BENCH_ROWS = [
    ("cold_predict_empty_cache_s", "cold predict, 1 image, empty compile cache", "{:.2f} s"),
    ("cold_predict_empty_cache_rss_mb", "  its peak resident memory", "{:.0f} MB"),
    ("cold_predict_warm_cache_s", "cold predict, 1 image, warm compile cache", "{:.2f} s"),
    ("predict_peak_rss_mb", "  its peak resident memory", "{:.0f} MB"),
    ("preprocess_ms", "image preprocessing per image", "{:.1f} ms"),
    ("sizes_read_mean", "sizes each image is read at, greedy (mean)", "{:.2f}"),
    ("greedy_ms", "greedy, batch 1, per image (warm)", "{:.1f} ms"),
    ("encoder_ms", "  encoder, once", "{:.1f} ms"),
    ("greedy_tokens_median", "  tokens per answer (as preprocessed)", "{:.0f}"),
    ("beam5_ms", "beam 5, batch 1, per image (warm)", "{:.1f} ms"),
    ("throughput_batch32_images_per_s", "greedy, batch 32, throughput", "{:.1f} images/s"),
    ("long_uncached_ms", "greedy without KV cache, 100+ token answers", "{:.1f} ms"),
    ("long_cached_ms", "greedy with KV cache, same images", "{:.1f} ms"),
    ("kv_cache_speedup", "KV cache speed-up (median of per-image ratios)", "{:.1f}x"),
    ("train_step_samples_per_s", "training step, batch 16, 64x320 px, 100 tokens", "{:.1f} samples/s"),
    ("bench_peak_rss_mb", "peak resident memory of this benchmark", "{:.0f} MB"),
]


def process_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for name, method in (("greedy", "greedy"), ("beam5", "beam 5")):
        for count in sorted(int(key.split("_")[2]) for key in results
                            if key.startswith(f"process_{name}_") and key.endswith("_rss_mb")):
            prefix = f"process_{name}_{count}"
            rows += [(f"{prefix}_s", f"predict process, {count} image{'s' * (count > 1)}, {method}", "{:.2f} s"),
                     (f"{prefix}_added_s_per_image", "  each image beyond the first", "{:.3f} s"),
                     (f"{prefix}_rss_mb", "  its peak resident memory", "{:.0f} MB")]
    return rows


def format_bench(results: dict[str, Any]) -> str:
    lines = [f"{results['images']} images, {results['params'] / 1e6:.1f} M parameters, {results['device']}",
             f"{'measure':<48} {'median':>14}  target (small, 2-core CPU)"]
    for key, label, fmt in BENCH_ROWS[:4] + process_rows(results) + BENCH_ROWS[4:]:
        if key not in results:
            continue
        target = ""
        if key in BENCH_TARGETS:
            direction, value = BENCH_TARGETS[key]
            met = results[key] <= value if direction == "<=" else results[key] >= value
            target = f"{direction} {value:g}  {'met' if met else 'missed'}"
        lines.append(f"{label:<48} {fmt.format(results[key]):>14}  {target}")
    return "\n".join(lines)


# --- commands -------------------------------------------------------------------------------------

def command_prepare(args, config: Config) -> int:
    out = Path(args.out)
    if args.csv:
        csv_paths = {}
        for item in args.csv:
            split, sep, path = item.partition("=")
            if not sep or split not in SPLITS:
                raise UserError(f"--csv expects split=path with split in {', '.join(SPLITS)}, got {item!r}")
            if not Path(path).is_file():
                raise UserError(f"CSV file not found: {path}")
            csv_paths[split] = Path(path)
        if not args.images:
            raise UserError("--csv needs --images, the folder holding the images")
        pairs, images = pairs_from_csv(csv_paths), Path(args.images)
    else:
        if not args.root:
            raise UserError("give --root (original IM2LATEX-100K layout) or --csv split=file.csv")
        root = Path(args.root)
        if not root.is_dir():
            raise UserError(f"folder not found: {root}")
        if is_gg_layout(root):
            pairs, images = pairs_from_gg_layout(root), root
        else:
            formulas, lists, images = find_original_layout(root)
            pairs = pairs_from_original(formulas, lists)
        if args.images:
            images = Path(args.images)
    if not images.is_dir():
        raise UserError(f"image folder not found: {images}")
    report = prepare(pairs, images, out, args.copy_images)
    for split, counts in report.items():
        print(f"{split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    base = out / "images" if args.copy_images else images
    print(f"wrote {out}/<split>.json; set data.image_base_dir={base} (details: {out}/prepare_report.json)")
    return 0


def command_render(args, config: Config) -> int:
    try:
        dpis = tuple(int(d) for d in args.dpi.split(","))
    except ValueError:
        raise UserError(f"--dpi expects whole numbers separated by commas, got {args.dpi!r}") from None
    fonts = tuple(f.strip() for f in args.fonts.split(","))
    if not dpis or min(dpis) < 30 or max(dpis) > 1200:
        raise UserError("--dpi values must be between 30 and 1200")
    if not set(fonts) <= set(RENDER_FONTS):
        raise UserError(f"--fonts must name some of {', '.join(RENDER_FONTS)}, got {args.fonts!r}")
    if args.per_document < 1 or args.workers < 1:
        raise UserError("--per-document and --workers must be at least 1")
    settings = RenderSettings(dpis=dpis, fonts=fonts, per_document=args.per_document)
    out = Path(args.out)
    report = render_formulas(Path(args.formulas), out, args.split, settings, args.workers, not args.quiet)
    print(f"{report['rendered_formulas']} of {report['formulas']} formulas rendered into {report['images']} images "
          f"in {out / 'images'}; {report['failed_formulas']} did not compile (listed in {out / 'render_report.json'}); "
          f"wrote {out / (args.split + '.json')}: use it with --set data.image_base_dir={out / 'images'}")
    return 0


def command_combine(args, config: Config) -> int:
    sources = []
    for item in args.add:
        path, sep, images = item.partition("=")
        if not sep or not images:
            raise UserError(f"--add expects SPLIT.json=IMAGE_FOLDER, got {item!r}")
        if not resolve_path(images).is_dir():
            raise UserError(f"image folder not found: {images} (in --add {item})")
        sources.append((path, resolve_path(images)))
    if args.holdout < 0:
        raise UserError("--holdout must be >= 0")
    if args.holdout and args.holdout_from not in [path for path, _ in sources]:
        raise UserError("--holdout-from must name one of the --add split files")
    out = Path(args.out)
    if (out / "train.json").exists():
        raise UserError(f"{out / 'train.json'} exists; choose another output folder")
    if args.max_tokens < 0:
        raise UserError("--max-tokens must be >= 0 (0 keeps every length)")
    train, validate, counts = combine_splits(sources, excluded_formulas(args.exclude), args.holdout,
                                             args.holdout_from or "", args.seed, args.max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "train.json", train)
    if args.holdout:
        write_json_atomic(out / "validate.json", validate)
    write_json_atomic(out / "combine_report.json", counts)
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f"; wrote {out}/train.json"
          + (f" and {out}/validate.json" if args.holdout else "") + " (image paths are absolute)")
    return 0


def command_serve(args, config: Config) -> int:
    if not 0 <= args.port < 65536 or args.max_mb <= 0:
        raise UserError("--port must be 0..65535 and --max-mb positive")
    evaluation = config.evaluation
    predictor = load_predictor(args.checkpoint or evaluation.checkpoint_path, evaluation, traced_program_dir())
    service = OCRService(predictor, int(args.max_mb * 1024 * 1024))
    print("latexocr: compiling the decoder for every image bucket...", file=sys.stderr)
    service.warm_up()
    try:
        server = make_server(service, args.host, args.port)
    except OSError as error:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    host, port = server.server_address[:2]
    print(f"latexocr: serving http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def command_export(args, config: Config) -> int:
    buckets = {name: values for name, values in (("bucket_heights", args.bucket_heights),
                                                 ("bucket_widths", args.bucket_widths)) if values}
    step = export_model(Path(args.run_dir), Path(args.out), args.weights, buckets)
    which = "moving average of the weights" if args.weights == "average" else "weights"
    print(f"wrote {args.out}: the {which} of {args.run_dir} at step {step}, float16"
          + (f", read through {', '.join(f'{k} {list(v)}' for k, v in buckets.items())}" if buckets else ""))
    return 0


def command_attention(args, config: Config) -> int:
    """Read each image as `predict` does and draw where the decoder looked for each token."""
    evaluation = L.decoding_options(args, config).evaluation
    predictor = load_predictor(args.checkpoint or evaluation.checkpoint_path, evaluation, traced_program_dir())
    variants = [predictor.preprocess(open_image(path), path) for path in args.images]
    attention = AttentionMaps(predictor)
    for path, canvases, reading in zip(args.images, variants, predictor.read_images(variants, evaluation.decode_width)):
        canvas = canvases[reading.variant].image
        picture = attention_picture(canvas, reading.tokens, attention(canvas, reading.tokens, args.layer))
        out = attention_path(args.out, path, len(args.images) > 1)
        try:
            picture.save(out)
        except OSError as error:
            raise UserError(f"cannot write the attention picture {out}: {error.strerror or error}") from None
        print(f"{out}: {detokenize(reading.tokens)}")
    return 0


def command_bench(args, config: Config) -> int:
    if args.images < 1 or args.repeats < 1 or args.long_images < 0:
        raise UserError("--images and --repeats must be at least 1, --long-images at least 0")
    evaluation = config.evaluation
    checkpoint = args.checkpoint or evaluation.checkpoint_path
    predictor = load_predictor(checkpoint, evaluation, traced_program_dir())
    paths = dataclasses.replace(predictor.data, image_base_dir=config.data.image_base_dir)
    examples, _ = load_split(config.data.test_split, paths, predictor.vocab)
    if not examples:
        raise UserError(f"no usable images in {config.data.test_split}")
    images = [example.image_path for example in examples[: args.images]]
    results = bench(predictor, str(find_checkpoint_dir(checkpoint)), images, args.repeats, args.long_images,
                    progress=not args.quiet)
    print(json.dumps(results) if args.json else format_bench(results))
    return 0


def command_normalize(args, config: Config) -> int:
    if args.check:
        formulas = [" ".join(line.split()) for line in read_raw_formulas(Path(args.check))]
        identical, canonical, failures = check_round_trip(formulas)
        print(f"written as a person would and normalized back, {len(formulas)} formulas: {100 * identical:.2f} % "
              f"come back identical, {100 * canonical:.2f} % as the normalizer writes the formula itself")
        if args.report:
            write_json_atomic(Path(args.report), failures)
        return 0
    if not args.source or not args.out:
        raise UserError("normalize needs a source and an output file (or --check FILE)")
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another output file")
    vocab = L.load_vocabulary(args.vocab)
    sources = read_raw_formulas(Path(args.source))
    kept, report = normalize_formulas(sources, vocab, excluded_formulas(args.exclude), args.max_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text("".join(f + "\n" for f in kept), encoding="utf-8")
    temporary.replace(out)
    report_path = Path(args.report) if args.report else out.with_name(out.stem + "_report.json")
    write_json_atomic(report_path, report)
    print(f"kept {report['kept']} of {report['formulas']} formulas in {out}; dropped: "
          + ", ".join(f"{n} {reason}" for reason, n in report["dropped"].items()) + f" (details: {report_path})")
    return 0


def bucket_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None


def build_parser() -> argparse.ArgumentParser:
    parser, add = L.command_parser("latexocr_tools.py", __doc__.split("\n\n")[0])
    sub = add("prepare", "convert IM2LATEX-100K (original or gg_processed layout, or formula,image CSV) "
                         "to split JSON files")
    sub.add_argument("--root", help="folder with im2latex_formulas.norm.lst, split lists and an image folder, "
                                    "or the gg_processed layout (<split>.formulas.norm.txt, <split>.matching.txt, "
                                    "images_<split>/)")
    sub.add_argument("--csv", action="append", default=[], metavar="SPLIT=FILE",
                     help="a formula,image CSV for one split (repeatable)")
    sub.add_argument("--images", help="image folder (overrides the one found under --root)")
    sub.add_argument("--out", required=True, help="output folder for train/validate/test.json")
    sub.add_argument("--copy-images", action="store_true", help="copy the images into OUT/images")
    sub.set_defaults(run=command_prepare)

    sub = add("combine", "merge split files into one train split, leaving out test formulas and holding "
                         "some formulas out for validation")
    sub.add_argument("out", help="output folder: train.json, validate.json, combine_report.json")
    sub.add_argument("--add", action="append", default=[], required=True, metavar="SPLIT.json=IMAGES",
                     help="a split file and the folder its img_paths are relative to (repeatable)")
    sub.add_argument("--exclude", action="append", default=[], metavar="FILE",
                     help="leave out every formula of this split JSON or text file (one a line; repeatable)")
    sub.add_argument("--holdout", type=int, default=0, help="distinct formulas to hold out for validation")
    sub.add_argument("--holdout-from", help="the --add split file whose images validate (real images, say)")
    sub.add_argument("--seed", type=int, default=0, help="which formulas are held out (default 0)")
    sub.add_argument("--max-tokens", type=int, default=0,
                     help="keep only training captions of at most N tokens (validate.json is unchanged)")
    sub.set_defaults(run=command_combine)

    sub = add("normalize", "raw LaTeX formulas -> IM2LATEX-normalized, one a line, ready for render")
    sub.add_argument("source", nargs="?", help="a JSON object of id -> formula, or a text file, one a line")
    sub.add_argument("out", nargs="?", help="the normalized formulas, one a line (never overwritten)")
    sub.add_argument("--vocab", default=str(L.MODULE_DIR / "data" / "model" / "vocab.json"),
                           help="formulas with a token outside this vocabulary are dropped")
    sub.add_argument("--exclude", action="append", default=[],
                           help="a split file or formula file whose formulas are dropped (repeatable)")
    sub.add_argument("--max-tokens", type=int, default=150)
    sub.add_argument("--report", help="where the counts go (default: <out stem>_report.json)")
    sub.add_argument("--check", metavar="FILE",
                           help="instead: write each normalized formula of FILE as a person would, normalize it "
                                "back, and report the share that comes back identical")
    sub.set_defaults(run=command_normalize)

    sub = add("render", "render a file of normalized formulas (one a line) into training images and a split JSON")
    sub.add_argument("formulas", help="text file, one space-separated normalized formula a line")
    sub.add_argument("out", help="output folder: images/, <split>.json, render_report.json")
    sub.add_argument("--split", default="train", help="name of the split file to write (default train)")
    sub.add_argument("--dpi", default="200", metavar="D[,D...]",
                     help="render each formula at these resolutions, e.g. 160,200,250 (default 200, IM2LATEX-100K's)")
    sub.add_argument("--fonts", default="cm", metavar="F[,F...]",
                     help=f"math fonts, each a rendering of its own: {', '.join(RENDER_FONTS)} (default cm)")
    sub.add_argument("--per-document", type=int, default=32, help="formulas per LaTeX document (default 32)")
    sub.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="documents rendered at once")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.set_defaults(run=command_render)

    sub = add("export", "write a training run's latest step as an inference checkpoint (float16), "
                        "for --checkpoint or data/model")
    sub.add_argument("run_dir", metavar="RUN", help="the run's checkpoint_dir")
    sub.add_argument("out", help="a new folder to write the checkpoint into")
    sub.add_argument("--weights", choices=("average", "last"), default="average",
                     help="the moving average of the weights (training.ema_decay; the default) or the weights")
    sub.add_argument("--bucket-heights", type=bucket_list, metavar="H,H,...",
                     help="read images through these bucket heights (default: those the run trained with)")
    sub.add_argument("--bucket-widths", type=bucket_list, metavar="W,W,...",
                     help="and these bucket widths (fewer buckets: fewer compiled encoders, a faster start)")
    sub.set_defaults(run=command_export)

    sub = add("attention", "draw where the decoder looked for each token of each image's answer")
    sub.add_argument("images", nargs="+", help="image files")
    sub.add_argument("--out", required=True, metavar="FILE.png", help="the picture (FILE_<image>.png for several images)")
    sub.add_argument("--checkpoint", help="run or checkpoint directory (default: evaluation.checkpoint_path)")
    sub.add_argument("--beam", type=int, metavar="N", help="beam search with N beams (default: evaluation.generation_method)")
    sub.add_argument("--length-penalty", type=float, metavar="X", help="beams compare log-probability / length ** X")
    sub.add_argument("--layer", type=int, default=-1, metavar="L",
                     help="decoder layer whose cross-attention is drawn, averaged over heads (default -1: the last)")
    sub.set_defaults(run=command_attention)

    sub = add("serve", "web page and JSON API: upload an image, get its LaTeX")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sub.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sub.add_argument("--checkpoint", help="run or checkpoint directory (default: evaluation.checkpoint_path)")
    sub.add_argument("--max-mb", type=float, default=10.0, help="largest request body in MB (default 10)")
    sub.set_defaults(run=command_serve)

    sub = add("bench", "time and measure decoding on the test split's images (default: the shipped model)")
    sub.add_argument("--checkpoint", help="run or checkpoint directory (default: evaluation.checkpoint_path)")
    sub.add_argument("--images", type=int, default=100, help="how many test images (default 100)")
    sub.add_argument("--repeats", type=int, default=3,
                     help="runs of each timing, and of each cold start (default 3); medians are reported")
    sub.add_argument("--long-images", type=int, default=10,
                     help="images with 100+ token answers to time with and without the KV cache (default 10)")
    sub.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.set_defaults(run=command_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return L.run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
