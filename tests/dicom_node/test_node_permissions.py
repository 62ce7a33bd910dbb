"""Issue 13 item 8: ``cxrnode serve`` outside the systemd unit (no ``UMask=``) must not leave the
studies and the index readable by every account on the machine. The attack: another local user
reads ``cxrnode.db`` (patient names) or a stored image. Run with umask 000 and 022, the node
creates folders 0750 and the index 0640 and closes what an earlier run left open; in the
installed layout (setgid storage folder shared with the reviewers) the group keeps write access.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicom_node.config import Config
from dicom_node.jobs import JobResult
from dicom_node.node import Node


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    old = os.umask(0o022)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _instance() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Secret^Patient"
    return ds


def _run(config: Config) -> tuple[Path, Path, Path]:
    """Start the node, write an instance through its store as the SCP does, stop it."""
    node = Node(config, job_handler=lambda _ctx: JobResult("skipped")).start()  # no workers run it
    try:
        ds = _instance()
        rel = node.store.instance_relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        node.store.write_dataset(ds, rel)
        path = node.store.abspath(rel)
    finally:
        node.stop(grace_s=5.0)
    return node.store.root, Path(config.node.resolved_database_url().removeprefix("sqlite:///")), path


@pytest.mark.parametrize("inherited", [0o000, 0o002, 0o022])
def test_serve_outside_the_unit_keeps_others_out(make_config: Callable[..., Config], tmp_path: Path,
                                                 umask: Callable[[int], None], inherited: int) -> None:
    config = make_config(node={"storage_dir": str(tmp_path / "fresh" / "data")}, jobs={"workers": 0})
    umask(inherited)
    root, db, dcm = _run(config)
    assert os.umask(inherited) == inherited, "the node gives the inherited umask back at stop()"
    for folder in (root, root / "tmp", dcm.parent, dcm.parent.parent, root / "instances"):
        assert mode(folder) == 0o750, f"{folder}: {mode(folder):04o}"
    assert mode(db) == 0o640, f"{db}: {mode(db):04o}"
    for side in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if side.exists():
            assert mode(side) & 0o007 == 0, f"{side}: {mode(side):04o}"
    assert mode(dcm) == 0o640


def test_what_an_earlier_run_left_open_is_closed(make_config: Callable[..., Config], tmp_path: Path,
                                                 umask: Callable[[int], None]) -> None:
    data = tmp_path / "old" / "data"
    (data / "tmp").mkdir(parents=True)
    data.chmod(0o777)
    (data / "tmp").chmod(0o755)
    config = make_config(node={"storage_dir": str(data)}, jobs={"workers": 0})
    umask(0)
    _run(config)  # creates the index 0640
    db = data / "cxrnode.db"
    db.chmod(0o666)
    data.chmod(0o755)
    _run(config)
    assert mode(data) == 0o750 and mode(data / "tmp") == 0o750 and mode(db) == 0o640


def test_the_installed_shared_layout_keeps_group_write(make_config: Callable[..., Config], tmp_path: Path,
                                                       umask: Callable[[int], None]) -> None:
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    data.chmod(0o2770)  # what the installer makes: setgid, group = service + reviewers
    config = make_config(node={"storage_dir": str(data)}, jobs={"workers": 0})
    umask(0)
    root, db, dcm = _run(config)
    assert mode(root) == 0o2770 and mode(dcm.parent) & 0o777 == 0o770 and mode(dcm.parent) & stat.S_ISGID
    assert mode(db) == 0o660  # the desktop reviewer (a group member) writes the index when signing
    assert mode(dcm) == 0o640


