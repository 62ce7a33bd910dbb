"""Report templates in the reviewer's editors: type ``.trigger`` then Tab or Space, press
Ctrl+1..9 (a template's slot), or pick one with Ctrl+T (type to filter, Enter inserts). A
reviewer with the ``templates`` role saves the selected text as a new template with
Ctrl+Shift+T (asked for its trigger, name and optional slot; audited like the CLI's changes).

The templates come from the node's database (:class:`plugin.review.templates.TemplateLibrary`,
read off the GUI thread when the window starts and at every worklist refresh); which word
expands is decided by the Qt-free :func:`plugin.review.templates.expansion`. Text is inserted
only into an editor the reviewer may edit (an open draft they hold); it is their own typing,
so it is never highlighted as model output.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from PyQt6.QtCore import QEvent, QObject, Qt
from PyQt6.QtGui import QKeyEvent, QKeySequence, QShortcut
from PyQt6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QVBoxLayout,
    QWidget,
)

from plugin.review.templates import SLOTS, Template, TemplateLibrary, expansion

if TYPE_CHECKING:
    from gui.window import ReviewerWindow

log = logging.getLogger(__name__)

PICKER_KEY = "Ctrl+T"
SAVE_KEY = "Ctrl+Shift+T"
NOTHING_TO_EDIT = "No report open for editing: open a draft you hold to insert a template."


def slot_key(slot: int) -> str:
    return f"Ctrl+{slot}"


class TemplatePicker(QDialog):
    """Ctrl+T: the templates in a list, filtered as you type (trigger, name or text); Enter or a
    double-click inserts the current one.

    Parameters
    ----------
    templates:
        The templates to offer.
    parent:
        The Qt parent widget.
    """

    def __init__(self, templates: list[Template], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Insert a template")
        self.templates = templates
        lay = QVBoxLayout(self)
        self.filter = QLineEdit(self)
        self.filter.setPlaceholderText("Type to filter: trigger, name or words of the text")
        lay.addWidget(self.filter)
        self.list = QListWidget(self)
        lay.addWidget(self.list, 1)
        self.preview = QLabel("", self)
        self.preview.setWordWrap(True)
        self.preview.setObjectName("model")
        lay.addWidget(self.preview)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.filter.textChanged.connect(self._fill)
        self.list.currentItemChanged.connect(lambda cur, _prev: self.preview.setText(
            cur.data(Qt.ItemDataRole.UserRole).text if cur is not None else ""))
        self.list.itemDoubleClicked.connect(lambda _item: self.accept())
        self.filter.installEventFilter(self)
        self._fill("")
        self.resize(520, 380)

    def _fill(self, needle: str) -> None:
        needle = needle.strip().lower().removeprefix(".")
        self.list.clear()
        for t in self.templates:
            if needle and needle not in t.trigger and needle not in t.name.lower() and needle not in t.text.lower():
                continue
            key = f"{slot_key(t.slot)}  " if t.slot else ""
            item = QListWidgetItem(f"{key}.{t.trigger} — {t.name}", self.list)
            item.setData(Qt.ItemDataRole.UserRole, t)
        if self.list.count():
            self.list.setCurrentRow(0)

    def eventFilter(self, obj: QObject | None, event: QEvent | None) -> bool:  # noqa: N802 (Qt name)
        # arrow keys in the filter move through the list
        if obj is self.filter and isinstance(event, QKeyEvent) and event.type() == QEvent.Type.KeyPress \
                and event.key() in (Qt.Key.Key_Down, Qt.Key.Key_Up):
            row = self.list.currentRow() + (1 if event.key() == Qt.Key.Key_Down else -1)
            if 0 <= row < self.list.count():
                self.list.setCurrentRow(row)
            return True
        return False

    def chosen(self) -> Template | None:
        item = self.list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None


class TemplateHook(QObject):
    """Wires the templates into a :class:`gui.window.ReviewerWindow`'s Findings and Impression
    editors (``.trigger`` + Tab/Space) and window-wide keys (Ctrl+1..9, Ctrl+T).

    Parameters
    ----------
    window:
        The reviewer window.
    library:
        The site's templates (``None``: from the window's service).
    """

    def __init__(self, window: ReviewerWindow, library: TemplateLibrary | None = None) -> None:
        super().__init__(window)
        self.window = window
        self.library = library or TemplateLibrary(window.service.config, window.service.sessions)
        self.templates: dict[str, Template] = {}
        self._loading = False
        #: asks the reviewer for a template (Ctrl+T); replaceable by tests
        self.choose: Callable[[list[Template]], Template | None] = self._choose_dialog
        #: asks for the trigger, name and slot of a new template (Ctrl+Shift+T); replaceable by tests
        self.ask_new: Callable[[str], Template | None] = self._new_dialog
        self.editors: tuple[QPlainTextEdit, ...] = (window.report.findings, window.report.impression)
        for editor in self.editors:
            editor.installEventFilter(self)
        self.shortcuts: list[QShortcut] = []
        for slot in SLOTS:
            self._shortcut(slot_key(slot), functools.partial(self.insert_slot, slot))
        self._shortcut(PICKER_KEY, self.pick)
        self._shortcut(SAVE_KEY, self.save_selection)
        window.worklist_refreshed.connect(self.reload)
        self.reload()

    def _shortcut(self, keys: str, slot: Callable[[], Any]) -> None:
        sc = QShortcut(QKeySequence(keys), self.window)
        sc.setContext(Qt.ShortcutContext.WindowShortcut)
        sc.activated.connect(slot)
        self.shortcuts.append(sc)

    # -- the templates ----------------------------------------------------------------------
    def reload(self) -> None:
        """Read the templates again, off the GUI thread (at start and every worklist refresh)."""
        if self._loading:
            return
        self._loading = True

        def done(templates: list[Template]) -> None:
            self._loading = False
            self.templates = {t.trigger: t for t in templates}

        def failed(exc: BaseException, tb: str) -> None:
            self._loading = False
            log.warning("report templates could not be read: %s", exc)

        self.window.tasks.start(lambda progress: self.library.templates(), done, failed)

    def ordered(self) -> list[Template]:
        return sorted(self.templates.values(), key=lambda t: (t.slot is None, t.slot or 0, t.trigger))

    # -- inserting --------------------------------------------------------------------------
    def target(self) -> QPlainTextEdit | None:
        """The editor to insert into: the focused one, else Findings; None when the open report
        cannot be edited (nothing open, read-only, signed)."""
        vm = self.window.review
        if vm is None or vm.read_only:
            return None
        focused = next((e for e in self.editors if e.hasFocus()), None)
        editor = focused or self.editors[0]
        return None if editor.isReadOnly() else editor

    def insert(self, template: Template, editor: QPlainTextEdit | None = None) -> bool:
        """Insert ``template``'s text at the cursor (a space first when it follows a word)."""
        editor = editor or self.target()
        if editor is None:
            self.window.say(NOTHING_TO_EDIT)
            return False
        cursor = editor.textCursor()
        before = editor.toPlainText()[:cursor.position()]
        cursor.insertText((" " if before and not before[-1].isspace() else "") + template.text)
        editor.setTextCursor(cursor)
        editor.setFocus()
        self.window.say(f"Template .{template.trigger} inserted.")
        return True

    def insert_slot(self, slot: int) -> bool:
        t = next((t for t in self.templates.values() if t.slot == slot), None)
        if t is None:
            self.window.say(f"No template on {slot_key(slot)} (cxrnode templates list).")
            return False
        return self.insert(t)

    def pick(self) -> bool:
        """Ctrl+T: choose a template from the list and insert it."""
        editor = self.target()
        if editor is None:
            self.window.say(NOTHING_TO_EDIT)
            return False
        if not self.templates:
            self.window.say("No report templates yet: cxrnode templates import --default adds the chest set.")
            return False
        chosen = self.choose(self.ordered())
        return self.insert(chosen, editor) if chosen is not None else False

    def _choose_dialog(self, templates: list[Template]) -> Template | None:
        picker = TemplatePicker(templates, self.window)
        return picker.chosen() if picker.exec() == QDialog.DialogCode.Accepted else None

    def save_selection(self) -> bool:
        """Ctrl+Shift+T: the selected report text becomes a new template (``templates`` role)."""
        editor = next((e for e in self.editors if e.hasFocus()), None) or self.editors[0]
        text = editor.textCursor().selectedText().replace("\u2029", "\n").strip()
        if not text:
            self.window.say("Select the text to keep as a template first, then press " + SAVE_KEY + ".")
            return False
        user = self.window.user
        if not self.library.may_edit(user):
            self.window.say(f"Only reviewers with the \"templates\" role can save templates ({user} has not).")
            return False
        wanted = self.ask_new(text)
        if wanted is None:
            return False
        template = Template(wanted.trigger, wanted.name, text, wanted.slot)

        def done(saved: Template) -> None:
            self.templates[saved.trigger] = saved
            self.window.say(f"Template .{saved.trigger} saved: type .{saved.trigger} then Tab to insert it.")
            self.reload()

        def failed(exc: BaseException, tb: str) -> None:
            self.window.show_error("Template not saved", str(exc))

        self.window.tasks.start(lambda progress: self.library.add(user, template), done, failed)
        return True

    def _new_dialog(self, text: str) -> Template | None:
        from PyQt6.QtWidgets import QFormLayout, QSpinBox

        dialog = QDialog(self.window)
        dialog.setWindowTitle("Save as a report template")
        form = QFormLayout(dialog)
        trigger, name, slot = QLineEdit(dialog), QLineEdit(dialog), QSpinBox(dialog)
        trigger.setPlaceholderText("typed as .trigger (a-z 0-9 _ -)")
        slot.setRange(0, 9)
        slot.setSpecialValueText("none")
        form.addRow("Trigger", trigger)
        form.addRow("Name", name)
        form.addRow("Ctrl+ slot", slot)
        preview = QLabel(text[:300] + ("…" if len(text) > 300 else ""), dialog)
        preview.setWordWrap(True)
        form.addRow("Text", preview)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel, dialog)
        buttons.accepted.connect(dialog.accept)
        buttons.rejected.connect(dialog.reject)
        form.addRow(buttons)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return None
        return Template(trigger.text(), name.text() or trigger.text(), text, slot.value() or None)

    def expand(self, editor: QPlainTextEdit) -> bool:
        """Replace the ``.trigger`` just before the cursor by its template; False if none."""
        if editor.isReadOnly() or self.window.review is None or self.window.review.read_only:
            return False
        cursor = editor.textCursor()
        found = expansion(editor.toPlainText(), cursor.position(), self.templates)
        if found is None:
            return False
        start, end, text = found
        cursor.setPosition(start)
        cursor.setPosition(end, cursor.MoveMode.KeepAnchor)
        cursor.insertText(text)
        editor.setTextCursor(cursor)
        return True

    def eventFilter(self, obj: QObject | None, event: QEvent | None) -> bool:  # noqa: N802 (Qt name)
        if (isinstance(obj, QPlainTextEdit) and obj in self.editors and isinstance(event, QKeyEvent)
                and event.type() == QEvent.Type.KeyPress
                and event.key() in (Qt.Key.Key_Tab, Qt.Key.Key_Space)
                and not event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier):
            if self.expand(obj):
                return event.key() == Qt.Key.Key_Tab  # Tab is used up; Space is typed after the text
        return False


__all__ = ["PICKER_KEY", "SAVE_KEY", "TemplateHook", "TemplatePicker", "slot_key"]
