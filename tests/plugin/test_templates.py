"""Report templates (macros): the library in the node's database (SQLite and PostgreSQL), who may
change it (the ``templates`` role of the installed config, or root), the audit of every change,
template files, the shipped chest set, expansion of ``.trigger`` and ``cxrnode templates``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from support import synthetic
from support.postgres import private_database

from dicom_node.db import AuditEvent, ReportTemplate
from plugin.review import templates as tpl
from plugin.review.templates import (
    DEFAULT_FILE,
    Template,
    TemplateError,
    TemplateLibrary,
    TemplatePermissionError,
    expansion,
)

REVIEWERS = """
[[reviewers]]
username = "alice"
display_name = "Moreau^Alice^^Dr"
organisation = "Radiology"
roles = ["templates"]

[[reviewers]]
username = "bob"
display_name = "Okafor^Bob^^Dr"
organisation = "Radiology"
"""


def _node(root: Path, url: str = "") -> synthetic.NodeFixture:
    synthetic.write_config(root, reviewers_toml=REVIEWERS)
    return synthetic.open_node(root, url)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[synthetic.NodeFixture]:
    n = _node(tmp_path / "node")
    yield n
    n.engine.dispose()


@pytest.fixture
def lib(node: synthetic.NodeFixture) -> TemplateLibrary:
    return TemplateLibrary(node.config, node.sessions)


def audits(node: synthetic.NodeFixture) -> list[AuditEvent]:
    with node.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action.like("template_%")).order_by(AuditEvent.id)))


# -- pure parts -----------------------------------------------------------------------------------

def test_template_default_file_is_valid_chest_set() -> None:
    ts = tpl.read_file(DEFAULT_FILE)
    by = {t.trigger: t for t in ts}
    assert {"normal", "nad", "normalap"} <= set(by)
    assert by["normal"].slot == 1 and "pneumothorax" in by["normal"].text
    assert sorted(t.slot for t in ts if t.slot) == list(range(1, 7))
    assert tpl.parse_templates(__import__("tomllib").loads(tpl.dump_templates(ts))) == ts  # export reads back


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (Template("Norm al", "n", "t"), "trigger"),
        (Template("x" * 33, "n", "t"), "trigger"),
        (Template("ok", "", "t"), "name"),
        (Template("ok", "n", "   "), "text"),
        (Template("ok", "n", "t" * 4001), "text"),
        (Template("ok", "n", "The xxxx are intact."), "placeholder"),
        (Template("ok", "n", "t", slot=10), "slot"),
        (Template("ok", "n", "t", slot=0), "slot"),
    ],
)
def test_template_validation_refuses(template: Template, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        tpl.validated(template)


def test_template_validation_normalises() -> None:
    t = tpl.validated(Template(".Normal", "  Normal   chest ", "Line one.   \nLine two.  \n"))
    assert (t.trigger, t.name, t.text) == ("normal", "Normal chest", "Line one.\nLine two.")


def test_template_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "t.toml"
    bad.write_text('[[templates]]\ntrigger = "a"\nname = "A"\ntext = "x"\ncolour = "red"\n')
    with pytest.raises(TemplateError, match=r"templates\[0\]\.colour: unknown key"):
        tpl.read_file(bad)
    bad.write_text('[[templates]]\ntrigger = "a"\nname = "A"\ntext = "x"\nslot = 1\n'
                   '[[templates]]\ntrigger = "b"\nname = "B"\ntext = "y"\nslot = 1\n')
    with pytest.raises(TemplateError, match="slot 1 is used twice"):
        tpl.read_file(bad)
    bad.write_text("[[templates]\n")
    with pytest.raises(TemplateError, match="not valid TOML"):
        tpl.read_file(bad)
    with pytest.raises(TemplateError, match="not found"):
        tpl.read_file(tmp_path / "missing.toml")


def test_template_expansion_of_the_word_before_the_cursor() -> None:
    ts = {"normal": Template("normal", "Normal", "The lungs are clear.")}
    assert expansion(".normal", 7, ts) == (0, 7, "The lungs are clear.")
    text = "Findings: .Normal"
    assert expansion(text, len(text), ts) == (10, len(text), "The lungs are clear.")
    assert expansion("e.g.normal", 10, ts) is None  # not a word of its own
    assert expansion(".normalx", 8, ts) is None  # no such trigger
    assert expansion(".normal more", 7, ts) == (0, 7, "The lungs are clear.")  # cursor mid-text
    assert expansion("normal", 6, ts) is None  # no dot


# -- the library ---------------------------------------------------------------------------------

def test_template_import_default_and_list(lib: TemplateLibrary) -> None:
    r = lib.import_templates("alice", tpl.read_file(DEFAULT_FILE))
    assert len(r.added) == 13 and not r.changed and not r.unchanged
    listed = lib.templates()
    assert [t.trigger for t in listed[:3]] == ["normal", "nad", "normalap"]  # by slot first
    assert all(t.updated_by == "alice" for t in listed)
    again = lib.import_templates("alice", tpl.read_file(DEFAULT_FILE))
    assert len(again.unchanged) == 13 and not again.added


def test_template_roles_decide_who_may_change(lib: TemplateLibrary, node: synthetic.NodeFixture) -> None:
    t = Template("clear", "Lungs clear", "The lungs are clear.")
    with pytest.raises(TemplatePermissionError, match=r'roles = \["templates"\]'):
        lib.add("bob", t)  # a reviewer without the role
    with pytest.raises(TemplatePermissionError):
        lib.add("mallory", t)  # not a reviewer
    assert lib.templates() == [] and audits(node) == []
    assert lib.may_edit("alice") and lib.may_edit("root") and not lib.may_edit("bob")
    lib.add("alice", t)
    with pytest.raises(TemplatePermissionError):
        lib.remove("bob", "clear")
    assert [x.trigger for x in lib.templates()] == ["clear"]


def test_template_role_only_from_an_installed_config(lib: TemplateLibrary) -> None:
    cfg = Path(lib.config.source)
    os.chmod(cfg, 0o664)  # group-writable: anyone in the group could give themselves the role
    try:
        with pytest.raises(TemplatePermissionError, match="writable by its group"):
            lib.add("alice", Template("clear", "Lungs clear", "The lungs are clear."))
    finally:
        os.chmod(cfg, 0o644)


def test_template_changes_are_audited_with_their_text(lib: TemplateLibrary, node: synthetic.NodeFixture) -> None:
    lib.add("alice", Template("clear", "Lungs clear", "The lungs are clear.", slot=4))
    with pytest.raises(TemplateError, match="exists with other content"):
        lib.add("alice", Template("clear", "Lungs clear", "Both lungs are clear."))
    lib.add("alice", Template("clear", "Lungs clear", "Both lungs are clear.", slot=4), update_existing=True)
    gone = lib.remove("root", ".clear")
    assert gone.text == "Both lungs are clear."
    events = audits(node)
    assert [(e.actor, e.action) for e in events] == [
        ("alice", "template_added"), ("alice", "template_changed"), ("root", "template_removed")]
    added, changed, removed = (json.loads(e.detail) for e in events)
    assert added["text"] == "The lungs are clear." and added["slot"] == 4
    assert changed["before"]["text"] == "The lungs are clear." and changed["text"] == "Both lungs are clear."
    assert removed["trigger"] == "clear" and removed["text"] == "Both lungs are clear."
    with pytest.raises(TemplateError, match="no template .clear"):
        lib.remove("alice", "clear")


def _slots_and_conflicts(lib: TemplateLibrary) -> None:
    lib.import_templates("alice", [Template("a", "A", "Text a.", 1), Template("b", "B", "Text b.", 2)])
    with pytest.raises(TemplateError, match=r"slot 1 \(Ctrl\+1\) is taken by .a"):
        lib.add("alice", Template("c", "C", "Text c.", 1))
    # all or nothing: one refused template leaves the others out too
    with pytest.raises(TemplateError, match="exists with other content"):
        lib.import_templates("alice", [Template("d", "D", "Text d."), Template("a", "A", "Other a.", 1)])
    assert [t.trigger for t in lib.templates()] == ["a", "b"]
    # two templates swap their slots in one import (the unique slot is freed first)
    r = lib.import_templates("alice", [Template("a", "A", "Text a.", 2), Template("b", "B", "Text b.", 1)],
                             update_existing=True)
    assert set(r.changed) == {"a", "b"}
    assert [(t.trigger, t.slot) for t in lib.templates()] == [("b", 1), ("a", 2)]


def test_template_slots_and_conflicts_sqlite(lib: TemplateLibrary) -> None:
    _slots_and_conflicts(lib)


@pytest.mark.postgres
def test_template_library_postgres(tmp_path: Path) -> None:
    with private_database("templates") as url:
        node = _node(tmp_path / "node", url)
        try:
            lib = TemplateLibrary(node.config, node.sessions)
            _slots_and_conflicts(lib)
            with node.sessions() as s:
                assert len(s.scalars(select(ReportTemplate)).all()) == 2
            assert [e.action for e in audits(node)].count("template_changed") == 2
        finally:
            node.engine.dispose()


# -- cxrnode templates -----------------------------------------------------------------------

def test_template_cli_import_list_export_remove(node: synthetic.NodeFixture, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from installer.cli import main

    cfg = str(node.root / "cxrnode.toml")
    assert main(["templates", "--config", cfg, "import", "--default"]) == 0  # as root
    assert "13 added, 0 changed, 0 unchanged" in capsys.readouterr().out
    assert main(["templates", "--config", cfg, "list"]) == 0
    out = capsys.readouterr().out
    assert "Ctrl+1  .normal" in out and ".copd" in out
    assert main(["templates", "--config", cfg, "show", ".nad"]) == 0
    assert capsys.readouterr().out.strip() == "No acute cardiopulmonary abnormality."
    exported = tmp_path / "export.toml"
    assert main(["templates", "--config", cfg, "export", str(exported)]) == 0
    assert tpl.read_file(exported) == [
        Template(t.trigger, t.name, t.text, t.slot) for t in TemplateLibrary(node.config, node.sessions).templates()]
    assert main(["templates", "--config", cfg, "add", "rib", "--name", "Rib fracture", "--slot", "7",
                 "--text", "Acute fracture of a left rib."]) == 0
    assert "template .rib saved (Ctrl+7)" in capsys.readouterr().out
    assert main(["templates", "--config", cfg, "remove", "rib"]) == 0
    # an account without the role is refused, with what to change
    monkeypatch.setattr("gui.templates_cli.current_user", lambda: "bob")
    assert main(["templates", "--config", cfg, "remove", "normal"]) == 1
    err = capsys.readouterr().err
    assert "cannot change templates" in err and 'roles = ["templates"]' in err
    assert main(["templates", "--config", cfg, "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 13


def test_template_role_names_are_checked_at_load(tmp_path: Path) -> None:
    from dicom_node.config import ConfigError, load_config

    cfg = synthetic.write_config(tmp_path / "n", reviewers_toml=REVIEWERS.replace('["templates"]', '["admin"]'))
    with pytest.raises(ConfigError, match=r"reviewers\[0\]\.roles\[0\]: expected one of templates, got 'admin'"):
        load_config(cfg, env={})
    cfg = synthetic.write_config(tmp_path / "m", reviewers_toml=REVIEWERS.replace('["templates"]', '"templates"'))
    with pytest.raises(ConfigError, match=r"reviewers\[0\]\.roles: expected a list of str"):
        load_config(cfg, env={})


def test_template_cli_reports_an_unreadable_text_file(node: synthetic.NodeFixture, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from installer.cli import main

    cfg = str(node.root / "cxrnode.toml")
    assert main(["templates", "--config", cfg, "add", "x", "--name", "X", "--text-file", str(tmp_path / "no")]) == 1
    assert "cannot read it" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("Heart size normal.\n")
    assert main(["templates", "--config", cfg, "add", "heart", "--name", "Heart", "--text-file",
                 str(tmp_path / "t.txt")]) == 0
    assert TemplateLibrary(node.config, node.sessions).by_trigger()["heart"].text == "Heart size normal."



@pytest.mark.postgres
def test_template_race_on_a_trigger_is_a_clear_refusal_postgres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two desktops add one trigger at once: the other desktop commits its row after our read and
    before our write; the unique key decides and we get a TemplateError, not a database error."""
    from sqlalchemy.orm import sessionmaker

    with private_database("tpl_race") as url:
        node = _node(tmp_path / "node", url)
        try:
            lib = TemplateLibrary(node.config, node.sessions)
            other = TemplateLibrary(node.config, sessionmaker(node.engine))
            real = tpl.index.audit

            def other_desktop_first(*args, **kw):  # type: ignore[no-untyped-def]
                monkeypatch.setattr(tpl.index, "audit", real)  # our row is added, not yet written
                other.add("root", Template("clear", "Lungs clear", "Other desktop's text."))
                return real(*args, **kw)

            monkeypatch.setattr(tpl.index, "audit", other_desktop_first)
            with pytest.raises(TemplateError, match="at the same time"):
                lib.add("alice", Template("clear", "Lungs clear", "The lungs are clear."))
            assert lib.by_trigger()["clear"].text == "Other desktop's text."
            assert [e.actor for e in audits(node)] == ["root"]  # the refused change left no audit row
        finally:
            node.engine.dispose()
