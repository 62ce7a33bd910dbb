"""Issue 13, items 3 and 4, as an attacker would try them (real node directory, real pipeline).

3. The signer cannot be spoofed: ``USER=jdoe LOGNAME=jdoe`` does not change who signs (identity is
   the effective OS account), and a private TOML with a ``[[reviewers]]`` entry (``--config`` or
   ``CXRNODE_CONFIG``) names no signer: reviewers come only from a root-owned configuration that
   only root can change. Tests run as root (CI); a file or folder is made "someone else's" with
   chown/chmod, and, where ``runuser`` exists, the attack is also run as the unprivileged ``nobody``.
4. A draft under review is not signable once the study gained images: refused while the new
   draft is being made (:class:`StudyChangedError`) and once it exists (:class:`SupersededError`,
   naming the new draft), and the holder's claim renewal (the reviewer's heartbeat) says so too.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from support import synthetic
from support.postgres import private_database

from dicom_node.config import load_config
from dicom_node.db import AuditEvent, Draft, DraftState, Instance, Study
from plugin.review import service as review
from plugin.review.service import (
    ReviewService,
    StudyChangedError,
    SupersededError,
    UnknownReviewerError,
    UntrustedConfigError,
)

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="changes file ownership: needs root (as in CI)")


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    # one-view studies: a lateral sent later changes the images the draft is made from
    specs = [synthetic.SyntheticStudy(key=f"sec-{i}", patient_name=f"Test^Patient{i}", patient_id=f"SEC-{i}",
                                      views=("PA",), size=128, seed=i) for i in range(2)]
    built = synthetic.build_node(root, specs)
    built.engine.dispose()
    return root


@pytest.fixture
def node(golden: Path, tmp_path: Path) -> Iterator[synthetic.NodeFixture]:
    n = synthetic.open_node(synthetic.copy_node(golden, tmp_path / "node"))
    yield n
    n.engine.dispose()


def _spec(node: synthetic.NodeFixture, draft_id: int) -> synthetic.SyntheticStudy:
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None
        pid = d.study.patient_id
    i = int(pid.split("-")[1])
    return synthetic.SyntheticStudy(key=f"sec-{i}", patient_name=f"Test^Patient{i}", patient_id=pid,
                                    views=("PA", "LATERAL"), size=128, seed=i)


def _send_more(node: synthetic.NodeFixture, draft_id: int, body_part: str = "") -> None:
    """A second image of the same study arrives (stored and indexed as the SCP does)."""
    lateral = synthetic.make_study(_spec(node, draft_id))[1]
    if body_part:
        lateral.BodyPartExamined = body_part
    synthetic.store_study(node.sessions, node.store, [lateral])


# -- 3. the signer ----------------------------------------------------------------------------


def test_current_user_ignores_USER_and_LOGNAME(monkeypatch: pytest.MonkeyPatch) -> None:
    me = pwd.getpwuid(os.geteuid()).pw_name
    monkeypatch.setenv("USER", "jdoe")
    monkeypatch.setenv("LOGNAME", "jdoe")
    monkeypatch.setenv("LNAME", "jdoe")
    monkeypatch.setenv("USERNAME", "jdoe")
    assert review.current_user() == me != "jdoe"
    # the same in a fresh process, as `cxrnode review` starts
    env = {**os.environ, "USER": "jdoe", "LOGNAME": "jdoe"}
    out = subprocess.run([sys.executable, "-c", "from plugin.review.service import current_user; print(current_user())"],
                         env=env, capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    assert out == me


def test_USER_jdoe_cannot_sign_as_jdoe(node: synthetic.NodeFixture, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    """jdoe is a configured reviewer; another account sets USER=jdoe and tries to sign."""
    text = (node.root / "cxrnode.toml").read_text()
    text += '\n[[reviewers]]\nusername = "jdoe"\ndisplay_name = "Doe^Jane"\norganisation = "General Hospital"\n'
    (node.root / "cxrnode.toml").write_text(text)
    config = load_config(node.root / "cxrnode.toml", env={})
    svc = ReviewService(config, node.sessions, node.store)
    assert svc.reviewer("jdoe").display_name == "Doe^Jane"  # the installed config names jdoe
    monkeypatch.setenv("USER", "jdoe")
    monkeypatch.setenv("LOGNAME", "jdoe")
    user = review.current_user()
    assert user != "jdoe"
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    with pytest.raises(UnknownReviewerError, match=f"account '{user}' is not a configured reviewer"):
        svc.sign(draft_id, user, "Findings.", "Impression.")
    assert all(d.signed_by is None for d in _drafts(node))


def _drafts(node: synthetic.NodeFixture) -> list[Draft]:
    with node.sessions() as s:
        return list(s.scalars(select(Draft)))


def _private_config(node: synthetic.NodeFixture, folder: Path) -> Path:
    """What an ordinary account can write: its own TOML naming itself a reviewer (as Doe^Jane)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.toml"
    text = (node.root / "cxrnode.toml").read_text().split("[[reviewers]]")[0]
    text += '\n[[reviewers]]\nusername = "mallory"\ndisplay_name = "Doe^Jane"\norganisation = "General Hospital"\n'
    path.write_text(text)
    return path


@root_only
@pytest.mark.parametrize("via", ["--config", "CXRNODE_CONFIG"])
def test_a_private_toml_names_no_signer(node: synthetic.NodeFixture, tmp_path: Path, via: str) -> None:
    folder = tmp_path / "home" / "mallory"
    path = _private_config(node, folder)
    for p in (folder, path):
        os.chown(p, NOBODY, NOBODY)  # the account's own file in its own folder
    config = load_config(path, env={}) if via == "--config" else load_config(None, env={"CXRNODE_CONFIG": str(path)})
    assert config.reviewer("mallory") is not None  # the file says so ...
    svc = ReviewService(config, node.sessions, node.store)
    draft_id = svc.worklist()[0].draft_id  # ... the worklist still opens ...
    assert draft_id is not None
    for attempt in (lambda: svc.claim(draft_id, "mallory"),
                    lambda: svc.sign(draft_id, "mallory", "Forged.", "Forged."),
                    lambda: svc.reject(draft_id, "mallory", "Forged.")):
        with pytest.raises(UntrustedConfigError, match=r"owned by .*uid 65534.*not root.*installed configuration"):
            attempt()  # ... but nobody can claim, sign or reject with it
    assert not svc.is_reviewer("mallory") and svc.find_reviewer("mallory") is None
    assert all(d.state == DraftState.NEW and d.signed_by is None for d in _drafts(node))
    with node.sessions() as s:
        assert not list(s.scalars(select(AuditEvent).where(AuditEvent.actor == "mallory")))


@root_only
@pytest.mark.parametrize("weakness", ["group-writable file", "world-writable file", "file owned by another",
                                      "folder writable by others", "folder owned by another"])
def test_only_a_root_only_writable_config_is_trusted(node: synthetic.NodeFixture, tmp_path: Path,
                                                     weakness: str) -> None:
    folder = tmp_path / "etc" / "cxrnode"
    path = _private_config(node, folder)
    folder.chmod(0o755)
    path.chmod(0o640)
    ok = ReviewService(load_config(path, env={}), node.sessions, node.store)
    assert ok.reviewer("mallory").display_name == "Doe^Jane"  # root's own file: an installed configuration
    if weakness == "group-writable file":
        path.chmod(0o660)
        why = "writable by its group"
    elif weakness == "world-writable file":
        path.chmod(0o646)
        why = "writable by others"
    elif weakness == "file owned by another":
        os.chown(path, NOBODY, 0)
        why = "owned by"
    elif weakness == "folder writable by others":
        folder.chmod(0o777)  # anyone could replace the file
        why = f"folder {folder} is writable by others"
    else:
        os.chown(folder, NOBODY, 0)
        why = f"folder {folder} is owned by"
    svc = ReviewService(load_config(path, env={}), node.sessions, node.store)
    with pytest.raises(UntrustedConfigError, match=why):
        svc.reviewer("mallory")


@root_only
def test_sticky_folders_and_symlinks_to_the_installed_file(node: synthetic.NodeFixture, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    path = _private_config(node, shared)
    shared.chmod(0o1777)  # like /tmp: others cannot rename or remove root's file
    svc = ReviewService(load_config(path, env={}), node.sessions, node.store)
    assert svc.reviewer("mallory").display_name == "Doe^Jane"
    # a symlink an ordinary account made to the installed file: what counts is the file itself
    home = tmp_path / "home"
    home.mkdir()
    (home / "link.toml").symlink_to(path)
    os.chown(home, NOBODY, NOBODY)
    svc = ReviewService(load_config(home / "link.toml", env={}), node.sessions, node.store)
    assert svc.reviewer("mallory").display_name == "Doe^Jane"
    # and a symlink to a file of its own is refused
    fake = home / "fake.toml"
    shutil.copy(path, fake)
    os.chown(fake, NOBODY, NOBODY)
    (home / "link2.toml").symlink_to(fake)
    svc = ReviewService(load_config(home / "link2.toml", env={}), node.sessions, node.store)
    with pytest.raises(UntrustedConfigError, match="owned by"):
        svc.reviewer("mallory")


@root_only
def test_a_config_swapped_after_loading_is_read_from_the_checked_file(node: synthetic.NodeFixture,
                                                                      tmp_path: Path) -> None:
    """The reviewers come from the bytes of the checked file, not from the Config loaded earlier."""
    path = _private_config(node, tmp_path / "etc")
    config = load_config(path, env={})
    path.write_text(path.read_text().replace('display_name = "Doe^Jane"', 'display_name = "Other^Name"'))
    svc = ReviewService(config, node.sessions, node.store)
    assert svc.reviewer("mallory").display_name == "Other^Name"


@root_only
def test_a_toml_written_by_an_unprivileged_account(node: synthetic.NodeFixture,
                                                   request: pytest.FixtureRequest) -> None:
    """The file is really written by ``nobody`` (runuser), in its own folder, with USER=jdoe set."""
    runuser = shutil.which("runuser")
    if not runuser:
        pytest.skip("runuser not installed")
    base = Path(tempfile.mkdtemp(prefix="cxrnode-nobody-", dir="/tmp"))  # pytest's folders are 0700
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    text = (node.root / "cxrnode.toml").read_text().split("[[reviewers]]")[0]
    text += '\n[[reviewers]]\nusername = "jdoe"\ndisplay_name = "Doe^Jane"\n'
    mine = home / "mine.toml"
    proc = subprocess.run([runuser, "-u", "nobody", "--", "sh", "-c", 'cat > "$1"', "sh", str(mine)],
                          input=text, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "USER": "jdoe", "LOGNAME": "jdoe"})
    assert proc.returncode == 0, proc.stderr
    assert mine.stat().st_uid == NOBODY
    svc = ReviewService(load_config(None, env={"CXRNODE_CONFIG": str(mine)}), node.sessions, node.store)
    with pytest.raises(UntrustedConfigError, match=f"{mine} is owned by nobody"):
        svc.sign(svc.worklist()[0].draft_id or 0, "jdoe", "Forged.", "Forged.")


# -- 4. superseded drafts ---------------------------------------------------------------------


def test_a_draft_under_review_is_not_signable_once_the_study_changed(node: synthetic.NodeFixture) -> None:
    svc = ReviewService(node.config, node.sessions, node.store)
    old = svc.worklist()[0].draft_id
    assert old is not None
    study_uid = svc.detail(old).study_instance_uid
    svc.claim(old, "alice")
    _send_more(node, old)  # a lateral arrives for the study alice is reading

    # before the new draft exists: the heartbeat tells alice, and Sign is refused
    with pytest.raises(StudyChangedError, match="gained images after it was drafted; a new draft is being made"):
        svc.claim(old, "alice")
    with pytest.raises(StudyChangedError, match="nothing was signed"):
        svc.sign(old, "alice", "Findings.", "Impression.")
    assert _state(node, old) == DraftState.IN_REVIEW and not _verified(node)

    new = synthetic.run_draft_job(node, study_uid)  # the node drafts the study again
    assert new != old
    with pytest.raises(SupersededError, match=f"draft {old} is superseded.*draft {new} replaces it") as exc:
        svc.sign(old, "alice", "Findings.", "Impression.")
    assert exc.value.newer_draft_id == new
    with pytest.raises(SupersededError):
        svc.claim(old, "alice")
    assert _state(node, old) == DraftState.SUPERSEDED and not _verified(node)

    signed = svc.sign(new, "alice", "Findings on two views.", "Impression.")
    assert signed.state == DraftState.SIGNED and len(_verified(node)) == 1
    assert len(svc.detail(new).views) == 2


def _image_arrives_while_signing(node: synthetic.NodeFixture, svc: ReviewService, draft_id: int) -> None:
    """Sign, with a new image of the study registered after the claim was renewed and the
    verified SR written, just before the signature commits: the committing transaction must see it."""
    real = svc.store.write_dataset

    def write_then_receive(ds: pydicom.Dataset, relpath: str, replace: bool = True) -> tuple[int, str]:
        out = real(ds, relpath, replace=replace)
        if ds.get("VerificationFlag") == "VERIFIED":
            _send_more(node, draft_id)
        return out

    svc.store.write_dataset = write_then_receive  # type: ignore[method-assign]
    try:
        with pytest.raises(StudyChangedError, match="gained images"):
            svc.sign(draft_id, "alice", "Findings.", "Impression.")
    finally:
        svc.store.write_dataset = real  # type: ignore[method-assign]
    assert _state(node, draft_id) == DraftState.IN_REVIEW
    assert not _verified(node), "the verified SR of the refused signature was left in the index"
    assert not [p for p in node.store.root.rglob("*.dcm")
                if pydicom.dcmread(p, stop_before_pixels=True).get("VerificationFlag") == "VERIFIED"]


def test_an_image_arriving_during_the_signature_is_seen_by_its_transaction(node: synthetic.NodeFixture) -> None:
    svc = ReviewService(node.config, node.sessions, node.store)
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    _image_arrives_while_signing(node, svc, draft_id)


@pytest.mark.postgres
def test_superseded_and_changed_studies_on_postgresql(tmp_path: Path) -> None:
    with private_database("sec") as url:
        _superseded_and_changed(tmp_path, url)


def _superseded_and_changed(tmp_path: Path, url: str) -> None:
    node = None
    try:
        specs = [synthetic.SyntheticStudy(key=f"sec-{i}", patient_name=f"Test^Patient{i}", patient_id=f"SEC-{i}",
                                          views=("PA",), size=128, seed=i) for i in range(2)]
        node = synthetic.build_node(tmp_path / "pg", specs, database_url=url)
        svc = ReviewService(node.config, node.sessions, node.store)
        first, second = (r.draft_id for r in svc.worklist())
        assert first is not None and second is not None
        _image_arrives_while_signing(node, svc, first)  # the FOR UPDATE path
        new = synthetic.run_draft_job(node, svc.detail(first).study_instance_uid)
        with pytest.raises(SupersededError):
            svc.sign(first, "alice", "F.", "I.")
        assert svc.sign(new, "alice", "F.", "I.").state == DraftState.SIGNED
        svc.claim(second, "bob")
        _send_more(node, second)
        with pytest.raises(StudyChangedError):
            svc.sign(second, "bob", "F.", "I.")
    finally:
        if node is not None:
            node.engine.dispose()


def test_a_new_image_the_pipeline_does_not_read_leaves_the_draft_signable(node: synthetic.NodeFixture) -> None:
    """A non-chest image changes nothing the draft was made from: the next job confirms the
    draft (same SOP Instance UID) and it becomes signable again."""
    svc = ReviewService(node.config, node.sessions, node.store)
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    study_uid = svc.detail(draft_id).study_instance_uid
    svc.claim(draft_id, "alice")
    _send_more(node, draft_id, body_part="HAND")
    with pytest.raises(StudyChangedError):
        svc.sign(draft_id, "alice", "Findings.", "Impression.")
    assert synthetic.run_draft_job(node, study_uid) == draft_id
    assert svc.sign(draft_id, "alice", "Findings.", "Impression.").state == DraftState.SIGNED


def test_a_failed_redraft_says_to_report_manually(node: synthetic.NodeFixture) -> None:
    svc = ReviewService(node.config, node.sessions, node.store)
    draft_id = svc.worklist()[0].draft_id
    assert draft_id is not None
    study_uid = svc.detail(draft_id).study_instance_uid
    svc.claim(draft_id, "alice")
    _send_more(node, draft_id)

    def broken(_ctx: object) -> object:
        raise RuntimeError("model bundle missing")

    assert synthetic.run_draft_job(node, study_uid, handler=broken) == draft_id  # no new draft
    with node.sessions() as s:
        assert [j.state for j in s.get(Draft, draft_id).study.jobs] == ["done", "failed"]  # type: ignore[union-attr]
    with pytest.raises(StudyChangedError, match="failed .*model bundle missing.*report the study manually"):
        svc.sign(draft_id, "alice", "Findings.", "Impression.")
    d = svc.reject(draft_id, "alice", "Images added after drafting; reported manually.")
    assert d.state == DraftState.REJECTED


def _state(node: synthetic.NodeFixture, draft_id: int) -> str:
    with node.sessions() as s:
        d = s.get(Draft, draft_id)
        assert d is not None
        return d.state


def _verified(node: synthetic.NodeFixture) -> list[str]:
    with node.sessions() as s:
        paths = list(s.scalars(select(Instance.path).where(Instance.generated == 1)))
        assert s.scalars(select(Study)).first() is not None
    return [p for p in paths if pydicom.dcmread(node.store.abspath(p)).VerificationFlag == "VERIFIED"]
