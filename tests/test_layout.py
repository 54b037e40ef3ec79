"""The layout the README's file map promises, read from the imports: the method's files at the root import no
tool, losses.py imports nothing from the project (a loss is a function of tensors), and no file imports
itself back through others."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = {p.stem for p in ROOT.glob("*.py")}
TOOLS = {p.stem for p in (ROOT / "tools").glob("*.py")}


def project_imports(path: Path) -> set[str]:
    """The project's modules a file imports, anywhere in it (imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & (CORE | TOOLS)


GRAPH = {p.stem: project_imports(p) for p in [*ROOT.glob("*.py"), *(ROOT / "tools").glob("*.py")]}


def test_the_method_imports_no_tool():
    assert CORE >= {"model", "lora", "losses", "train", "eval"} and TOOLS >= {"toy", "sweep", "bench"}
    assert {m: GRAPH[m] & TOOLS for m in CORE if GRAPH[m] & TOOLS} == {}


def test_losses_are_functions_of_tensors():
    assert GRAPH["losses"] == set()


def test_no_import_circle():
    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in GRAPH[start])
    assert [m for m in GRAPH if reaches(m, m, {m})] == []
