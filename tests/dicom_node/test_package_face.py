"""dicom_node's package face: every name in ``__all__`` resolves, lazily, and is documented."""

from __future__ import annotations

import subprocess
import sys

import dicom_node
from dicom_node import _EXPORTS

#: public names still without a docstring (dicom_node/db.py is being changed by another issue)
UNDOCUMENTED = {"session_factory"}


def test_all_is_the_export_table_and_every_name_resolves() -> None:
    assert dicom_node.__all__ == sorted(_EXPORTS)
    for name in dicom_node.__all__:
        value = getattr(dicom_node, name)
        assert value.__module__ == _EXPORTS[name] or name == "Config", name
        assert (value.__doc__ or "").strip() or name in UNDOCUMENTED, f"{name} has no docstring"


def test_importing_the_package_loads_no_networking() -> None:
    code = "import sys, dicom_node, dicom_node.config; print('pynetdicom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_commit_service_and_self_check_document_parameters_and_errors() -> None:
    for fn in (dicom_node.commit_dataset, dicom_node.commit_stored, dicom_node.inspect_received,
               dicom_node.register_instance, dicom_node.register_with_retry, dicom_node.enqueue,
               dicom_node.send_file, dicom_node.Store.write_dataset):
        doc = fn.__doc__ or ""
        assert "Parameters" in doc and "Returns" in doc and "Raises" in doc, fn.__qualname__
    assert "Returns" in (dicom_node.fast_path_active.__doc__ or "")
