"""Every keyboard shortcut of the reviewer in one table (Qt-free): the window binds the
window-wide ones from it, the key-help dialog (F1 or ?) lists it, README's keys table says the
same, and a test checks that every shortcut the window has is in it.

Window-wide keys work wherever the focus is (the report editor included), so no image has to
be clicked first: they are function keys or Ctrl / Alt chords, never plain letters, which
would be typed into the report. The plain-letter image keys (I, R, F, 1, +, -) still work when
an image has the focus.
"""

from __future__ import annotations

from dataclasses import dataclass

REPORT = "Report"
IMAGES = "Images"
WORKLIST = "Worklist and window"
IMAGE_FOCUSED = "Images (when an image has the focus)"
GROUPS = (REPORT, IMAGES, WORKLIST, IMAGE_FOCUSED)


@dataclass(frozen=True)
class Key:
    """One action: its id (the window's slot name), key sequences (Qt's portable text), what
    it does, and its group. ``window_wide`` False: bound elsewhere (the image viewer)."""

    action: str
    keys: tuple[str, ...]
    text: str
    group: str
    window_wide: bool = True
    #: more sequences for the same action, bound but not listed (``Shift+?``: how "?" is typed)
    aliases: tuple[str, ...] = ()

    def shown(self) -> str:
        """The keys as written in the help and README: ``Ctrl+Shift+Enter / F12``."""
        return " / ".join(dict.fromkeys(k.replace("Return", "Enter") for k in self.keys))


KEYS: tuple[Key, ...] = (
    Key("sign", ("Ctrl+Return", "Ctrl+Enter"), "Sign the open report (asks first, naming the patient)", REPORT),
    Key("sign_and_next", ("Ctrl+Shift+Return", "Ctrl+Shift+Enter", "F12"),
        "Sign and open the next unclaimed study in worklist order", REPORT),
    Key("undo_sign", ("Ctrl+Z",), "Undo the last signature, within the undo window", REPORT),
    Key("reject", ("Ctrl+Shift+R",), "Reject the draft, with a reason", REPORT),
    Key("toggle_diff", ("Ctrl+D",), "Changes against the AI draft", REPORT),
    Key("template_slot", tuple(f"Ctrl+{i}" for i in range(1, 10)),
        "Insert report template 1-9 (its slot; also: type .trigger then Tab or Space)", REPORT, window_wide=False),
    Key("template_picker", ("Ctrl+T",), "Choose a report template to insert (type to filter)", REPORT,
        window_wide=False),
    Key("template_save", ("Ctrl+Shift+T",), "Save the selected text as a report template (templates role)", REPORT,
        window_wide=False),
    Key("text_bigger", ("Ctrl+=", "Ctrl++"), "Larger text (remembered)", REPORT),
    Key("text_smaller", ("Ctrl+-",), "Smaller text (remembered)", REPORT),
    Key("text_reset", ("Ctrl+0",), "Text size back to 14 px", REPORT),
    Key("preset_lung", ("F2",), "Lung window (all views)", IMAGES),
    Key("preset_mediastinum", ("F3",), "Mediastinum window (all views)", IMAGES),
    Key("preset_bone", ("F4",), "Bone window (all views)", IMAGES),
    Key("window_as_sent", ("F6",), "The image's own window, as sent", IMAGES),
    Key("window_narrower", ("Alt+Left",), "Window narrower (more contrast)", IMAGES),
    Key("window_wider", ("Alt+Right",), "Window wider (less contrast)", IMAGES),
    Key("level_brighter", ("Alt+Up",), "Brighter", IMAGES),
    Key("level_darker", ("Alt+Down",), "Darker", IMAGES),
    Key("invert_all", ("Alt+I",), "Invert grey scale", IMAGES),
    Key("zoom_in_all", ("Alt+=", "Alt++"), "Zoom in", IMAGES),
    Key("zoom_out_all", ("Alt+-",), "Zoom out", IMAGES),
    Key("fit_all", ("Alt+0",), "Fit to the view", IMAGES),
    Key("toggle_magnifier", ("F9",), "Magnifier: a loupe that follows the mouse", IMAGES),
    Key("cycle_single_view", ("F8",), "One view at a time: all, each view, all again", IMAGES),
    Key("toggle_image_fullscreen", ("F11",), "Images full screen (Esc or F11 leaves)", IMAGES),
    Key("toggle_prior", ("Ctrl+P",), "Show or hide the prior study beside the current one", IMAGES),
    Key("next", ("Ctrl+N",), "Open the next waiting draft", WORKLIST),
    Key("focus_search", ("Ctrl+F",), "Search the worklist", WORKLIST),
    Key("refresh", ("F5",), "Refresh the worklist", WORKLIST),
    Key("show_key_help", ("F1", "?"), "This list of keys", WORKLIST, aliases=("Shift+?",)),
    Key("image_invert", ("I",), "Invert", IMAGE_FOCUSED, window_wide=False),
    Key("image_reset", ("R",), "Reset window/level, zoom and pan", IMAGE_FOCUSED, window_wide=False),
    Key("image_fit", ("F",), "Fit", IMAGE_FOCUSED, window_wide=False),
    Key("image_one_to_one", ("1",), "One image pixel per screen pixel", IMAGE_FOCUSED, window_wide=False),
    Key("image_zoom", ("+", "-"), "Zoom in / out", IMAGE_FOCUSED, window_wide=False),
)


def by_action(action: str) -> Key:
    return next(k for k in KEYS if k.action == action)


def markdown_table() -> str:
    """The README's keys table."""
    lines = ["| keys | action |", "|---|---|"]
    for group in GROUPS:
        for k in KEYS:
            if k.group == group:
                lines.append(f"| {k.shown()} | {k.text} |")
    return "\n".join(lines)
