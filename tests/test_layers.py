"""The layers the tree shows hold: read every module's imports (AST, nothing is imported or run).

    charlm/cli/      the command line: the only code that imports typer or rich
    charlm/server/   the HTTP server: the only code that imports starlette or uvicorn
    charlm/*.py      the library both stand on: imports neither of them, and never prints
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "charlm"
CLI_ONLY = {"typer", "rich", "click"}
SERVER_ONLY = {"starlette", "uvicorn"}


def modules():
    """(dotted name, path) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def layer(name: str) -> str:
    if name == "charlm.__main__":  # `python -m charlm`: the command line's second entry point
        return "cli"
    parts = name.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in ("cli", "server") else "library"


def imports(path: Path):
    """(imported module, names taken from it, line) for every import statement, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, [a.name for a in node.names], node.lineno


def test_the_walk_sees_every_layer():
    """The checks below read real modules of each layer (a walk that found nothing would pass them all)."""
    found = {layer(name) for name, _ in modules()}
    assert found == {"library", "cli", "server"}
    names = {name for name, _ in modules()}
    assert {"charlm.cli.train", "charlm.cli.app", "charlm.server.app", "charlm.server.engine", "charlm.train",
            "charlm.model"} <= names


@pytest.mark.parametrize("name,path", [m for m in modules() if layer(m[0]) == "library"], ids=lambda v: str(v))
def test_the_library_imports_neither_the_command_line_nor_the_server(name, path):
    for module, _, line in imports(path):
        top = module.split(".")[0]
        assert top not in CLI_ONLY | SERVER_ONLY, f"{path.name}:{line} imports {module} (a library module)"
        assert not module.startswith(("charlm.cli", "charlm.server")), \
            f"{path.name}:{line} imports {module}: the library must not reach up into a layer above it"


@pytest.mark.parametrize("name,path", [m for m in modules() if layer(m[0]) == "library"], ids=lambda v: str(v))
def test_the_library_never_prints(name, path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            raise AssertionError(f"{path.name}:{node.lineno} calls print(); library code returns values")
        if isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr") and \
                isinstance(node.value, ast.Name) and node.value.id == "sys":
            raise AssertionError(f"{path.name}:{node.lineno} writes to sys.{node.attr}; library code returns values")


def test_only_the_server_imports_the_web_stack_and_it_does_not_import_the_command_line():
    for name, path in modules():
        for module, _, line in imports(path):
            if module.split(".")[0] in SERVER_ONLY:
                assert layer(name) in ("server", "cli") and (layer(name) == "server" or name == "charlm.cli.serve"), \
                    f"{path.name}:{line} imports {module}: only charlm/server/ (and `charlm serve` starting it) may"
            if layer(name) == "server":
                assert module.split(".")[0] not in CLI_ONLY and not module.startswith("charlm.cli"), \
                    f"{path.name}:{line} imports {module}: the server renders JSON, not terminal output"


def test_no_module_imports_another_modules_private_name():
    for name, path in modules():
        for module, names, line in imports(path):
            if not module.startswith("charlm"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{path.name}:{line} imports {', '.join(private)} from {module}: make it public " \
                                "where it is defined, or keep the code that uses it there"


def test_the_rules_catch_what_they_are_for(tmp_path):
    """The readers above see a violation: a library module that imports rich, a server module that imports
    the command line, and a private import, each written to a file and read back."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom rich.console import Console\n\ndef f():\n    from charlm.cli.display import x\n"
                   "    from charlm.corpus import _Source\n", encoding="utf-8")
    found = list(imports(bad))
    assert ("rich.console", ["Console"], 2) in found
    assert ("charlm.cli.display", ["x"], 5) in found
    assert ("charlm.corpus", ["_Source"], 6) in found
    assert layer("charlm.cli.train") == "cli" and layer("charlm.server.app") == "server"
    assert layer("charlm.cli") == "cli" and layer("charlm.train") == "library" and layer("charlm") == "library"
