"""Site installation and operations: the ``cxrnode`` command line entry point (the CLI
composition root: every subcommand, ``demo`` included), the offline bundle,
install/upgrade/uninstall with a hardened systemd unit, and ``cxrnode doctor``. Reads the
other packages; changes none of them.

Modules, by what they own:

- :mod:`~installer.cli`: the ``cxrnode`` command (:func:`build_parser`, :func:`main`);
  :mod:`~installer.admin_cli` and :mod:`~installer.demo` add subcommands to it;
- :mod:`~installer.bundle`: the offline bundle (:func:`build_bundle`, :func:`open_bundle`,
  :func:`verify_folder`, :class:`BundleError`);
- :mod:`~installer.install`: the ``install``, ``upgrade`` and ``uninstall`` commands, built on
  :mod:`~installer.layout` (paths and the manifest: :class:`Layout`, :class:`InstallError`),
  :mod:`~installer.site_config` (the site's TOML: :func:`render_config`),
  :mod:`~installer.accounts` (service user and groups), :mod:`~installer.venv` (the
  versioned virtual environment) and :mod:`~installer.unit` (the systemd unit:
  :func:`render_unit`); :mod:`~installer.in_venv` is the program they run inside the new
  environment (``python -m installer.in_venv``);
- :mod:`~installer.doctor`: ``cxrnode doctor`` (:func:`run_checks`, :class:`Check`);
- :mod:`~installer.example_config`: the commented example configuration.

The names in ``__all__`` are importable from the package (``from installer import main``);
each is loaded on first use (PEP 562), so ``import installer`` loads no dependency: the
install commands run before any is installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from installer.bundle import BundleError, build_bundle, open_bundle, verify_folder
    from installer.cli import build_parser, main
    from installer.doctor import Check, run_checks
    from installer.layout import InstallError, Layout, detect_layout
    from installer.site_config import render_config
    from installer.unit import render_unit

#: each public name -> the module that defines it (loaded on first use)
_EXPORTS: dict[str, str] = {
    "BundleError": "installer.bundle",
    "build_bundle": "installer.bundle",
    "open_bundle": "installer.bundle",
    "verify_folder": "installer.bundle",
    "build_parser": "installer.cli",
    "main": "installer.cli",
    "Check": "installer.doctor",
    "run_checks": "installer.doctor",
    "InstallError": "installer.layout",
    "Layout": "installer.layout",
    "detect_layout": "installer.layout",
    "render_config": "installer.site_config",
    "render_unit": "installer.unit",
}

__all__ = [
    "BundleError",
    "Check",
    "InstallError",
    "Layout",
    "build_bundle",
    "build_parser",
    "detect_layout",
    "main",
    "open_bundle",
    "render_config",
    "render_unit",
    "run_checks",
    "verify_folder",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'installer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
