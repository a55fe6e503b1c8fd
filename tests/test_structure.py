"""The package's structure, checked with ast: no import cycle between sparsefw modules, no
module imports another module's private name, pipeline.py stays a short block driver, no
function in sparsefw/ is longer than 80 lines; and the tests' layout: test files named after the
modules they test (tests/cnn/ for cnn/), conftest used as fixtures, public names only."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparsefw"


def _imports(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every ``from ... import`` in the file (function bodies too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([mod] if mod else []))
            out.append((mod, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_no_import_cycle_in_sparsefw():
    graph = {}
    for f in PKG.glob("*.py"):
        me = f"sparsefw.{f.stem}"
        deps = set()
        for mod, names in _imports(f, "sparsefw"):
            if mod == "sparsefw":
                deps |= {f"sparsefw.{n}" for n in names if (PKG / f"{n}.py").exists()}
            elif mod.startswith("sparsefw."):
                deps.add(mod)
        graph[me] = deps - {me}
    state, path = {}, []

    def visit(n):
        state[n] = 1
        path.append(n)
        for d in graph.get(n, ()):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_private_name_imported_from_another_module():
    bad = []
    for folder, package, pattern in ((PKG, "sparsefw", "*.py"), (ROOT / "cnn", "cnn", "*.py"),
                                     (ROOT / "scripts", "scripts", "*.py"), (ROOT / "tests", "tests", "**/*.py")):
        for f in folder.glob(pattern):
            for mod, names in _imports(f, package):
                if mod.split(".")[0] in ("sparsefw", "cnn") or mod == "conftest":
                    bad += [f"{f.relative_to(ROOT)}: from {mod} import {n}" for n in names
                            if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_pipeline_is_short_and_functions_are_short():
    assert len((PKG / "pipeline.py").read_text().splitlines()) <= 300
    long = []
    for f in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{f.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_conftest_is_used_as_fixtures_not_imported():
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert ROOT / "tests" / "dist_driver.py" in files and ROOT / "tests" / "cnn" / "conftest.py" in files
    bad = [f"{f.relative_to(ROOT)}: {mod}" for f in files for mod, _ in _imports(f, "tests")
           if mod.split(".")[0] == "conftest"]
    assert not bad, bad


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> module, for every ``import sparsefw.x as y`` / ``from cnn import x`` of a
    sparsefw or cnn module in the file (function bodies too)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] in ("sparsefw", "cnn")})
        elif isinstance(node, ast.ImportFrom) and node.module in ("sparsefw", "cnn"):
            out.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                        if (ROOT / node.module / f"{a.name}.py").exists()})
    return out


def test_tests_use_only_public_names_of_modules():
    """No ``module._private`` in a test either (``from m import _x`` is checked above)."""
    bad = []
    for f in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(f.read_text())
        aliases = _module_aliases(tree)
        bad += [f"{f.relative_to(ROOT)}:{n.lineno}: {aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                and n.attr.startswith("_") and not n.attr.startswith("__")]
    assert not bad, bad


# test files that test no one module: the layout itself, scripts/gpu_check.sh, a real-model run
NOT_A_MODULE = {"test_structure.py", "test_gpu_check.py", "test_real_model_slow.py"}


def test_test_files_are_named_after_the_modules_they_test():
    """tests/test_<m>.py tests sparsefw/<m>.py and tests/cnn/test_<m>.py tests cnn/<m>.py."""
    bad = [f"tests/{f.name}" for f in (ROOT / "tests").glob("test_*.py")
           if f.name not in NOT_A_MODULE and not (PKG / f.name.removeprefix("test_")).exists()]
    bad += [f"tests/cnn/{f.name}" for f in (ROOT / "tests" / "cnn").glob("test_*.py")
            if not (ROOT / "cnn" / f.name.removeprefix("test_")).exists()]
    assert not bad, bad
