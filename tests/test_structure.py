"""Dependencies run one way: package-level import cycles, and what the CLI and runtime pull in.

The import graph is read from the source (ast), every import counted wherever it sits (module
level or inside a function: a lazy import is still a dependency), TYPE_CHECKING blocks aside.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import llmc

ROOT = Path(llmc.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str) -> str:
    """llmc.a.b.c -> llmc.a (top-level modules are their own package)."""
    return ".".join(module.split(".")[:2])


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Modules named by the imports of one file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and module_level_only:
                if isinstance(child, ast.ClassDef):
                    visit(child, top)  # class bodies run at import
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = pkg.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)  # `from pkg import module`
            visit(child, top)

    visit(tree, True)
    return found


def _llmc_files() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _exists(module: str) -> bool:
    path = ROOT.parent / module.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def package_graph() -> dict[str, set[str]]:
    """{llmc package: llmc packages it imports} (a top-level module counts as a package)."""
    graph: dict[str, set[str]] = {}
    for f in _llmc_files():
        src = _package(_module_name(f))
        deps = graph.setdefault(src, set())
        for name in _imports(f):
            if name.startswith("llmc.") and _exists(_package(name)) and _package(name) != src:
                deps.add(_package(name))
    return graph


def test_no_package_imports_a_package_that_imports_it_back():
    graph = package_graph()

    def reaches(a: str, b: str) -> bool:
        seen, todo = set(), [a]
        while todo:
            n = todo.pop()
            if n == b:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(graph.get(n, ()))
        return False

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a, deps in graph.items() for b in deps if reaches(b, a))
    assert not cycles, "package import cycles:\n" + "\n".join(cycles)


def test_engine_and_runtime_do_not_import_build_or_torch_at_module_level():
    for pkg in ("engine", "runtime"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            top = _imports(f, module_level_only=True)
            bad = {n for n in top if n.split(".")[0] in ("torch", "modelopt") or n.startswith("llmc.build")}
            assert not bad, f"{f.relative_to(ROOT.parent)} imports {sorted(bad)} at module level"
            every = _imports(f)
            assert not any(n.startswith("llmc.build") for n in every), \
                f"{f.relative_to(ROOT.parent)} imports llmc.build (a serving host needs no build code)"


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


HEAVY = ("torch", "modelopt", "onnxruntime", "tensorrt")


def test_cli_help_imports_no_heavy_module():
    loaded = _loaded_after("import contextlib, io\nfrom llmc.cli.app import main\n"
                           "with contextlib.redirect_stdout(io.StringIO()):\n"
                           "    try:\n        main(['--help'])\n    except SystemExit:\n        pass")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_loading_the_runtime_imports_neither_build_nor_torch():
    loaded = _loaded_after("import llmc.engine.engine, llmc.engine.backends.onnxruntime, llmc.runtime.llm")
    assert "torch" not in loaded
    assert not any(m == "llmc.build" or m.startswith("llmc.build.") for m in loaded)
