"""The one-distribution layout: top-level folders are parts of the `drivesim` namespace (STYLE.md "Layout")."""

import importlib.metadata
import importlib.util
import re
import sysconfig
from pathlib import Path

import drivesim

REPO = Path(__file__).resolve().parents[1]


def test_subpackages_resolve_to_our_folders():
    for sub, folder in [("datasets", "datasets"), ("eval", "eval"), ("cli", "cli"),
                        ("bbox_conditioning", "bbox_conditioning")]:
        spec = importlib.util.find_spec(f"drivesim.{sub}")
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).resolve() == (REPO / folder / "__init__.py").resolve()
    assert Path(drivesim.__file__).resolve() == (REPO / "drivesim" / "__init__.py").resolve()


def test_we_install_no_plain_top_level_packages():
    # the installed distribution in site-packages, not a stray drivesim.egg-info in the working directory
    purelib = sysconfig.get_paths()["purelib"]
    dists = [d for d in importlib.metadata.distributions(name="drivesim", path=[purelib])]
    assert len(dists) == 1, f"expected one installed drivesim distribution in {purelib}, found {len(dists)}"
    dist = dists[0]
    top = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] != ".." and not parts[0].endswith((".dist-info", ".pth")) \
                and not parts[0].startswith("__"):
            top.add(parts[0])
    # editable installs list only a finder module; the package map is in its source
    finder = [f for f in dist.files or [] if re.match(r"__editable__.*finder\.py$", Path(str(f)).name)]
    for f in finder:
        text = Path(f.locate()).read_text()
        mapping = re.search(r"MAPPING\s*(?::[^=]*)?=\s*(\{[^}]*\})", text)
        assert mapping is not None, "editable finder has no MAPPING"
        top |= set(eval(mapping.group(1)))  # a dict literal of str -> str written by setuptools
    assert top, "could not determine what the drivesim distribution installs"
    for name in ("datasets", "eval", "cli", "bbox_conditioning", "tests"):
        assert name not in top, f"drivesim installs a top-level {name!r}"
    assert all(t == "drivesim" or t.startswith("drivesim") for t in top), top


def _importers(folder: str, pattern: str, exclude: str | None = None) -> list[str]:
    regex = re.compile(pattern, re.M)
    return sorted(str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py")
                  if (exclude is None or exclude not in p.parts) and regex.search(p.read_text()))


def test_core_does_not_import_upper_layers():
    assert _importers("drivesim", r"^\s*(from|import)\s+drivesim\.(cli|eval|datasets|pipeline)\b", "pipeline") == []


def test_datasets_and_eval_do_not_import_the_pipeline_or_the_cli():
    for folder in ("datasets", "eval"):
        assert _importers(folder, r"^\s*(from|import)\s+drivesim\.(cli|pipeline)\b") == [], folder


def test_pipeline_does_not_import_the_cli():
    assert _importers("drivesim/pipeline", r"^\s*(from|import)\s+drivesim\.cli\b") == []


def test_cli_only_parses_and_prints():
    # the command layer calls the pipeline and the evaluators; drivesim.errors is the exception vocabulary every
    # layer shares (the CLI turns it into one-line errors)
    allowed = r"(pipeline|eval|errors|cli)\b"
    assert _importers("cli", rf"^\s*(from|import)\s+drivesim\.(?!{allowed})") == []


def test_bbox_conditioning_is_a_leaf():
    pattern = re.compile(r"^\s*(from|import)\s+drivesim\.(?!bbox_conditioning)", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "bbox_conditioning").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def _core_import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the core modules it imports (module level or inside functions), for drivesim/ minus pipeline/."""
    import ast

    def name(p: Path) -> str:
        parts = list(p.relative_to(root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name(p): p for p in (root / "drivesim").rglob("*.py") if "pipeline" not in p.parts}
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                          for a in node.names}
        graph[mod] = {e for e in edges if e in mods and e != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_core_has_no_import_cycle():
    # lazy (in-function) imports count: a circle registry -> models -> autoencoder -> checkpoint -> registry works
    # only by the order things happen to load in
    graph = _core_import_graph(REPO)
    assert graph["drivesim.registry"] <= {"drivesim.errors"}, graph["drivesim.registry"]
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_long_modules_say_why_they_are_one_module():
    # a module holds one idea; past ~400 lines it is split, or its docstring says why it stays whole
    import ast

    long = []
    for folder in ("drivesim", "datasets", "eval", "cli", "bbox_conditioning"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if text.count("\n") > 420 and "One module because" not in (ast.get_docstring(ast.parse(text)) or ""):
                long.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert long == []
