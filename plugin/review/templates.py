"""Report templates (macros): site-defined text snippets the reviewer inserts into the report
(Qt-free; the editor hook is :mod:`gui.templates`).

A template has a *trigger* word (typed in the editor as ``.normal`` then Tab or Space, it is
replaced by the text), an optional *slot* 1-9 (Ctrl+1..9 inserts it at the cursor), a name
(shown in the Ctrl+T picker) and its text. They live in the database (``report_templates``,
migration 0005), so every reviewer desktop of a site shares them.

Who may change them: reviewers of the *installed* configuration whose ``[[reviewers]]`` entry
has ``roles = ["templates"]`` (the same root-owned file that says who may sign,
:func:`plugin.review.service.installed_reviewers`), and root (who can change that file
anyway). Every change is audited (``template_added`` / ``template_changed`` /
``template_removed``, with the trigger, name, slot and text: templates are site text, never
patient data). Reading them needs no role.

Template files (``cxrnode templates import FILE`` / ``export``) are TOML::

    [[templates]]
    trigger = "normal"                 # typed as .normal; a-z 0-9 _ -, 1-32 characters
    name = "Normal chest, PA and lateral"
    slot = 1                           # optional: Ctrl+1
    text = \"\"\"The lungs are clear. ...\"\"\"

:data:`DEFAULT_FILE` is the shipped set for chest radiographs (normal chest, common
phrasings); a site imports it with ``cxrnode templates import --default``. Template text may
not hold de-identification placeholders (``xxxx``): signing refuses them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import index
from dicom_node.config import Config
from dicom_node.db import ReportTemplate, utcnow
from plugin.review.service import (
    ReviewError,
    UnknownReviewerError,
    installed_reviewers,
    placeholders,
)

#: the role a ``[[reviewers]]`` entry needs to change templates
ROLE = "templates"
#: typed before the trigger word in the editor: ``.normal``
TRIGGER_PREFIX = "."
TRIGGER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
SLOTS = range(1, 10)
MAX_NAME = 64
MAX_TEXT = 4000
#: the shipped chest radiograph set
DEFAULT_FILE = Path(__file__).with_name("chest_templates.toml")


class TemplateError(ReviewError):
    """A template (or a template file) is not valid, or a change conflicts with another one."""


class TemplatePermissionError(TemplateError):
    """The account may not change templates (no ``templates`` role in the installed config)."""


@dataclass(frozen=True)
class Template:
    """One report template.

    Attributes
    ----------
    trigger:
        Typed as ``.trigger`` in the editor to expand it.
    name:
        Shown in the picker.
    text:
        The text it expands to.
    slot:
        Its Ctrl+digit key (``None``: none).
    updated_by, updated_at:
        Who changed it last, and when.
    """

    trigger: str
    name: str
    text: str
    slot: int | None = None
    updated_by: str = ""
    updated_at: dt.datetime | None = None

    def content(self) -> tuple[str, str, str, int | None]:
        return self.trigger, self.name, self.text, self.slot

    def as_json(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "name": self.name, "slot": self.slot, "text": self.text}


def validated(t: Template) -> Template:
    """``t`` normalised (trigger lower-case without its leading dot, name and text trimmed), or
    :class:`TemplateError` saying which field is wrong and what is expected."""
    trigger = t.trigger.strip().lower().removeprefix(TRIGGER_PREFIX)
    if not TRIGGER_RE.fullmatch(trigger):
        raise TemplateError(f"trigger {t.trigger!r}: expected 1-32 of a-z 0-9 _ - (starting with a letter or digit), "
                            "typed in the report as .trigger")
    name = " ".join(t.name.split())
    if not name or len(name) > MAX_NAME:
        raise TemplateError(f"template .{trigger}: name: expected 1-{MAX_NAME} characters, got {len(name)}")
    text = "\n".join(line.rstrip() for line in t.text.strip().splitlines())
    if not text or len(text) > MAX_TEXT:
        raise TemplateError(f"template .{trigger}: text: expected 1-{MAX_TEXT} characters, got {len(text)}")
    if n := placeholders(text):
        raise TemplateError(f"template .{trigger}: text holds {n} de-identification placeholder(s) (\"xxxx\"), "
                            "which signing refuses; write the words instead")
    if t.slot is not None and (isinstance(t.slot, bool) or t.slot not in SLOTS):
        raise TemplateError(f"template .{trigger}: slot: expected 1-9 (Ctrl+1..9) or none, got {t.slot!r}")
    return replace(t, trigger=trigger, name=name, text=text)


# -- files ------------------------------------------------------------------------------------

def parse_templates(data: Mapping[str, Any], where: str = "templates") -> list[Template]:
    """Templates from a decoded template file (``{"templates": [{trigger, name, text, slot?}]}``),
    validated; duplicate triggers or slots in one file are refused."""
    items = data.get("templates")
    if not isinstance(items, list) or set(data) - {"templates"}:
        raise TemplateError(f"{where}: expected [[templates]] tables only")
    out: list[Template] = []
    for i, item in enumerate(items):
        key = f"{where}: templates[{i}]"
        if not isinstance(item, dict):
            raise TemplateError(f"{key}: expected a table")
        unknown = set(item) - {"trigger", "name", "text", "slot"}
        if unknown:
            raise TemplateError(f"{key}.{sorted(unknown)[0]}: unknown key (known: name, slot, text, trigger)")
        for k in ("trigger", "name", "text"):
            if not isinstance(item.get(k), str):
                raise TemplateError(f"{key}.{k}: expected a string")
        slot = item.get("slot")
        if slot is not None and (not isinstance(slot, int) or isinstance(slot, bool)):
            raise TemplateError(f"{key}.slot: expected 1-9, got {slot!r}")
        try:
            out.append(validated(Template(item["trigger"], item["name"], item["text"], slot)))
        except TemplateError as exc:
            raise TemplateError(f"{key}: {exc}") from None
    _no_duplicates(out, where)
    return out


def _no_duplicates(templates: Sequence[Template], where: str) -> None:
    seen: dict[Any, str] = {}
    for t in templates:
        for what, value in (("trigger", t.trigger), ("slot", t.slot)):
            if value is None:
                continue
            if (what, value) in seen:
                raise TemplateError(f"{where}: {what} {value} is used twice (.{seen[what, value]} and .{t.trigger})")
            seen[what, value] = t.trigger


def read_file(path: str | os.PathLike[str]) -> list[Template]:
    """Templates from a TOML template file; :class:`TemplateError` naming the file and the key."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateError(f"template file {p}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"template file {p}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"template file {p}: not valid TOML: {exc}") from None
    return parse_templates(data, f"template file {p}")


def _toml_string(s: str) -> str:
    if "\n" in s and '"""' not in s and "\\" not in s and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", s):
        return '"""\n' + s + '"""'
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def dump_templates(templates: Iterable[Template]) -> str:
    """A template file (TOML) that :func:`read_file` reads back to the same templates."""
    out = ["# cxrnode report templates: cxrnode templates import FILE", ""]
    for t in templates:
        out.append("[[templates]]")
        out.append(f"trigger = {_toml_string(t.trigger)}")
        out.append(f"name = {_toml_string(t.name)}")
        if t.slot is not None:
            out.append(f"slot = {t.slot}")
        out.append(f"text = {_toml_string(t.text)}")
        out.append("")
    return "\n".join(out)


# -- expansion in the editor (pure) ------------------------------------------------------------

_WORD_BEFORE = re.compile(r"(?:^|(?<=\s))\.([A-Za-z0-9][A-Za-z0-9_-]{0,31})$")


def expansion(text: str, cursor: int, templates: Mapping[str, Template]) -> tuple[int, int, str] | None:
    """What ``.trigger`` becomes in the editor: if the word just before ``cursor`` is ``.trigger``
    of one of ``templates``, the span to replace and the template's text. The word must start
    the text or follow white space (``e.g.normal`` is no trigger).

    Parameters
    ----------
    text:
        The editor's text.
    cursor:
        The cursor's position in ``text``.
    templates:
        The templates by trigger.

    Returns
    -------
    tuple[int, int, str] or None
        ``(start, end, text)`` to replace, or ``None``.
    """
    m = _WORD_BEFORE.search(text[:cursor])
    if m is None:
        return None
    t = templates.get(m.group(1).lower())
    return None if t is None else (m.start(), cursor, t.text)


# -- the library (database) --------------------------------------------------------------------

def _row(r: ReportTemplate) -> Template:
    return Template(r.trigger, r.name, r.text, r.slot, r.updated_by, r.updated_at)


@dataclass(frozen=True)
class ImportResult:
    """What :meth:`TemplateLibrary.import_templates` did, by trigger.

    Attributes
    ----------
    added, changed, unchanged:
        The triggers in each case.
    """
    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


class TemplateLibrary:
    """The site's templates in the node's database: read by every reviewer, changed (audited)
    by reviewers with the ``templates`` role and by root.

    Parameters
    ----------
    config:
        The configuration (the installed ``[[reviewers]]`` decide who may edit).
    sessions:
        Session factory of the node's database.
    """

    def __init__(self, config: Config, sessions: sessionmaker[Session]) -> None:
        self.config = config
        self.sessions = sessions

    # -- who --------------------------------------------------------------------------------
    def may_edit(self, user: str) -> bool:
        try:
            self.require_editor(user)
        except TemplatePermissionError:
            return False
        return True

    def require_editor(self, user: str) -> None:
        """Raise :class:`TemplatePermissionError` unless ``user`` may change templates."""
        if user == "root":
            return
        try:
            found = next((r for r in installed_reviewers(self.config) if r.username == user), None)
        except UnknownReviewerError as exc:  # the config is not an installed one
            raise TemplatePermissionError(f"account {user!r} cannot change templates: {exc}") from None
        if found is None or ROLE not in found.roles:
            raise TemplatePermissionError(
                f"account {user!r} cannot change templates: it needs roles = [\"{ROLE}\"] in its [[reviewers]] "
                f"entry of the installed configuration{f' ({self.config.source})' if self.config.source else ''}")

    # -- read -------------------------------------------------------------------------------
    def templates(self) -> list[Template]:
        """Every template: slotted ones first (by slot), then by trigger."""
        with self.sessions() as s:
            rows = [_row(r) for r in s.scalars(select(ReportTemplate))]
        return sorted(rows, key=lambda t: (t.slot is None, t.slot or 0, t.trigger))

    def by_trigger(self) -> dict[str, Template]:
        return {t.trigger: t for t in self.templates()}

    # -- change (audited) ---------------------------------------------------------------------
    def add(self, user: str, template: Template, update_existing: bool = False) -> Template:
        """Add a template (or change the one with its trigger when ``update_existing``)."""
        return self._apply(user, [validated(template)], update_existing, "templates add")[0]

    def import_templates(self, user: str, templates: Sequence[Template], update_existing: bool = False) -> ImportResult:
        """Add every template of a file in one transaction (all or nothing). A trigger already
        present with other content is refused unless ``update_existing``; a slot taken by another
        trigger is refused. Identical templates are left as they are."""
        checked = [validated(t) for t in templates]
        _no_duplicates(checked, "import")
        before = self.by_trigger()
        self._apply(user, checked, update_existing, "templates import")
        added = tuple(t.trigger for t in checked if t.trigger not in before)
        unchanged = tuple(t.trigger for t in checked if t.trigger in before and before[t.trigger].content() == t.content())
        changed = tuple(t.trigger for t in checked if t.trigger in before and t.trigger not in unchanged)
        return ImportResult(added, changed, unchanged)

    def _apply(self, user: str, templates: Sequence[Template], update_existing: bool, how: str) -> list[Template]:
        self.require_editor(user)
        try:
            return self._apply_once(user, templates, update_existing, how)
        except IntegrityError:  # another desktop took the trigger or slot between our read and write
            raise TemplateError("another reviewer changed the templates at the same time (a trigger or slot was "
                                "taken meanwhile); nothing was changed: list them and try again") from None

    def _apply_once(self, user: str, templates: Sequence[Template], update_existing: bool, how: str) -> list[Template]:
        now = utcnow()
        out: list[Template] = []
        with self.sessions() as s, s.begin():
            existing = {r.trigger: r for r in s.scalars(select(ReportTemplate).with_for_update())}
            slots = {r.slot: r.trigger for r in existing.values() if r.slot is not None}
            incoming = {t.trigger for t in templates}
            for t in templates:
                old = existing.get(t.trigger)
                if old is not None and _row(old).content() != t.content() and not update_existing:
                    raise TemplateError(f"template .{t.trigger} exists with other content; change it with "
                                        "--update (or remove it first)")
                holder = slots.get(t.slot) if t.slot is not None else None
                if holder is not None and holder != t.trigger and not (holder in incoming and update_existing):
                    raise TemplateError(f"slot {t.slot} (Ctrl+{t.slot}) is taken by .{holder}; remove it or give "
                                        f".{t.trigger} another slot")
            # free the slots of the rows being changed first: two templates may swap slots
            changing = [t.trigger for t in templates if t.trigger in existing
                        and _row(existing[t.trigger]).content() != t.content()]
            if changing:
                s.execute(update(ReportTemplate).where(ReportTemplate.trigger.in_(changing)).values(slot=None)
                          .execution_options(synchronize_session=False))
                s.flush()
            for t in templates:
                old = existing.get(t.trigger)
                if old is None:
                    row = ReportTemplate(trigger=t.trigger, name=t.name, text=t.text, slot=t.slot,
                                         created_at=now, updated_at=now, updated_by=user)
                    s.add(row)
                    index.audit(s, user, "template_added", detail=json.dumps({**t.as_json(), "via": how}))
                elif t.trigger in changing:
                    before = _row(old).as_json()
                    s.execute(update(ReportTemplate).where(ReportTemplate.id == old.id)
                              .values(name=t.name, text=t.text, slot=t.slot, updated_at=now, updated_by=user)
                              .execution_options(synchronize_session=False))
                    index.audit(s, user, "template_changed",
                                detail=json.dumps({**t.as_json(), "before": before, "via": how}))
                s.flush()
                out.append(replace(t, updated_by=user, updated_at=now))
        return out

    def remove(self, user: str, trigger: str) -> Template:
        """Remove the template with ``trigger`` (audited with its text); TemplateError if none."""
        self.require_editor(user)
        trigger = trigger.strip().lower().removeprefix(TRIGGER_PREFIX)
        with self.sessions() as s, s.begin():
            row = s.scalars(select(ReportTemplate).where(ReportTemplate.trigger == trigger)).one_or_none()
            if row is None:
                raise TemplateError(f"no template .{trigger}")
            gone = _row(row)
            s.delete(row)
            index.audit(s, user, "template_removed", detail=json.dumps(gone.as_json()))
        return gone


__all__ = [
    "DEFAULT_FILE",
    "ROLE",
    "TRIGGER_PREFIX",
    "ImportResult",
    "Template",
    "TemplateError",
    "TemplateLibrary",
    "TemplatePermissionError",
    "dump_templates",
    "expansion",
    "parse_templates",
    "read_file",
    "validated",
]
