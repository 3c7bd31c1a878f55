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


def test_core_does_not_import_upper_layers():
    pattern = re.compile(r"^\s*(from|import)\s+drivesim\.(cli|eval|datasets)\b", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "drivesim").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []


def test_bbox_conditioning_is_a_leaf():
    pattern = re.compile(r"^\s*(from|import)\s+drivesim\.(?!bbox_conditioning)", re.M)
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "bbox_conditioning").rglob("*.py")
                 if pattern.search(p.read_text())]
    assert offenders == []
