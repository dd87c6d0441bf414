"""Sort an evaluation's answers by what separates them from their references: exact, spacing
commands only, braces only (both print nothing or little), one or two other tokens, or more.

    python scripts/error_kinds.py runs/eval/predictions.json
"""

import collections
import json
import sys

import Levenshtein

SPACING = {"\\,", "\\;", "\\:", "\\!", "~", "\\", "\\quad", "\\qquad", "\\enspace", "\\thinspace", "\\ "}
BRACES = {"{", "}"}


def without(tokens: list[str], dropped: set[str]) -> list[str]:
    return [token for token in tokens if token not in dropped]


def error_kind(reference: list[str], prediction: list[str]) -> str:
    if reference == prediction:
        return "exact"
    for kind, dropped in (("spacing only", SPACING), ("braces only", BRACES),
                          ("spacing and braces only", SPACING | BRACES)):
        if without(reference, dropped) == without(prediction, dropped):
            return kind
    distance = Levenshtein.distance(reference, prediction)
    return {1: "one other token", 2: "two other tokens"}.get(distance, "more")


def main(path: str) -> None:
    rows = json.load(open(path))["predictions"]
    kinds = collections.Counter(error_kind(row["reference"].split(), row["prediction"].split()) for row in rows)
    for kind, count in kinds.most_common():
        print(f"{kind:<26}{count:6d}  {100 * count / len(rows):5.2f} %")


if __name__ == "__main__":
    main(*sys.argv[1:])
