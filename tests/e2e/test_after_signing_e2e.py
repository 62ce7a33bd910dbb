"""End to end with a real PACS (Orthanc): a report signed with a critical result, then amended.
Both verified SRs (the signed one, unchanged, and the addendum naming it in Predecessor
Documents) arrive in Orthanc through the node's outbound queue; what Orthanc holds passes
dciodvfy / dsrdump / highdicom. Run with ``-k addendum`` or ``-k critical``."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.polling import wait_for  # noqa: E402
from support.sr_checks import check_sr_file  # noqa: E402
from test_orthanc_roundtrip import (  # noqa: E402
    REVIEWER,
    draft_of,
    send_study_from_pacs,
    sr_in_pacs,
    system,  # noqa: F401 - the fixture: Orthanc and a node sending it verified SRs
    transfer_of,
)

from dicom_node.node import Node  # noqa: E402
from plugin.drafting import samples, sr  # noqa: E402
from plugin.review import addenda  # noqa: E402
from plugin.review.results import CriticalNotice  # noqa: E402
from plugin.review.service import ReviewService  # noqa: E402

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def test_critical_result_and_addendum_reach_the_pacs(system, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    node, pacs = system
    assert isinstance(node, Node)
    study = samples.make_study(5, prefix="e2e-after")
    send_study_from_pacs(pacs, study)
    d = wait_for("the draft", lambda: draft_of(node, study[0].StudyInstanceUID, study))
    svc = ReviewService(node.config, node.sessions, node.store)
    told = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
    signed = svc.sign(d.id, REVIEWER[0], "Large right pneumothorax.", "Right pneumothorax.",
                      critical=CriticalNotice("Dr Ann Lee", "ED physician", "telephone", told))
    svc.send_signed_now(d.id, REVIEWER[0])  # end the undo window: the report goes out now
    wait_for("the signed SR to be sent", lambda: (
        (t := transfer_of(node, signed.signed_sop_instance_uid)) is not None and t.state == "done" and t))
    added = addenda.add_addendum(svc, d.id, REVIEWER[0], "Chest tube placed; follow-up radiograph requested.")
    assert added.transfers == 1
    wait_for("the addendum to be sent", lambda: (
        (t := transfer_of(node, added.sop_instance_uid)) is not None and t.state == "done" and t))
    pacs_signed = wait_for("the signed SR in Orthanc", lambda: sr_in_pacs(pacs, signed.signed_sop_instance_uid))
    pacs_added = wait_for("the addendum in Orthanc", lambda: sr_in_pacs(pacs, added.sop_instance_uid))
    for ds in (pacs_signed, pacs_added):
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        check_sr_file(path)
    rep_signed, rep_added = sr.read_report(pacs_signed), sr.read_report(pacs_added)
    # the signed report as signed (critical result coded in it, no addendum); the addendum chained to it
    assert rep_signed.critical is not None and rep_signed.critical.method == "telephone" and rep_signed.addenda == ()
    assert rep_added.predecessors == (signed.signed_sop_instance_uid,)
    assert (rep_added.completion_flag, rep_added.verification_flag) == ("COMPLETE", "VERIFIED")
    assert rep_added.addenda[0].text == "Chest tube placed; follow-up radiograph requested."
    assert rep_added.findings == rep_signed.findings and rep_added.critical is not None
    assert pacs_added.StudyInstanceUID == pacs_signed.StudyInstanceUID == study[0].StudyInstanceUID
    assert pacs_added.SeriesInstanceUID == pacs_signed.SeriesInstanceUID  # one series of verified reports
