"""Export a trained checkpoint to a model bundle (torch ONNX exporter, TorchScript path).

Four graphs (see README.md): ``encoder.onnx`` (dynamic batch and views), ``bridge.onnx``
(memory + cross-attention keys/values, dynamic indication length), ``decoder.onnx`` (one
step or several with past keys/values, dynamic batch/sequence/past/memory) and
``view_classifier.onnx`` (dynamic batch).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .bundle import FORMAT_NAME, FORMAT_VERSION, write_manifest
from .data import VIEWS
from .torch_model import (
    FindingsClassifier,
    ModelConfig,
    ReportModel,
    ViewClassifier,
    load_checkpoint,
)

log = logging.getLogger(__name__)
OPSET = 17
OBSERVATIONS_13 = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
)


class _Encoder(nn.Module):
    def __init__(self, m: ReportModel):
        super().__init__()
        self.m = m

    def forward(self, images: Tensor, view_ids: Tensor, view_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.m.encode_images(images, view_ids, view_mask)


class _Bridge(nn.Module):
    def __init__(self, m: ReportModel):
        super().__init__()
        self.m = m

    def forward(self, image_tokens: Tensor, view_mask: Tensor, obs_states: Tensor,
                indication_ids: Tensor, indication_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.m.bridge(image_tokens, view_mask, obs_states, indication_ids, indication_mask)


class _Decoder(nn.Module):
    def __init__(self, m: ReportModel):
        super().__init__()
        self.m = m

    def forward(self, input_ids: Tensor, memory_mask: Tensor, cross_k: Tensor, cross_v: Tensor,
                past_k: Tensor, past_v: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.m.decode(input_ids, memory_mask, cross_k, cross_v, past_k, past_v, cond)


class _ViewClf(nn.Module):
    def __init__(self, m: ViewClassifier):
        super().__init__()
        self.m = m

    def forward(self, images: Tensor) -> Tensor:
        return self.m.probs(images)


class _Findings(nn.Module):
    def __init__(self, m: FindingsClassifier):
        super().__init__()
        self.m = m

    def forward(self, images: Tensor, view_ids: Tensor, view_mask: Tensor) -> Tensor:
        return self.m(images, view_ids, view_mask)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs,
            dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )


def graph_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The manifest's ``graphs`` section: file, inputs and outputs per role."""
    L, H, dh = cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads
    kv = f"float32 [{L}, batch, {H}, seq, {dh}]"
    return {
        "encoder": {
            "file": "encoder.onnx", "opset": OPSET,
            "inputs": {"images": "float32 [batch, views, 1, S, S] normalised",
                       "view_ids": "int64 [batch, views] index into input.views",
                       "view_mask": "float32 [batch, views] 1 = real view"},
            "outputs": {"image_tokens": f"float32 [batch, views, tokens, {cfg.d_model}]",
                        "obs_logits": f"float32 [batch, {cfg.n_observations}]"},
        },
        "bridge": {
            "file": "bridge.onnx", "opset": OPSET,
            "inputs": {"image_tokens": "encoder output", "view_mask": "as encoder",
                       "obs_states": f"int64 [batch, {cfg.n_observations}] 0/1",
                       "indication_ids": "int64 [batch, ind_len]",
                       "indication_mask": "float32 [batch, ind_len]"},
            "outputs": {"cross_k": f"{kv} (seq = memory)", "cross_v": f"{kv} (seq = memory)",
                        "memory_mask": "float32 [batch, memory]",
                        "cond": f"float32 [batch, {cfg.d_model}] diagnosis conditioning"},
        },
        "decoder": {
            "file": "decoder.onnx", "opset": OPSET,
            "inputs": {"input_ids": "int64 [batch, seq]", "memory_mask": "bridge output",
                       "cross_k": "bridge output", "cross_v": "bridge output",
                       "past_k": f"{kv} (seq = past, may be 0)", "past_v": "as past_k",
                       "cond": "bridge output (added to every input embedding)"},
            "outputs": {"logits": f"float32 [batch, seq, {cfg.vocab_size}]",
                        "present_k": f"{kv} (seq = past + seq)", "present_v": "as present_k"},
        },
        "view_classifier": {
            "file": "view_classifier.onnx", "opset": OPSET,
            "inputs": {"images": f"float32 [batch, 1, {cfg.view_image_size}, {cfg.view_image_size}] normalised"},
            "outputs": {"probs": "float32 [batch, 2] (FRONTAL, LATERAL)"},
        },
    }


def export_onnx(model: ReportModel, view_clf: ViewClassifier, out: Path) -> None:
    cfg = model.cfg
    model.eval()
    view_clf.eval()
    b, v, s = 2, 2, cfg.image_size
    images = torch.randn(b, v, 1, s, s)
    view_ids = torch.tensor([[0, 2], [1, 4]])
    view_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    steps = tqdm(total=4, desc="export", unit="graph")
    _export(_Encoder(model), (images, view_ids, view_mask), out / "encoder.onnx",
            ["images", "view_ids", "view_mask"], ["image_tokens", "obs_logits"],
            {"images": {0: "batch", 1: "views"}, "view_ids": {0: "batch", 1: "views"},
             "view_mask": {0: "batch", 1: "views"}, "image_tokens": {0: "batch", 1: "views"},
             "obs_logits": {0: "batch"}})
    steps.update()
    with torch.no_grad():
        tokens, _ = model.encode_images(images, view_ids, view_mask)
    states = torch.zeros(b, cfg.n_observations, dtype=torch.long)
    ind = torch.tensor([[7, 8, 9], [5, 0, 0]])
    ind_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    _export(_Bridge(model), (tokens, view_mask, states, ind, ind_mask), out / "bridge.onnx",
            ["image_tokens", "view_mask", "obs_states", "indication_ids", "indication_mask"],
            ["cross_k", "cross_v", "memory_mask", "cond"],
            {"image_tokens": {0: "batch", 1: "views"}, "view_mask": {0: "batch", 1: "views"},
             "obs_states": {0: "batch"}, "indication_ids": {0: "batch", 1: "ind_len"},
             "indication_mask": {0: "batch", 1: "ind_len"},
             "cross_k": {1: "batch", 3: "memory"}, "cross_v": {1: "batch", 3: "memory"},
             "memory_mask": {0: "batch", 1: "memory"}, "cond": {0: "batch"}})
    steps.update()
    with torch.no_grad():
        ck, cv, mm, cond = model.bridge(tokens, view_mask, states, ind, ind_mask)
        past_k = torch.randn(cfg.n_layers, b, cfg.n_heads, 3, cfg.d_model // cfg.n_heads)
        past_v = torch.randn_like(past_k)
    ids = torch.tensor([[1, 5], [1, 6]])
    kv_axes = {1: "batch", 3: "past"}
    _export(_Decoder(model), (ids, mm, ck, cv, past_k, past_v, cond), out / "decoder.onnx",
            ["input_ids", "memory_mask", "cross_k", "cross_v", "past_k", "past_v", "cond"],
            ["logits", "present_k", "present_v"],
            {"input_ids": {0: "batch", 1: "seq"}, "memory_mask": {0: "batch", 1: "memory"},
             "cross_k": {1: "batch", 3: "memory"}, "cross_v": {1: "batch", 3: "memory"},
             "past_k": kv_axes, "past_v": kv_axes, "cond": {0: "batch"}, "logits": {0: "batch", 1: "seq"},
             "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}})
    steps.update()
    vs = cfg.view_image_size
    _export(_ViewClf(view_clf), (torch.randn(2, 1, vs, vs),), out / "view_classifier.onnx",
            ["images"], ["probs"], {"images": {0: "batch"}, "probs": {0: "batch"}})
    steps.update()
    steps.close()


def findings_spec(image_size: int) -> dict[str, Any]:
    return {
        "file": "findings.onnx", "opset": OPSET,
        "inputs": {"images": f"float32 [batch, views, 1, {image_size}, {image_size}] normalised "
                             "(observations.classifier.normalisation)",
                   "view_ids": "int64 [batch, views] index into input.views",
                   "view_mask": "float32 [batch, views] 1 = real view"},
        "outputs": {"obs_logits": f"float32 [batch, {len(OBSERVATIONS_13)}]"},
    }


def export_findings(clf: FindingsClassifier, path: Path, image_size: int) -> None:
    clf.eval()
    s = image_size
    _export(_Findings(clf), (torch.randn(2, 2, 1, s, s), torch.tensor([[0, 2], [1, 4]]),
                             torch.tensor([[1.0, 1.0], [1.0, 0.0]])), path,
            ["images", "view_ids", "view_mask"], ["obs_logits"],
            {"images": {0: "batch", 1: "views"}, "view_ids": {0: "batch", 1: "views"},
             "view_mask": {0: "batch", 1: "views"}, "obs_logits": {0: "batch"}})


def add_findings(manifest: dict[str, Any], fck: dict[str, Any], combine: str = "replace") -> None:
    """Add the separate findings classifier to the manifest's observations: its probabilities
    replace the report model's head (``combine="replace"``; the prompt and grounding
    thresholds become the classifier's, chosen on the train split's tune hold-out) or are
    averaged with them (``"mean"``; the report checkpoint's thresholds stay)."""
    size = int(fck["config"]["image_size"])
    manifest["graphs"]["findings"] = findings_spec(size)
    manifest["observations"]["classifier"] = {
        "graph": "findings", "image_size": size, "combine": combine,
        "normalisation": {"mean": fck["mean"], "std": fck["std"]},
        "tune_auroc": {k: round(float(v), 4) for k, v in fck.get("tune_auroc", {}).items()},
    }
    if combine == "replace":
        thresholds = [float(t) for t in fck["thresholds"]]
        manifest["observations"]["thresholds"] = thresholds
        manifest["generation"]["grounding"]["thresholds"] = thresholds
    manifest.setdefault("training", {})["findings"] = {
        "command": fck.get("command", "cxrnode train-findings"), "epoch": fck.get("epoch"),
        "seed": fck["config"].get("seed"), "history": fck.get("history", []),
    }


def apply_options(manifest: dict[str, Any], prompt_scale: float = 1.0, grounding_threshold: float | None = None,
                  replace_negated: bool = False, drop_below: float | None = None, eos_penalty: float = 0.0) -> None:
    """Decoding choices recorded in the manifest (see ``cxrnode export --help``)."""
    manifest["generation"]["eos_penalty"] = float(eos_penalty)
    obs = manifest["observations"]
    obs["thresholds"] = [round(float(t) * prompt_scale, 4) for t in obs["thresholds"]]
    g = manifest["generation"]["grounding"]
    if grounding_threshold is not None:
        g["thresholds"] = [float(grounding_threshold)] * len(obs["names"])
    g["replace_negated"] = bool(replace_negated)
    g["drop_below"] = drop_below


#: "the lungs are clear": a normal statement about every lung-parenchyma observation
_LUNGS_CLEAR = r"\blungs? (?:are |is |appear |remain )?(?:now )?(?:clear|well aerated|well expanded and clear)"

#: The grounding step shipped in ``manifest["generation"]["grounding"]`` (see README.md and
#: ``runtime.Grounding``): per observation a generic sentence in the style of the IU X-ray
#: training reports and the patterns that count as an affirmed mention of it.
GROUNDING: dict[str, Any] = {
    "enabled": True,
    "section": "findings",
    "skip_if_negated": True,
    "thresholds": None,  # filled in by build_manifest: the head's F1-optimal thresholds
    "negation": r"\b(?:no|not|without|negative for|free of|clear of|resolved|resolution of|removed|"
                r"normal|unremarkable|within normal limits)\b",
    "clause_break": r"\b(?:but|however|although|except|with|there is|there are)\b|[:]",
    "observations": {
        "Enlarged Cardiomediastinum": {
            "normal": [r"(?:cardio)?mediastin\w* (?:silhouette |contours? |size )?(?:is |are |appears? |remains? )?"
                       r"(?:normal|unremarkable|within normal limits)", r"normal (?:cardio)?mediastin"],
            "sentence": "Enlarged cardiomediastinal silhouette.",
            "mentions": [r"(?:enlarged|widened|prominent) (?:cardio)?mediastin", r"mediastin\w* (?:widening|enlargement)",
                         r"(?:cardio)?mediastin\w* (?:silhouette |contours? )?(?:is |are |appears )?"
                         r"(?:mildly |stably |slightly )?(?:enlarged|widened|prominent)",
                         r"hilar (?:prominence|fullness|enlargement)|enlarged hil"]},
        "Cardiomegaly": {
            "normal": [r"\bheart (?:size )?(?:is |appears |remains )?(?:normal|within normal limits)",
                       r"normal (?:heart|cardiac) size",
                       r"cardiac (?:silhouette|contours?|size) (?:is |are |appears? )?(?:normal|within normal limits|unremarkable)",
                       r"heart and (?:mediastinum|lungs) (?:are |appear )?(?:normal|unremarkable)"],
            "sentence": "The heart is enlarged.",
            "mentions": [r"cardiomegaly", r"(?:enlarged|large) (?:heart|cardiac)",
                         r"(?:heart|cardiac silhouette|cardiac size)(?: size)? (?:is |are |appears |remains )?"
                         r"(?:again )?(?:mildly |moderately |markedly |slightly )?(?:enlarged|large)"]},
        "Lung Lesion": {
            "sentence": "Pulmonary nodule.",
            "mentions": [r"nodul", r"\bmass", r"\blesion", r"\btumou?r", r"neoplas", r"metasta", r"\bcavit"]},
        "Lung Opacity": {
            "normal": [_LUNGS_CLEAR],
            "sentence": "There is patchy airspace opacity.",
            "mentions": [r"opaci", r"infiltrat", r"air ?-?space disease", r"interstitial (?:marking|opaci|prominence)",
                         r"reticula", r"\bscar", r"fibros|fibrotic", r"\bdensit"]},
        "Edema": {
            "normal": [_LUNGS_CLEAR],
            "sentence": "There is pulmonary edema.",
            "mentions": [r"edema", r"vascular congestion", r"heart failure", r"cephalization",
                         r"vascular (?:prominence|engorgement)"]},
        "Consolidation": {
            "normal": [_LUNGS_CLEAR],
            "sentence": "There is focal airspace consolidation.",
            "mentions": [r"consolidat"]},
        "Pneumonia": {
            "normal": [_LUNGS_CLEAR],
            "sentence": "Findings may represent pneumonia.",
            "mentions": [r"pneumoni", r"infecti"]},
        "Atelectasis": {
            "normal": [_LUNGS_CLEAR],
            "sentence": "There is basilar atelectasis.",
            "mentions": [r"atelecta", r"collapse"]},
        "Pneumothorax": {
            "sentence": "Small pneumothorax.",
            "mentions": [r"pneumothora"]},
        "Pleural Effusion": {
            "normal": [r"(?:pleural spaces?|costophrenic (?:angles?|sulci|recesses)) (?:are |is )?(?:clear|sharp|normal)"],
            "sentence": "There is a small pleural effusion.",
            "mentions": [r"(?<!pericardial )effusion", r"pleural fluid",
                         r"blunt\w* (?:of )?(?:the )?(?:\w+ )?costophrenic", r"costophrenic (?:angles? |sulcus )?blunt"]},
        "Pleural Other": {
            "sentence": "Pleural thickening.",
            "mentions": [r"pleural (?:thickening|plaque|calcification|scarring)", r"apical (?:pleural )?(?:cap|thickening)"]},
        "Fracture": {
            "normal": [r"(?:osseous|bony|skeletal) structures? (?:are |is |appears? )?(?:grossly )?"
                       r"(?:intact|unremarkable|normal)"],
            "sentence": "Rib fracture.",
            "mentions": [r"fractur"]},
        "Support Devices": {
            "sentence": "Surgical clips are present.",
            "mentions": [r"pacemaker|\bpacer\b|defibrillator|\bicd\b", r"catheter|\bpicc\b|\bport\b", r"\btube\b",
                         r"sternotomy|\bwires?\b|\bclips?\b|\bstents?\b|prosthe|hardware|\bdrains?\b|\bleads?\b|cabg"]},
    },
}


def build_manifest(cfg: ModelConfig, ckpt: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    thresholds = [float(t) for t in ckpt.get("thresholds", [0.5] * cfg.n_observations)]
    grounding = dict(GROUNDING)
    grounding["thresholds"] = [float(t) for t in ckpt.get("head_thresholds", thresholds)]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "task": "chest-xray-report-generation",
        "architecture": "encoder-decoder",
        "description": "Multi-view + indication CXR report drafter (research use only, not a medical device)",
        "graphs": graph_specs(cfg),
        "tokenizer": {"file": "tokenizer.json", "type": "huggingface-tokenizers", "level": "word",
                      "bos": "[BOS]", "eos": "[EOS]", "pad": "[PAD]", "unk": "[UNK]",
                      "section_separator": "[SEP]", "empty_indication": "[NONE]"},
        "input": {
            "image_size": cfg.image_size,
            "channels": 1,
            "photometric": "MONOCHROME2",
            "value_range": [0.0, 1.0],
            "resize": "antialiased bilinear to image_size x image_size (onnx_models.imaging.resize)",
            "normalisation": {"mean": ckpt.get("pixel_mean", 0.5), "std": ckpt.get("pixel_std", 0.25)},
            "views": list(VIEWS),
            "max_views": cfg.max_views,
            "max_indication_tokens": cfg.max_indication_tokens,
            "max_report_tokens": cfg.max_report_tokens,
        },
        "observations": {"names": list(OBSERVATIONS_13), "thresholds": thresholds,
                         "labeller": "onnx_models.labels (U-ones)"},
        "view_classifier": {"graph": "view_classifier", "image_size": cfg.view_image_size,
                            "labels": ["FRONTAL", "LATERAL"]},
        "decoder": {"layers": cfg.n_layers, "heads": cfg.n_heads,
                    "head_dim": cfg.d_model // cfg.n_heads,
                    "kv_layout": "stacked [layers, batch, heads, seq, head_dim]",
                    "max_positions": cfg.max_report_tokens + 2},
        "generation": {"beam_size": 3, "max_tokens": cfg.max_report_tokens,
                       "no_repeat_ngram_size": 0, "length_penalty": 1.0, "grounding": grounding},
        "training": ckpt.get("training", {}),
        "files": {},
    }


def export_bundle(checkpoint: str | Path, out: str | Path, name: str = "default",
                  version: str = "0.1.0", model_card: str | None = None,
                  findings: str | Path | None = None, combine: str = "replace", prompt_scale: float = 1.0,
                  grounding_threshold: float | None = None, replace_negated: bool = False,
                  drop_below: float | None = None, eos_penalty: float = 0.0) -> Path:
    """Checkpoint (from ``train``) -> bundle folder (replaced if it exists). ``findings``: a
    checkpoint from ``train-findings`` whose classifier then drives the observations (see
    :func:`add_findings`); the other options: :func:`apply_options`."""
    ckpt, model, view_clf = load_checkpoint(checkpoint)
    cfg = model.cfg
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_onnx(model, view_clf, tmp)
    (tmp / "tokenizer.json").write_text(ckpt["tokenizer"], encoding="utf-8")
    card = model_card if model_card is not None else default_model_card(ckpt, name, version)
    (tmp / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    manifest = build_manifest(cfg, ckpt, name, version)
    if findings:
        fck = torch.load(findings, map_location="cpu", weights_only=False)
        clf = FindingsClassifier()
        clf.load_state_dict(fck["model"])
        export_findings(clf, tmp / "findings.onnx", int(fck["config"]["image_size"]))
        add_findings(manifest, fck, combine)
    apply_options(manifest, prompt_scale, grounding_threshold, replace_negated, drop_below, eos_penalty)
    write_manifest(tmp, manifest)
    if out.exists():
        # keep a hand-edited model card if the caller did not pass one
        if model_card is None and (out / "MODEL_CARD.md").exists():
            shutil.copy(out / "MODEL_CARD.md", tmp / "MODEL_CARD.md")
            man = json.loads((tmp / "manifest.json").read_text())
            write_manifest(tmp, man)
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("bundle written to %s", out)
    return out


def default_model_card(ckpt: dict[str, Any], name: str, version: str) -> str:
    tr = ckpt.get("training", {})
    return (
        f"# Model card: {name} {version}\n\n"
        "Research use only. Not a medical device. Drafts must be reviewed and signed by a radiologist.\n\n"
        f"Training: `{tr.get('command', 'cxrnode train')}` (epoch {tr.get('epoch', '?')}, "
        f"seed {tr.get('seed', '?')}).\n"
    )
