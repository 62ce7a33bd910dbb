"""The store's interface (dicom_node.store.ObjectStore): what the node needs of any backend, so an
S3-compatible one can follow the POSIX folder (issue 16). The POSIX Store implements all of it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.store import ObjectStore, Store


def _ds() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "X"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_posix_store_has_every_method_of_the_interface() -> None:
    wanted = {n for n, _ in inspect.getmembers(ObjectStore, inspect.isfunction) if not n.startswith("_")}
    assert wanted == {"write_dataset", "read_dataset", "open", "exists", "file_sha256", "remove"}
    for name in wanted:
        want = inspect.signature(getattr(ObjectStore, name))
        have = inspect.signature(getattr(Store, name))
        assert list(have.parameters) == list(want.parameters), name


def test_write_read_open_exists_remove(tmp_path: Path) -> None:
    store: ObjectStore = Store(tmp_path / "s", fsync=False)
    ds = _ds()
    rel = "instances/1/2/3.dcm"
    assert not store.exists(rel)
    size, sha = store.write_dataset(ds, rel)
    assert store.exists(rel) and store.file_sha256(rel) == sha
    assert store.read_dataset(rel).SOPInstanceUID == ds.SOPInstanceUID
    assert "PixelData" not in store.read_dataset(rel, stop_before_pixels=True)
    with store.open(rel) as f:
        data = f.read()
    assert len(data) == size and data[128:132] == b"DICM"
    store.remove(rel)
    assert not store.exists(rel) and store.file_sha256(rel) is None
    with pytest.raises(FileNotFoundError):
        store.read_dataset(rel)


def test_names_outside_the_store_are_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", fsync=False)
    (tmp_path / "secret.dcm").write_bytes(b"x")
    for bad in ("../secret.dcm", "instances/../../secret.dcm"):
        with pytest.raises(ValueError, match="outside the store"):
            store.read_dataset(bad)
        with pytest.raises(ValueError, match="outside the store"):
            store.exists(bad)
