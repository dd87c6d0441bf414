"""Where a module's lines go: per `# --- section ---`, its code, docstring, comment and blank lines,
and with names given, the lines of those top-level definitions (decorators and the blank lines
after each included, as deleting them would remove).

    python scripts/line_budget.py latexocr.py
    python scripts/line_budget.py latexocr.py start_distributed data_parallel_mesh to_global
"""

import ast
import sys

KINDS = ("code", "docstring", "comment", "blank")


def line_kinds(source: str) -> dict[int, str]:
    lines = source.splitlines()
    kinds = {number: "blank" if not text.strip() else "comment" if text.strip().startswith("#") else "code"
             for number, text in enumerate(lines, 1)}
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            kinds.update((number, "docstring") for number in range(body[0].lineno, body[0].end_lineno + 1))
    return kinds


def definition_lines(source: str, names: set[str]) -> int:
    nodes = ast.parse(source).body
    lines = source.splitlines()
    total = 0
    for index, node in enumerate(nodes):
        targets = getattr(node, "targets", [])
        name = getattr(node, "name", None) or (targets[0].id if targets and isinstance(targets[0], ast.Name) else None)
        if name in names:
            start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
            end = node.end_lineno
            while end < len(lines) and not lines[end].strip():
                end += 1
            total += end - start + 1
    return total


def main(path: str, names: list[str]) -> None:
    source = open(path).read()
    kinds = line_kinds(source)
    sections: dict[str, dict[str, int]] = {}
    section = "(before the first section)"
    for number, text in enumerate(source.splitlines(), 1):
        if text.startswith("# --- "):
            section = text.strip("# -")
        sections.setdefault(section, dict.fromkeys(KINDS, 0))[kinds[number]] += 1
    sections["all"] = {kind: sum(counts[kind] for counts in sections.values()) for kind in KINDS}
    print(f"{'section':<28}{'lines':>7}" + "".join(f"{kind:>11}" for kind in KINDS))
    for name, counts in sections.items():
        print(f"{name:<28}{sum(counts.values()):>7}" + "".join(f"{counts[kind]:>11}" for kind in KINDS))
    if names:
        print(f"top-level definitions {' '.join(names)}: {definition_lines(source, set(names))} lines")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
