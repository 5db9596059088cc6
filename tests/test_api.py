"""The public API: `fastlesson.__all__` is what the README shows, and each module's `__all__` agrees."""

from __future__ import annotations

import ast
import importlib
import re
import types
from pathlib import Path

import pytest

import fastlesson

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The scraper is turning into the fastlesson/scrape/ package: its names are checked against their own
# modules' __all__ once those exist, not against the README yet.


def _package_imports() -> dict[str, str]:
    """name -> the module `fastlesson/__init__.py` imports it from."""
    tree = ast.parse((ROOT / "fastlesson" / "__init__.py").read_text())
    return {a.asname or a.name: n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
            for a in n.names}


def _imported_from_fastlesson(source: str) -> set[str]:
    """Names a piece of Python imports with `from fastlesson import ...`."""
    return {a.name for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.ImportFrom) and n.module == "fastlesson" and n.level == 0 for a in n.names}


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def _is_fastlesson_object(name: str) -> bool:
    """True when `name` is a public, non-module object that some fastlesson module defines or lists."""
    for mod in {importlib.import_module(m) for m in _package_imports().values()}:
        obj = getattr(mod, name, None)
        if obj is None or isinstance(obj, types.ModuleType):
            continue
        if name in getattr(mod, "__all__", ()) or str(getattr(obj, "__module__", "")).startswith("fastlesson"):
            return True
    return False


def readme_names() -> set[str]:
    """What the README shows as the API: every `from fastlesson import` line (code blocks and text) and
    every fastlesson object named in backticks in the API tour (`run_recipe(RecipeConfig(...))`: both)."""
    names = set()
    for block in re.findall(r"```python\n(.*?)```", README, re.S):
        names |= _imported_from_fastlesson(block)
    for line in re.findall(r"`(from fastlesson import [^;`]*)", README):
        names |= _imported_from_fastlesson(line)
    for span in re.findall(r"`([^`\n]+)`", _section(README, "API tour")):
        if span.startswith(("from ", "import ")):
            continue  # imports: `from fastlesson import` counted above, `from fastlesson.export ...` is not
        for word in re.findall(r"(?<![\w.])[A-Za-z]\w*", span):  # not attributes: `result.plot` is `result`
            if _is_fastlesson_object(word):
                names.add(word)
    return names


def test_all_is_what_the_readme_shows():
    extra = set(fastlesson.__all__) - readme_names()
    missing = readme_names() - set(fastlesson.__all__)
    assert not extra, f"in fastlesson.__all__ but not in the README's API tour: {sorted(extra)}"
    assert not missing, f"shown in the README but not in fastlesson.__all__: {sorted(missing)}"


def test_all_names_resolve_without_duplicates():
    assert len(fastlesson.__all__) == len(set(fastlesson.__all__))
    for name in fastlesson.__all__:
        assert hasattr(fastlesson, name), name


@pytest.mark.parametrize("name", fastlesson.__all__)
def test_each_name_is_in_its_modules_all(name):
    module = importlib.import_module(_package_imports()[name])
    assert name in getattr(module, "__all__", ()), f"{name} is missing from {module.__name__}.__all__"
    assert getattr(module, name) is getattr(fastlesson, name)


def test_notebooks_scripts_and_readme_import_only_public_names():
    users = {p: p.read_text() for d in ("nbs", "scripts") for p in sorted((ROOT / d).glob("*.py"))}
    users[ROOT / "README.md"] = "\n".join(re.findall(r"```python\n(.*?)```", README, re.S))
    for path, source in users.items():
        private = _imported_from_fastlesson(source) - set(fastlesson.__all__)
        assert not private, f"{path.name} imports {sorted(private)} from fastlesson: use their modules"


def _is_submodule(name: str) -> bool:
    try:
        importlib.import_module(f"fastlesson.{name}")
    except ModuleNotFoundError:
        return False
    return True


def test_readme_package_attributes_are_public():
    """`fastlesson.load_model(...)` in the README text is public; `fastlesson.recipe.STEPS` is a module's."""
    for first in sorted(set(re.findall(r"\bfastlesson\.([A-Za-z_]\w*)", README))):
        assert _is_submodule(first) or first in fastlesson.__all__, f"README names fastlesson.{first}"
