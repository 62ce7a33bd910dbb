"""Which instances of a study are chest radiographs to read, and which view each one is.

Pure functions over frozen dataclasses; no I/O. Two steps:

1. :func:`select_images` keeps CR, DX (For Presentation) and Secondary Capture images whose
   Modality and Body Part Examined say chest radiograph, and explains why every other
   instance was skipped (SR documents, presentation states, key object selections, dose
   reports, other body parts...). SOP classes as in PS3.4 Annex B.5.
2. :func:`view_from_tags` reads the view from ViewPosition (0018,5101), ViewCodeSequence
   (0054,0220, CID 4010 "DX View") and PatientOrientation (0020,0020, PS3.3 C.7.6.1.1.1);
   :func:`resolve_view` then lets the bundle's view classifier decide when the tags are
   missing or disagree with it (real archives often tag laterals "PA"), and says why. The rule
   itself is :func:`onnx_models.views.resolve`, the one ``cxrnode eval`` and ``doctor`` use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# the view vocabulary (VIEWS, VIEW_POSITIONS) and the resolution rule live in onnx_models.views
from onnx_models.views import projection, resolve, view_from_position

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
SC_MULTIFRAME_GRAY_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
SC_MULTIFRAME_GRAY_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
SC_MULTIFRAME_TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"

IMAGE_SOP_CLASSES = {
    CR_IMAGE: "CR Image",
    DX_PRESENTATION: "Digital X-Ray Image (For Presentation)",
    SC_IMAGE: "Secondary Capture Image",
    SC_MULTIFRAME_GRAY_BYTE: "Multi-frame Grayscale Byte Secondary Capture Image",
    SC_MULTIFRAME_GRAY_WORD: "Multi-frame Grayscale Word Secondary Capture Image",
    SC_MULTIFRAME_TRUE_COLOR: "Multi-frame True Color Secondary Capture Image",
}
SC_CLASSES = frozenset({SC_IMAGE, SC_MULTIFRAME_GRAY_BYTE, SC_MULTIFRAME_GRAY_WORD, SC_MULTIFRAME_TRUE_COLOR})

# Well-known non-image objects, named in the skip reason (PS3.4 Table B.5-1).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR (dose report)",
    "1.2.840.10008.5.1.4.1.1.88.68": "Radiopharmaceutical Radiation Dose SR (dose report)",
    "1.2.840.10008.5.1.4.1.1.88.73": "Patient Radiation Dose SR (dose report)",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    DX_PROCESSING: "Digital X-Ray Image For Processing (raw detector data, not for reading)",
}
NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State",
    "1.2.840.10008.5.1.4.1.1.104.": "Encapsulated document",
}
NON_IMAGE_MODALITIES = {"SR": "Structured Report", "PR": "Presentation State", "KO": "Key Object Selection",
                        "DOC": "Document", "RWV": "Real World Value Map", "REG": "Registration"}
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LAT", "CHEST_PA", "PORT CHEST", "TORAX", "THORAX_LAT"})

# CID 4010 "DX View" codes (SNOMED CT) -> our view names.
VIEW_CODES = {
    "399348003": "AP",  # antero-posterior
    "272479007": "PA",  # postero-anterior
    "399173006": "LL",  # left lateral (right-left lateral)
    "399198007": "LATERAL",  # right lateral (left-right lateral)
    "399067008": "LATERAL",  # lateral
    "49370004": "LATERAL",  # lateral
}


@dataclass(frozen=True)
class InstanceHeader:
    """What view selection needs from one instance's header (no pixel data).

    Attributes
    ----------
    sop_instance_uid, sop_class_uid, series_instance_uid, instance_number:
        Identity and order.
    modality, body_part_examined:
        Whether it is a chest radiograph.
    view_position, view_codes, patient_orientation:
        What the header says the view is (``view_codes``: (CodeValue, CodeMeaning) of
        ViewCodeSequence).
    image_type, samples_per_pixel, has_pixel_data:
        Whether it is an image the model can read.
    generated:
        An SR this node wrote.
    """

    sop_instance_uid: str
    sop_class_uid: str
    modality: str = ""
    body_part_examined: str = ""
    view_position: str = ""
    view_codes: tuple[tuple[str, str], ...] = ()  # (CodeValue, CodeMeaning) of ViewCodeSequence
    patient_orientation: tuple[str, ...] = ()
    image_type: tuple[str, ...] = ()
    samples_per_pixel: int = 1
    has_pixel_data: bool = True
    generated: bool = False  # an SR this node wrote
    series_instance_uid: str = ""
    instance_number: int = 0

    @classmethod
    def from_dataset(cls, ds: Any, generated: bool = False) -> InstanceHeader:
        """Read the header fields from a pydicom Dataset (pixel data need not be loaded)."""
        codes: list[tuple[str, str]] = []
        for item in ds.get("ViewCodeSequence", None) or ():
            codes.append((str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or ""),
                          str(item.get("CodeMeaning", "") or "")))
        orientation = ds.get("PatientOrientation", None)
        if orientation is None or orientation == "":
            orient: tuple[str, ...] = ()
        elif isinstance(orientation, str):
            orient = tuple(orientation.split("\\"))
        else:
            orient = tuple(str(v) for v in orientation)
        image_type = ds.get("ImageType", None)
        if image_type is None or image_type == "":
            itype: tuple[str, ...] = ()
        elif isinstance(image_type, str):
            itype = (image_type,)
        else:
            itype = tuple(str(v) for v in image_type)
        try:
            number = int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        return cls(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            modality=str(ds.get("Modality", "") or "").upper(),
            body_part_examined=str(ds.get("BodyPartExamined", "") or "").upper().strip(),
            view_position=str(ds.get("ViewPosition", "") or "").upper().strip(),
            view_codes=tuple(codes),
            patient_orientation=tuple(o.upper().strip() for o in orient),
            image_type=tuple(t.upper().strip() for t in itype),
            samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
            has_pixel_data="PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds,
            generated=generated,
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            instance_number=number,
        )


@dataclass(frozen=True)
class Skipped:
    sop_instance_uid: str
    reason: str


@dataclass(frozen=True)
class Selection:
    """The chest radiographs to read (in a stable order) and what was skipped, with reasons.

    Attributes
    ----------
    images:
        The headers of the images to read.
    skipped:
        The others, each with its reason.
    """

    images: tuple[InstanceHeader, ...]
    skipped: tuple[Skipped, ...]

    def log_lines(self) -> list[str]:
        lines = [f"selected {len(self.images)} image(s): "
                 + (", ".join(i.sop_instance_uid for i in self.images) or "none")]
        lines += [f"skipped {s.sop_instance_uid}: {s.reason}" for s in self.skipped]
        return lines


def skip_reason(h: InstanceHeader) -> str:
    """Why this instance is not a chest radiograph to read; "" when it is one."""
    if h.generated:
        return "an SR written by this node"
    if h.sop_class_uid in NON_IMAGE_SOP_CLASSES:
        return f"not an image: {NON_IMAGE_SOP_CLASSES[h.sop_class_uid]}"
    for prefix, what in NON_IMAGE_PREFIXES.items():
        if h.sop_class_uid.startswith(prefix):
            return f"not an image: {what} ({h.sop_class_uid})"
    if h.modality in NON_IMAGE_MODALITIES:
        return f"not an image: Modality {h.modality} ({NON_IMAGE_MODALITIES[h.modality]})"
    if h.sop_class_uid not in IMAGE_SOP_CLASSES:
        return f"SOP class {h.sop_class_uid or '(none)'} is not a CR, DX or Secondary Capture image"
    if not h.has_pixel_data:
        return "no Pixel Data"
    if h.sop_class_uid in SC_CLASSES:
        if h.modality not in RADIOGRAPH_MODALITIES:
            return f"Secondary Capture with Modality {h.modality or '(none)'}, not a radiograph (CR or DX)"
    elif h.modality and h.modality not in RADIOGRAPH_MODALITIES:
        return f"Modality {h.modality} is not a radiograph (CR or DX)"
    if h.body_part_examined and not _is_chest(h.body_part_examined):
        return f"BodyPartExamined {h.body_part_examined} is not the chest"
    if "LOCALIZER" in h.image_type:
        return "a localizer image"
    return ""


def _is_chest(body_part: str) -> bool:
    return body_part in CHEST_BODY_PARTS or "CHEST" in body_part or "THORAX" in body_part


def select_images(headers: Iterable[InstanceHeader]) -> Selection:
    """Keep the chest radiographs; say why the others are skipped (duplicates, SRs this node
    wrote, non-images, modalities other than CR/DX, other body parts, localizers).

    Parameters
    ----------
    headers:
        The study's instance headers.

    Returns
    -------
    Selection
        The images (ordered by series, instance number, UID) and the skipped, with reasons.
    """
    chosen: list[InstanceHeader] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for h in headers:
        if h.sop_instance_uid in seen:
            skipped.append(Skipped(h.sop_instance_uid, "duplicate SOP Instance UID"))
            continue
        seen.add(h.sop_instance_uid)
        reason = skip_reason(h)
        if reason:
            skipped.append(Skipped(h.sop_instance_uid, reason))
        else:
            chosen.append(h)
    chosen.sort(key=lambda h: (h.series_instance_uid, h.instance_number, h.sop_instance_uid))
    return Selection(images=tuple(chosen), skipped=tuple(skipped))


@dataclass(frozen=True)
class TagView:
    """The view the header claims, and from which attribute.

    Attributes
    ----------
    view:
        One of :data:`onnx_models.views.VIEWS`.
    source:
        ``"ViewPosition"``, ``"ViewCodeSequence"``, ``"PatientOrientation"`` or ``""`` (nothing says).
    conflict:
        How the attributes disagree with each other (``""``: they do not).
    """

    view: str  # one of onnx_models.views.VIEWS
    source: str  # "ViewPosition", "ViewCodeSequence", "PatientOrientation" or ""
    conflict: str = ""  # the attributes disagree with each other


def _view_from_code(codes: Sequence[tuple[str, str]]) -> str:
    for value, meaning in codes:
        if value in VIEW_CODES:
            return VIEW_CODES[value]
        m = meaning.lower()
        if "decubitus" in m or "oblique" in m:
            continue
        if "postero-anterior" in m or "posteroanterior" in m or m == "pa":
            return "PA"
        if "antero-posterior" in m or "anteroposterior" in m or m == "ap":
            return "AP"
        if "right-left lateral" in m or m.startswith("left lateral"):
            return "LL"
        if "lateral" in m:
            return "LATERAL"
    return ""


def _view_from_orientation(orientation: Sequence[str]) -> str:
    """PS3.3 C.7.6.1.1.1: the row direction of a lateral points anterior or posterior.

    A frontal projection's row direction is left or right; whether it is PA or AP cannot be told
    from the orientation alone, so frontals come back as "FRONTAL" (resolved later).
    """
    if len(orientation) != 2 or not orientation[0]:
        return ""
    row = orientation[0][0]
    if row in ("A", "P"):
        return "LATERAL"
    if row in ("L", "R"):
        return "FRONTAL"
    return ""


def view_from_tags(h: InstanceHeader) -> TagView:
    """The view the header states: ViewPosition, then ViewCodeSequence, then PatientOrientation.

    Parameters
    ----------
    h:
        One instance's header.

    Returns
    -------
    TagView
        The view, the attribute it came from and any disagreement between attributes.
    """
    candidates: list[tuple[str, str]] = []
    vp = view_from_position(h.view_position)
    if vp:
        candidates.append((vp, "ViewPosition"))
    vc = _view_from_code(h.view_codes)
    if vc:
        candidates.append((vc, "ViewCodeSequence"))
    po = _view_from_orientation(h.patient_orientation)
    if po:
        candidates.append((po, "PatientOrientation"))
    if not candidates:
        return TagView("UNKNOWN", "")
    view, source = candidates[0]
    conflicts = [f"{s} says {v}" for v, s in candidates[1:] if projection(v) != projection(view)]
    if view == "FRONTAL":  # only the orientation spoke: frontal, PA or AP unknown
        view = "UNKNOWN"
        source = "PatientOrientation (frontal)"
    conflict = f"{source} says {candidates[0][0]} but " + ", ".join(conflicts) if conflicts else ""
    return TagView(view, source, conflict)


@dataclass(frozen=True)
class ResolvedView:
    """The view of one image the generator is told, and how it was decided (:func:`resolve_view`).

    Attributes
    ----------
    sop_instance_uid:
        The image.
    view:
        One of :data:`onnx_models.views.VIEWS`: what the generator is told.
    source:
        ``"tags"`` (the classifier agrees) or ``"classifier"`` (tags missing or overruled).
    tag_view, tag_source:
        What the header said, and where.
    classifier_label, classifier_probability:
        The view classifier's FRONTAL/LATERAL and its probability.
    note:
        One line for the job log: what the tags said and what the classifier said.
    """
    sop_instance_uid: str
    view: str  # one of onnx_models.views.VIEWS: what the generator is told
    source: str  # "tags" (classifier agrees), "classifier" (tags missing or overruled)
    tag_view: str
    tag_source: str
    classifier_label: str  # FRONTAL or LATERAL
    classifier_probability: float
    note: str

    def as_json(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "view": self.view,
            "source": self.source,
            "tag_view": self.tag_view,
            "tag_source": self.tag_source,
            "classifier": self.classifier_label,
            "probability": round(self.classifier_probability, 4),
        }


def resolve_view(sop_instance_uid: str, tags: TagView, classifier: tuple[str, float]) -> ResolvedView:
    """Decide the view of one image: the classifier decides when tags are missing or disagree.
    When the tags agree with it, the tags' more specific view (PA/AP/LL) is kept. A classifier
    FRONTAL with no frontal tag becomes PA (the usual erect chest view).

    Parameters
    ----------
    sop_instance_uid:
        The image.
    tags:
        What its header states (:func:`view_from_tags`).
    classifier:
        ``(label, probability)`` from ``ReportGenerator.classify_views``, label FRONTAL or
        LATERAL.

    Returns
    -------
    ResolvedView
        The view the generator is told and how it was decided.
    """
    d = resolve(tags.view, classifier, tags.source, tags.conflict)
    return ResolvedView(
        sop_instance_uid=sop_instance_uid,
        view=d.view,
        source=d.source,
        tag_view=tags.view,
        tag_source=tags.source,
        classifier_label=str(classifier[0]).upper(),
        classifier_probability=float(classifier[1]),
        note=d.note,
    )
