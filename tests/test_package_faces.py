"""The package faces (issue 15): each package names its public API in ``__all__``, loads it
lazily, and documents it the way highdicom does (numpydoc Parameters / Returns / Raises).

What fails here:

- a name in ``__all__`` that does not resolve, is missing from ``dir(package)``, or has the
  name of a submodule (importing that submodule would replace the name on the package);
- a public function or class without a docstring; a function with parameters without a
  ``Parameters`` section, with a return value without ``Returns``, or whose own body raises
  one of the project's exceptions without ``Raises`` (the check reads only the function's own
  ``raise`` statements: errors raised by its callees are the callee's to document);
- importing a package that loads a heavy or optional dependency (in a fresh interpreter).
"""

from __future__ import annotations

import ast
import enum
import importlib
import inspect
import pkgutil
import subprocess
import sys
import textwrap
from types import ModuleType
from typing import Any

import pytest

PACKAGES = ("dicom_node", "onnx_models", "plugin", "plugin.drafting", "plugin.review", "gui",
            "installer")

#: what importing the package alone must not load (installer/install.py imports
#: dicom_node.config before any dependency is installed; gui's Qt-free models run headless)
MUST_NOT_LOAD: dict[str, tuple[str, ...]] = {
    "dicom_node": ("pynetdicom", "sqlalchemy", "onnxruntime", "torch", "PyQt6"),
    "onnx_models": ("torch", "transformers", "onnxruntime", "PyQt6"),
    "plugin": ("torch", "transformers", "onnxruntime", "pynetdicom", "sqlalchemy", "PyQt6"),
    "plugin.drafting": ("torch", "transformers", "onnxruntime", "pynetdicom", "sqlalchemy",
                        "PyQt6"),
    "plugin.review": ("torch", "transformers", "onnxruntime", "pynetdicom", "sqlalchemy",
                      "PyQt6"),
    "gui": ("PyQt6", "torch", "onnxruntime", "pynetdicom", "sqlalchemy"),
    "installer": ("PyQt6", "torch", "onnxruntime", "pynetdicom", "sqlalchemy", "pydicom"),
}


def _package(name: str) -> ModuleType:
    return importlib.import_module(name)


def _public(pkg_name: str) -> list[tuple[str, Any]]:
    pkg = _package(pkg_name)
    return [(name, getattr(pkg, name)) for name in pkg.__all__]


def _project_errors() -> set[str]:
    """Names of the exception classes defined in the packages' public modules."""
    names: set[str] = set()
    for pkg_name in PACKAGES:
        for _, value in _public(pkg_name):
            if inspect.isclass(value) and issubclass(value, BaseException):
                names.add(value.__name__)
                names.update(c.__name__ for c in value.__subclasses__())
    return names


def _raised_names(func: Any) -> set[str]:
    """The exception names in ``raise X`` / ``raise X(...)`` of the function's own body."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return set()
    tree = ast.parse(source)
    top = tree.body[0]
    found: set[str] = set()

    def caught(handler: ast.ExceptHandler) -> set[str]:
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        return {t.id if isinstance(t, ast.Name) else getattr(t, "attr", "") for t in types if t}

    def visit(node: ast.AST, ignored: frozenset[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
                continue  # a nested function documents its own errors
            if isinstance(child, ast.Try):  # raised in the try and caught by it: not the caller's
                handled = frozenset().union(*(caught(h) for h in child.handlers))
                for stmt in child.body:
                    visit_one(stmt, ignored | handled)
                for rest in (*child.handlers, *child.orelse, *child.finalbody):
                    visit_one(rest, ignored)
                continue
            visit_one(child, ignored)

    def visit_one(child: ast.AST, ignored: frozenset[str]) -> None:
        if isinstance(child, ast.Raise) and child.exc is not None:
            exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
            name = exc.id if isinstance(exc, ast.Name) else getattr(exc, "attr", "")
            if name and name not in ignored:
                found.add(name)
        visit(child, ignored)

    visit(top, frozenset())
    return found


def _parameters(func: Any) -> list[str]:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters if p not in ("self", "cls")]


def _returns_value(func: Any) -> bool:
    ann = inspect.signature(func).return_annotation
    return ann not in (inspect.Signature.empty, None, "None")


@pytest.mark.parametrize("pkg_name", PACKAGES)
def test_every_public_name_resolves_and_is_listed(pkg_name: str) -> None:
    pkg = _package(pkg_name)
    assert len(pkg.__all__) == len(set(pkg.__all__)), "a name is listed twice"
    submodules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    listed = dir(pkg)
    for name in pkg.__all__:
        value = getattr(pkg, name)  # AttributeError: the face names something that is not there
        assert value is not None, name
        assert name in listed, f"{pkg_name}: dir() does not list {name}"
        if pkg_name != "plugin":  # plugin's face *is* its two subpackages
            assert name not in submodules, (
                f"{pkg_name}.{name} is also a submodule: importing it would replace the name")
    exports = getattr(pkg, "_EXPORTS", None)
    if exports is not None:  # the lazy table and __all__ name the same things
        assert sorted(exports) == sorted(pkg.__all__)
        for name, module in exports.items():
            assert getattr(pkg, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError):
        _ = pkg.no_such_name_here


@pytest.mark.parametrize("pkg_name", PACKAGES)
def test_every_public_callable_is_documented(pkg_name: str) -> None:
    errors = _project_errors()
    problems: list[str] = []
    for name, value in _public(pkg_name):
        if inspect.ismodule(value) or not callable(value):
            continue
        where = f"{pkg_name}.{name}"
        doc = inspect.getdoc(value) or ""
        if inspect.isclass(value) and doc.startswith(f"{value.__name__}("):
            doc = ""  # the signature a dataclass writes when it has no docstring
        if not doc.strip():
            problems.append(f"{where}: no docstring")
            continue
        if inspect.isclass(value):
            if issubclass(value, BaseException | enum.Enum):
                continue  # an error's arguments are its message; an enum's members are its values
            init_doc = value.__init__.__doc__ if "__init__" in vars(value) else ""
            text = doc + (init_doc or "")
            if _parameters(value) and not any(s in text for s in ("Parameters", "Attributes")):
                problems.append(f"{where}: constructor parameters not documented "
                                "(Parameters or Attributes)")
            raised = errors & _raised_names(value.__init__) if "__init__" in vars(value) else set()
            if raised and "Raises" not in text:
                problems.append(f"{where}: raises {sorted(raised)} without a Raises section")
            continue
        if _parameters(value) and "Parameters" not in doc:
            problems.append(f"{where}: no Parameters section")
        if _returns_value(value) and "Returns" not in doc and "Yields" not in doc:
            problems.append(f"{where}: no Returns section")
        raised = errors & _raised_names(value)
        if raised and "Raises" not in doc:
            problems.append(f"{where}: raises {sorted(raised)} without a Raises section")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("pkg_name", sorted(MUST_NOT_LOAD))
def test_importing_the_package_stays_light(pkg_name: str) -> None:
    heavy = MUST_NOT_LOAD[pkg_name]
    code = (f"import sys, {pkg_name}; "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {pkg_name} loaded: {out.stdout.strip()}"


def test_dicom_node_config_stays_light_for_the_installer() -> None:
    """installer/install.py imports dicom_node.config before any dependency is installed."""
    code = ("import sys, dicom_node.config, installer; "
            "print(' '.join(m for m in ('pynetdicom', 'sqlalchemy', 'pydicom', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_the_raises_check_can_fail() -> None:
    """The Raises check reads the function's own raise statements (so it can fail)."""

    class ConfigError(Exception):
        pass

    def loud(x: int) -> None:
        """Parameters
        ----------
        x:
            a number
        """
        if x:
            raise ConfigError("no")

        def inner() -> None:
            raise KeyError("ignored: inner documents its own")

        try:
            raise ValueError("caught here: not the caller's")
        except ValueError:
            raise OSError("but this one is") from None

    assert _raised_names(loud) == {"ConfigError", "OSError"}
