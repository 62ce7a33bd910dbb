"""The node writes what ``cxrnode eval`` measures.

Val studies of the IU X-ray data go to a running node (Storage SCP, promoter, worker with the
model, SQLite) over DICOM as CR instances carrying exactly the eval images' 8-bit pixels
(MONOCHROME2, no window), the ViewPosition tags ``studies.jsonl`` has (lying and empty ones
included) and the indication in the request attributes; each draft SR's Findings and Impression
must equal ``onnx_models.evaluate.evaluate(..., predictions=...)`` for the same study, and the
views the node used must equal eval's. The studies cover: a lateral tagged PA, no tags at all,
LL, AP filed before its lateral (order), three views, one view, no indication, an indication
longer than an LO (sent in AdditionalPatientHistory).

Also an indication with the collection's de-identification marks ("XXXX-year-old ..."): the
model reads it as trained (``Indication.model_text``, marks kept) while the SR and the reviewer
show it cleaned.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from iu_dicom import IU_XRAY, write_study  # noqa: E402
from support.nodeenv import bundle_for_tests  # noqa: E402

from dicom_node.config import Destination, PipelineConfig, load_config  # noqa: E402
from dicom_node.db import Draft, Job, Study  # noqa: E402
from dicom_node.node import Node  # noqa: E402
from dicom_node.scu import send_file  # noqa: E402
from onnx_models.data import load_studies  # noqa: E402
from onnx_models.evaluate import evaluate  # noqa: E402
from plugin.drafting import pipeline, sr  # noqa: E402

pytestmark = [pytest.mark.slow]

PARITY = ("15", "1", "66", "297", "251", "647", "926", "451")
DEID_MARKS = "104"  # indication 'XXXX-year-old male with XXXX for 3 weeks. Possible pneumonia.'


def wait_for_drafts(node: Node, study_uids: dict[str, str], images: dict[str, int],
                    timeout: float = 240.0) -> dict[str, Any]:
    """study_id -> (Draft row values) once every study has an open draft of all its ``images``
    (instances arrive one association each: on a busy machine a draft of the first image alone
    can come first and is superseded when the next arrives), or its job ended otherwise."""
    assert node.sessions is not None
    deadline = time.monotonic() + timeout
    found: dict[str, Any] = {}
    while time.monotonic() < deadline and len(found) < len(study_uids):
        with node.sessions() as s:
            for sid, uid in study_uids.items():
                if sid in found:
                    continue
                row = s.execute(select(Draft.path, Draft.views, Draft.findings, Draft.impression)
                                .join(Study, Draft.study_id == Study.id)
                                .where(Study.study_instance_uid == uid, Draft.state == "new")).first()
                if row is not None and len(json.loads(row.views)) == images[sid]:
                    found[sid] = row
                    continue
                ended = s.execute(select(Job.state, Job.last_error, Job.log).join(Study, Job.study_id == Study.id)
                                  .where(Study.study_instance_uid == uid, Job.state.in_(("failed", "skipped")))).first()
                if ended is not None:
                    raise AssertionError(f"study {sid}: job {ended[0]}: {ended[1]}\n{ended[2]}")
        time.sleep(0.2)
    missing = sorted(set(study_uids) - set(found))
    assert not missing, f"no draft within {timeout:.0f} s for studies {missing}"
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not (IU_XRAY / "studies.jsonl").exists():
        pytest.skip(f"{IU_XRAY} is not available")
    tmp = tmp_path_factory.mktemp("parity")
    wanted = set(PARITY) | {DEID_MARKS}
    studies = [s for s in load_studies(IU_XRAY, ["val"]) if s.study_id in wanted]
    assert {s.study_id for s in studies} == wanted

    # eval on exactly these studies: a dataset folder of their own (absolute image paths)
    with open(IU_XRAY / "studies.jsonl", encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    subset = tmp / "data"
    subset.mkdir()
    with open(subset / "studies.jsonl", "w", encoding="utf-8") as out:
        for d in lines:
            if d["study_id"] in wanted:
                for im in d["images"]:
                    im["file"] = str(IU_XRAY / im["file"])
                out.write(json.dumps(d) + "\n")
    predictions = tmp / "predictions.jsonl"
    bundle = bundle_for_tests()
    # one ONNX Runtime thread, as the node runs (model.threads default 1)
    evaluate(bundle=bundle, data=str(subset), split="val", predictions=str(predictions), threads=1,
             baselines=False, meteor=False)
    evaluated = {row["study_id"]: row for row in map(json.loads, predictions.read_text().splitlines())}

    overrides = [
        f"node.storage_dir={json.dumps(str(tmp / 'store'))}", 'node.host="127.0.0.1"', "node.port=0",
        "node.fsync=false", "node.min_free_space_mb=0", 'node.log_level="WARNING"',
        "study.quiet_period_s=0.5", "jobs.workers=1", "jobs.poll_interval_s=0.1",
        f"model.bundle={json.dumps(bundle)}",
    ]
    if hasattr(PipelineConfig(), "input_check"):  # drafted text is compared, the gate is not
        overrides.append('pipeline.input_check="off"')
    config = load_config(overrides=overrides, env={})
    node = Node(config, job_handler=pipeline.handle_job).start()
    try:
        dest = Destination(name="node", ae_title=config.node.ae_title, host="127.0.0.1", port=node.port)
        uids, images = {}, {}
        for s in studies:
            files = write_study(s, tmp / "dicom" / s.study_id, kind="8bit")
            uids[s.study_id] = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            images[s.study_id] = len(files)
            for f in files:
                assert send_file(config, dest, f) == 0x0000
        drafts = wait_for_drafts(node, uids, images)
        texts = {}
        for sid, row in drafts.items():
            report = sr.read_report(dcmread(node.store.abspath(row.path)))
            texts[sid] = {"findings": report.findings, "impression": report.impression,
                          "views": [v["view"] for v in json.loads(row.views)]}
    finally:
        node.stop(grace_s=10)
    return {"eval": evaluated, "node": texts}


@pytest.mark.parametrize("study_id", PARITY)
def test_draft_sr_equals_eval(runs: dict[str, Any], study_id: str) -> None:
    ev, node = runs["eval"][study_id], runs["node"][study_id]
    assert node["views"] == ev["views"], "the node and eval chose different views"
    assert (node["findings"], node["impression"]) == (ev["findings"], ev["impression"])


def test_indication_with_deidentification_marks(runs: dict[str, Any]) -> None:
    ev, node = runs["eval"][DEID_MARKS], runs["node"][DEID_MARKS]
    assert node["views"] == ev["views"]
    assert (node["findings"], node["impression"]) == (ev["findings"], ev["impression"])
