"""Suite-wide guards and helpers."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch


@pytest.fixture(autouse=True)
def _autograd_stays_on():
    """Fail a test that leaves autograd switched off: later tests in the process would then fail to backprop."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left torch autograd disabled (use `with torch.no_grad():`, not set_grad_enabled)")


def _load_script(path: Path) -> ModuleType:
    """A script of the repository (e.g. benchmarks/gpu_check.py) as a module named after its file, loaded once per
    process. It is registered in sys.modules before it runs (dataclasses look their module up there); a script
    that puts its own folder on sys.path to import its sibling modules has that undone afterwards."""
    name = Path(path).stem
    if name in sys.modules:
        return sys.modules[name]
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path[:] = saved
    return module


@pytest.fixture(scope="session")
def load_script():
    """`load_script(path)`: a benchmark or tool script as a module (the tests folder is not a package under
    `--import-mode=importlib`, so this shared loader is a fixture)."""
    return _load_script
