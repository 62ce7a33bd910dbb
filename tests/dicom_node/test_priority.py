"""Study priority (STAT / ED / inpatient / outpatient): the one rule of ``dicom_node.priority``,
stored per study by the index at registration (migration 0005), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from sqlalchemy import func, inspect, select, text
from support import synthetic
from support.postgres import private_database

from dicom_node import priority
from dicom_node.db import Draft, Study, make_engine, migrate, session_factory
from dicom_node.priority import ED, INPATIENT, OUTPATIENT, STAT, UNKNOWN, study_priority


def ds_with(**attrs: object) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def request(**attrs: object) -> Dataset:
    """A data set whose Request Attributes Sequence has one item with ``attrs``."""
    ds = Dataset()
    ds.RequestAttributesSequence = [ds_with(**attrs)]
    return ds


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        (ds_with(RequestedProcedurePriority="STAT"), STAT),
        (request(RequestedProcedurePriority="stat"), STAT),
        (ds_with(ReportingPriority="STAT", CurrentPatientLocation="Outpatient clinic 4"), STAT),
        (ds_with(RequestedProcedurePriority="HIGH"), UNKNOWN),  # only STAT is taken as urgent
        (ds_with(CurrentPatientLocation="ED"), ED),
        (ds_with(CurrentPatientLocation="A&E majors"), ED),
        (ds_with(RequestingService="Emergency Department"), ED),
        (ds_with(PatientState="ER bay 3"), ED),
        (ds_with(RouteOfAdmissions="EMERGENCY", AdmissionID="ADM123"), ED),  # ED wins over the admission
        (ds_with(AdmissionID="ADM123"), INPATIENT),
        (ds_with(CurrentPatientLocation="Ward 5B"), INPATIENT),
        (request(RequestingService="ICU"), INPATIENT),
        (ds_with(CurrentPatientLocation="Inpatient"), INPATIENT),
        (ds_with(RequestingService="Respiratory clinic"), OUTPATIENT),
        (ds_with(CurrentPatientLocation="OPD"), OUTPATIENT),
        (ds_with(RequestingService="GP referral"), OUTPATIENT),
        (ds_with(RequestedProcedurePriority="ROUTINE"), UNKNOWN),
        (Dataset(), UNKNOWN),
        # whole words only: "Forward" is no ward, "Medical" holds no "ED" and "Lower" no "ER"
        (ds_with(CurrentPatientLocation="Forward Medical Lower"), UNKNOWN),
    ],
)
def test_priority_rule(ds: Dataset, expected: str) -> None:
    assert study_priority(ds) == expected


def test_priority_rank_and_more_urgent() -> None:
    assert [priority.rank(p) for p in (STAT, ED, INPATIENT, OUTPATIENT, UNKNOWN, "junk")] == [0, 1, 2, 3, 4, 4]
    assert priority.more_urgent(OUTPATIENT, ED) == ED
    assert priority.more_urgent(STAT, ED) == STAT
    assert priority.more_urgent(UNKNOWN, OUTPATIENT) == OUTPATIENT


def test_priority_malformed_value_reads_as_not_stated() -> None:
    class Broken:
        def get(self, keyword: str, default: object = None) -> object:
            raise ValueError("malformed element")

    assert study_priority(Broken()) == UNKNOWN


def _studies(root: Path, database_url: str = "") -> synthetic.NodeFixture:
    synthetic.write_config(root)
    node = synthetic.open_node(root, database_url)
    specs = synthetic.sample_studies(3, size=64, prefix="prio")
    specs[0].extra["CurrentPatientLocation"] = "Outpatient clinic"
    specs[1].extra["RequestedProcedurePriority"] = "STAT"
    for spec in specs:
        synthetic.store_study(node.sessions, node.store, synthetic.make_study(spec))
    return node


def _priority_check(node: synthetic.NodeFixture) -> None:
    specs = synthetic.sample_studies(3, size=64, prefix="prio")
    with node.sessions() as s:
        got = {st.study_instance_uid: st.priority for st in s.scalars(select(Study))}
    assert got == {specs[0].study_instance_uid: OUTPATIENT, specs[1].study_instance_uid: STAT,
                   specs[2].study_instance_uid: UNKNOWN}
    # a later image of the outpatient study sent from the ED makes it ED; a routine one after it does not lower it
    late = synthetic.make_study(specs[0])[0]
    late.SOPInstanceUID = synthetic.uid_from("prio-late", "1")
    late.CurrentPatientLocation = "ED resus"
    later = synthetic.make_study(specs[0])[0]
    later.SOPInstanceUID = synthetic.uid_from("prio-late", "2")
    later.CurrentPatientLocation = "Outpatient clinic"
    synthetic.store_study(node.sessions, node.store, [late, later])
    with node.sessions() as s:
        st = s.scalars(select(Study).where(Study.study_instance_uid == specs[0].study_instance_uid)).one()
        assert st.priority == ED


def test_priority_stored_at_registration_sqlite(tmp_path: Path) -> None:
    node = _studies(tmp_path / "node")
    try:
        _priority_check(node)
    finally:
        node.engine.dispose()


@pytest.mark.postgres
def test_priority_stored_at_registration_postgres(tmp_path: Path) -> None:
    with private_database("priority") as url:
        node = _studies(tmp_path / "node", url)
        try:
            _priority_check(node)
        finally:
            node.engine.dispose()


def downgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    import dicom_node.db

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(dicom_node.db.__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    command.downgrade(cfg, revision)


def _migration_roundtrip(url: str) -> None:
    """0005 adds studies.priority and report_templates; down to 0004 drops them without losing a
    study (SQLite drops the column in place: rebuilding studies would cascade to its children)."""
    migrate(url, "0004")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO studies (study_instance_uid, patient_id, patient_name, patient_birth_date, "
                              "patient_sex, accession_number, study_date, study_time, study_description, "
                              "referring_physician_name, study_id, state, generation, first_received_at, "
                              "last_received_at) VALUES ('1.2.3', 'P', 'N', '', '', 'A', '', '', '', '', '', "
                              "'drafted', 1, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            conn.execute(text("INSERT INTO drafts (study_id, state, sop_instance_uid, path, indication, findings, "
                              "impression, token_info, views, model_name, model_version, created_at) "
                              "SELECT id, 'new', '1.2.3.4', 'x', '', 'f', 'i', '', '', '', '', CURRENT_TIMESTAMP "
                              "FROM studies"))
        migrate(url)
        insp = inspect(engine)
        assert "priority" in {c["name"] for c in insp.get_columns("studies")}
        assert "report_templates" in insp.get_table_names()
        sessions = session_factory(engine)
        with sessions() as s:
            assert s.scalars(select(Study.priority)).one() == ""  # indexed before 0005: not stated
        engine.dispose()
        downgrade(url, "0004")
        engine = make_engine(url)
        insp = inspect(engine)
        assert "priority" not in {c["name"] for c in insp.get_columns("studies")}
        assert "report_templates" not in insp.get_table_names()
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Draft.__table__)).scalar_one() == 1
        engine.dispose()
        migrate(url)
    finally:
        engine.dispose()


def test_priority_migration_0005_up_down_sqlite(tmp_path: Path) -> None:
    _migration_roundtrip(f"sqlite:///{tmp_path / 'index.db'}")


@pytest.mark.postgres
def test_priority_migration_0005_up_down_postgres() -> None:
    with private_database("prio_mig") as url:
        _migration_roundtrip(url)


def test_priority_from_images_sent_with_dcmtk_storescu(make_config, start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The rule runs on what the Storage SCP received over a real association (DCMTK storescu)."""
    import subprocess

    from dcmnode_helpers import dcmtk, make_instance
    from pydicom.uid import generate_uid

    node = start_node(make_config(jobs={"workers": 0}))
    stat, ward, none = generate_uid(), generate_uid(), generate_uid()
    files = [
        make_instance(tmp_path / "stat.dcm", stat, RequestAttributesSequence=[ds_with(RequestedProcedurePriority="STAT")]),
        make_instance(tmp_path / "ward.dcm", ward, CurrentPatientLocation="Ward 7 North"),
        make_instance(tmp_path / "none.dcm", none),
    ]
    r = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "CXRNODE", "127.0.0.1", str(node.port),
                        *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with node.sessions() as s:
        got = {st.study_instance_uid: st.priority for st in s.scalars(select(Study))}
    assert got == {stat: STAT, ward: INPATIENT, none: UNKNOWN}
