"""The run-time report generator: a model bundle executed by ONNX Runtime (no torch).

>>> gen = ReportGenerator("default", threads=2)
>>> [report] = gen.generate([StudyInput(views=[(pa, "PA"), (lat, "LATERAL")], indication="cough")])
>>> report.findings, report.impression, report.observations

Both bundle architectures run (see README.md): ``encoder-decoder`` (encoder -> bridge ->
cross-attending decoder) and ``decoder-only`` (LLaVA-style: the encoder's image embeddings
and the embedded indication are a prefix to a causal language model). ``_encode`` turns the
studies into a decoding state (:class:`_CrossState` or :class:`_PrefixState`) and ``_step``
runs one decoder call for either, so greedy and beam search are shared.

Decoding: greedy (``beam_size=1``) or beam search (default from the bundle, 3), both batched
over studies, with a no-repeat n-gram block, a maximum length, at most one section separator
and per-token probabilities. Execution providers: the caller's list, or CUDA when
onnxruntime sees a usable GPU, else CPU; the choice is logged once per process.

On a GPU the decoder runs with ONNX Runtime I/O binding: its self-attention cache
(``present_k``, ``present_v``) stays in device memory where ``CUDAExecutionProvider`` computed
it (see :func:`binding_device`) and is bound as the next step's ``past_k``/``past_v`` without a
round trip through host memory; only the logits are copied to the host, and the constant
cross-attention state is uploaded once per decode. Beam search reorders the cache on the host
(one copy per step). On CPU the plain ``run`` calls are kept: there the cache is in host memory
anyway and binding only adds per-step Python overhead (benchmarks/inference.py
``--compare-io-binding``: greedy 10 % slower with binding on the shipped bundle).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .bundle import Bundle, BundleError, load_bundle
from .consistency import make_consistent, split_sentences
from .imaging import prepare
from .input_gate import STATS_FILE, GateStatistics, InputGate, ViewCheck
from .tokenizer import detokenize

log = logging.getLogger(__name__)
_LOGGED: set[str] = set()

__all__ = ["ReportGenerator", "StudyInput", "GeneratedReport", "Grounding", "ViewCheck", "binding_device",
           "choose_providers"]


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.log(level, message)


@dataclass(frozen=True)
class StudyInput:
    """All views of one study, as the generator reads them.

    Attributes
    ----------
    views:
        ``(image, view)`` pairs: each image a 2-D float32 array in [0, 1], MONOCHROME2 (air
        dark), any size (the runtime resizes and normalises); view one of ``PA``, ``AP``,
        ``LATERAL``, ``LL``, ``UNKNOWN``.
    indication:
        The clinical indication as trained (:attr:`plugin.drafting.indication.Indication.model_text`).
    """

    views: list[tuple[np.ndarray, str]]
    indication: str = ""


@dataclass
class GeneratedReport:
    """One drafted report.

    Attributes
    ----------
    findings, impression:
        The report's two sections.
    tokens:
        Word pieces with their probabilities (empty when the draft was withheld).
    observations:
        Observation probabilities (the head's, or its mean with the bundle's findings classifier).
    duration_ms:
        Time spent on this study.
    grounded:
        Sentences the grounding step added, with the probability behind each.
    """
    findings: str
    impression: str
    tokens: list[tuple[str, float]] = field(default_factory=list)
    observations: dict[str, float] = field(default_factory=dict)
    duration_ms: float = 0.0
    #: sentences the grounding step added, with the observation probability behind each (the
    #: reviewer marks them: they come from the observation classifier, not from the decoder)
    grounded: list[tuple[str, float]] = field(default_factory=list)


def _gpu_present() -> bool:
    """True when an NVIDIA GPU device node exists (cheap; avoids CUDA init error spam)."""
    return os.path.exists("/dev/nvidia0") or os.path.isdir("/proc/driver/nvidia/gpus") and bool(
        os.listdir("/proc/driver/nvidia/gpus")
    )


def choose_providers(requested: Sequence[str] = ()) -> list[str]:
    """Execution providers to use: ``requested`` (filtered to those available, CPU always
    last), or CUDA when available and a GPU is present, else CPU."""
    available = ort.get_available_providers()
    if requested:
        chosen = [p for p in requested if p in available]
        missing = [p for p in requested if p not in available]
        if missing:
            _log_once(logging.WARNING, f"execution providers not available, ignored: {missing}")
    else:
        chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available and _gpu_present() else []
    if "CUDAExecutionProvider" in chosen:
        _preload_cuda_libraries()
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _preload_cuda_libraries() -> None:
    """Load the CUDA/cuDNN libraries the GPU bundle ships as pip wheels (onnxruntime-gpu's
    ``cuda``/``cudnn`` extras) before a CUDA session is made; without them ONNX Runtime looks only
    in the system's library path. Once per process; a failure is logged and the session falls
    back as ONNX Runtime decides (the providers in use are logged and checked by ``doctor``)."""
    if "preload" in _LOGGED or not hasattr(ort, "preload_dlls"):
        return
    _LOGGED.add("preload")
    try:
        ort.preload_dlls()
    except Exception as exc:  # missing wheels (a system CUDA install) is fine; say what happened
        log.info("onnxruntime.preload_dlls: %s (using the system's CUDA libraries, if any)", exc)


def binding_device(providers: Sequence[str]) -> str:
    """The ONNX Runtime device the decoder's KV cache is bound to between steps: ``cuda`` when
    the session's first provider is ``CUDAExecutionProvider``, else ``cpu``."""
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"


#: a KV cache between decoding steps: a host array, or an OrtValue where the decoder left it
_KV: TypeAlias = np.ndarray | ort.OrtValue

_WORDS = re.compile(r"\w+|[^\w\s]")
_SENTENCE_END = re.compile(r"[.;!?]+")
_SENTENCE_ENDS = (".", ";", "!", "?")


@dataclass(frozen=True)
class Grounding:
    """The bundle's grounding step (``manifest["generation"]["grounding"]``, see README.md).

    For every observation the head predicts positive (probability >= ``thresholds``, the
    grounding's own per-observation thresholds, else the bundle's prompt thresholds)
    whose ``mentions`` patterns find no affirmed mention in the generated text (findings and
    impression), the observation's templated ``sentence`` is appended to the ``section``
    (findings). A mention is negated when the ``negation`` pattern occurs before it in the same
    sentence and after the last ``clause_break``. Mentions that are explicitly negated count
    as "the decoder decided": with ``skip_if_negated`` nothing is added for them, so a draft
    never says "No pleural effusion. Small pleural effusion.". With ``replace_negated`` the
    classifier wins instead: the sentences (findings and impression) that negate a
    head-positive observation are dropped and its templated sentence is added; with
    ``drop_below`` the sentences that affirm an observation whose head probability is below it
    are dropped too (the text may not claim what the classifier rules out). Otherwise the
    impression is never edited. Its patterns come from the bundle; the consistency step that
    follows (:mod:`onnx_models.consistency`) reads the result with ``onnx_models.labels``.
    """

    enabled: bool
    section: str
    skip_if_negated: bool
    negation: re.Pattern[str]
    clause_break: re.Pattern[str]
    sentences: dict[str, str]
    mentions: dict[str, list[re.Pattern[str]]]
    thresholds: list[float] | None = None
    replace_negated: bool = False
    drop_below: float | None = None
    #: per observation, phrasings that state it is absent without a negation word ("heart size
    #: is normal", "the lungs are clear"): they count as negated mentions
    normal: dict[str, list[re.Pattern[str]]] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, generation: dict[str, Any]) -> Grounding | None:
        g = generation.get("grounding")
        if not g:
            return None
        return cls(
            enabled=bool(g.get("enabled", False)),
            section=str(g.get("section", "findings")),
            skip_if_negated=bool(g.get("skip_if_negated", True)),
            negation=re.compile(g["negation"]),
            clause_break=re.compile(g.get("clause_break", r"[;:]")),
            sentences={o: str(v["sentence"]) for o, v in g["observations"].items()},
            mentions={o: [re.compile(p) for p in v["mentions"]] for o, v in g["observations"].items()},
            normal={o: [re.compile(p) for p in v.get("normal", [])] for o, v in g["observations"].items()},
            thresholds=[float(t) for t in g["thresholds"]] if g.get("thresholds") else None,
            replace_negated=bool(g.get("replace_negated", False)),
            drop_below=float(g["drop_below"]) if g.get("drop_below") is not None else None,
        )

    def contradicted(self, text: str, probs: dict[str, float], thresholds: dict[str, float]) -> set[str]:
        """Head-positive observations that ``text`` negates (and never affirms)."""
        return {o for o, p in probs.items()
                if o in self.sentences and p >= thresholds[o] and self.mention(o, text) == "negated"}

    def unsupported(self, probs: dict[str, float]) -> set[str]:
        """Observations the text may not affirm (head probability below ``drop_below``)."""
        if self.drop_below is None:
            return set()
        return {o for o, p in probs.items() if o in self.sentences and p < self.drop_below}

    def drop_sentences(self, tokens: list[tuple[str, float]], negated: set[str],
                       affirmed: set[str]) -> list[tuple[str, float]]:
        """``tokens`` without the sentences that negate one of ``negated`` or affirm one of
        ``affirmed``."""
        out: list[tuple[str, float]] = []
        for sentence in _sentences(tokens):
            text = detokenize([w for w, _ in sentence])
            if not (any(self.mention(o, text) == "negated" for o in negated)
                    or any(self.mention(o, text) == "positive" for o in affirmed)):
                out += sentence
        return out

    def mention(self, observation: str, text: str) -> str | None:
        """``"positive"``, ``"negated"`` or ``None`` (not mentioned) for ``observation`` in
        ``text``; an affirmed mention anywhere wins."""
        state = None
        for sent in _SENTENCE_END.split(text.lower()):
            for pat in self.mentions.get(observation, []):
                for m in pat.finditer(sent):
                    before = sent[: m.start()]
                    breaks = list(self.clause_break.finditer(before))
                    scope = before[breaks[-1].end() :] if breaks else before
                    if self.negation.search(scope):
                        state = "negated"
                    else:
                        return "positive"
            if any(pat.search(sent) for pat in self.normal.get(observation, [])):
                state = "negated"
        return state

    def additions(self, text: str, probs: dict[str, float],
                  thresholds: dict[str, float]) -> list[tuple[str, str, float]]:
        """(observation, sentence, head probability) to append, in head order."""
        out = []
        for obs, p in probs.items():
            if obs not in self.sentences or p < thresholds[obs]:
                continue
            state = self.mention(obs, text)
            if state == "positive" or (state == "negated" and self.skip_if_negated):
                continue
            out.append((obs, self.sentences[obs], p))
        return out


@dataclass(frozen=True)
class _CrossState:
    """Decoding state of an ``encoder-decoder`` bundle: the bridge outputs (one row per
    decoded sequence), constant during decoding."""

    cross_k: np.ndarray
    cross_v: np.ndarray
    memory_mask: np.ndarray
    cond: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.memory_mask.shape[0])

    def expand(self, rep: np.ndarray) -> _CrossState:
        return _CrossState(self.cross_k[:, rep], self.cross_v[:, rep], self.memory_mask[rep], self.cond[rep])

    def reorder(self, rows: np.ndarray) -> _CrossState:
        return self  # beams only move within a study, whose rows are identical


@dataclass(frozen=True)
class _PrefixState:
    """Decoding state of a ``decoder-only`` bundle: ``prefix`` (``[image_embeds ;
    embed(left-padded indication)]``, fed before the first token, then ``None``) and
    ``mask``, the attention mask over everything fed so far (including a pending prefix)."""

    prefix: np.ndarray | None
    mask: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def expand(self, rep: np.ndarray) -> _PrefixState:
        return _PrefixState(None if self.prefix is None else self.prefix[rep], self.mask[rep])

    def reorder(self, rows: np.ndarray) -> _PrefixState:
        return _PrefixState(None if self.prefix is None else self.prefix[rows], self.mask[rows])


_State = _CrossState | _PrefixState


class ReportGenerator:
    """Loads a bundle once; ``generate`` drafts reports for a batch of studies
    (``encoder-decoder`` or ``decoder-only`` bundles).

    Parameters
    ----------
    bundle:
        A bundle name, folder or opened :class:`~onnx_models.bundle.Bundle`.
    providers:
        ONNX Runtime execution providers to use, filtered to those available (CPU always
        last); empty: CUDA when available and a GPU is present, else CPU.
    threads:
        Intra-op threads (0: ONNX Runtime's default).
    beam_size:
        Default beam width of :meth:`generate`.

    Raises
    ------
    BundleError
        The bundle cannot be loaded, or this runtime cannot run it (architecture, graphs,
        tokenizer, observation classifier or input gate statistics).
    """

    def __init__(
        self,
        bundle: str | Path | Bundle = "default",
        providers: Sequence[str] = (),
        threads: int = 0,
        beam_size: int = 3,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if self.bundle.architecture not in ("encoder-decoder", "decoder-only"):
            raise BundleError(f"{self.bundle.path}: this runtime cannot execute architecture "
                              f"{self.bundle.architecture!r}")
        self._prefix_lm = self.bundle.architecture == "decoder-only"
        m = self.bundle.manifest
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        wanted = choose_providers(providers)
        self._sessions: dict[str, ort.InferenceSession] = {}
        for role in m["graphs"]:
            self._sessions[role] = ort.InferenceSession(
                str(self.bundle.graph(role)), sess_options=opts, providers=wanted
            )
        self.providers: list[str] = list(self._sessions["decoder"].get_providers())
        #: where the KV cache lives between decoding steps (I/O binding, ``_run_decoder``)
        self.kv_device = binding_device(self.providers)
        self.io_binding = self.kv_device != "cpu"
        self._uploaded = {}
        #: the input names each graph declares: a graph that does not use an input (an imported
        #: model's bridge ignores the indication, its decoder has no ``cond``) is not fed it
        self._graph_inputs = {role: {i.name for i in s.get_inputs()} for role, s in self._sessions.items()}
        #: (layers, heads, head_dim) of the self-attention cache (decoder-only bundles)
        self._kv_dims = (0, 0, 0)
        if self._prefix_lm:
            self._check_decoder_only()
        _log_once(logging.INFO, f"model {self.name} {self.version}: ONNX Runtime providers {self.providers}")
        self.tokenizer = Tokenizer.from_file(str(self.bundle.file(m["tokenizer"]["file"])))
        t = m["tokenizer"]
        #: -1: no start token (an imported chat model's prompt ends where the answer starts)
        self._bos = self._tok_id(t["bos"]) if t.get("bos") else -1
        self._eos = self._tok_id(t["eos"])
        self._pad = self._tok_id(t["pad"])
        # imported models (``cxrnode import-hf``) may have no section separator (one section,
        # ``generation.section``) and no empty-indication token (the pad token stands for it);
        # a start token that is also the end token (GPT-2 style) is never banned
        self._sep = self._tok_id(t["section_separator"]) if t.get("section_separator") else -1
        self._none = self._tok_id(t["empty_indication"]) if t.get("empty_indication") else self._pad
        self._banned = [i for i in (self._bos, self._pad, self._none) if i not in (self._eos, -1)]
        #: ``word``: a token is a word (joined by ``detokenize``); ``subword``: word pieces or
        #: BPE joined by the tokenizer's own decoder (``_word_pairs``)
        self._subword = t.get("level", "word") == "subword"
        self._section = str(m["generation"].get("section", "findings"))
        #: decoder-only bundles: ``prompt.template`` (text with ``<image>``, ``{indication}``,
        #: ``{views}``) and ``prompt.prefix_tokens``, see ``_templated_prefix``
        self._prompt: dict[str, Any] | None = m.get("prompt") if self._prefix_lm else None
        unk = t.get("unk")
        if unk is not None and self.tokenizer.token_to_id(unk) is not None and self._tok_id(unk) != self._eos:
            self._banned.append(self._tok_id(unk))
        inp = m["input"]
        self.image_size: int = int(inp["image_size"])
        self._mean = float(inp["normalisation"]["mean"])
        self._std = float(inp["normalisation"]["std"])
        self._views: list[str] = list(inp["views"])
        self._max_views = int(inp["max_views"])
        self._max_ind = int(inp["max_indication_tokens"])
        self.max_tokens = int(m["generation"]["max_tokens"])
        self.no_repeat_ngram_size = int(m["generation"].get("no_repeat_ngram_size", 0))
        self.length_penalty = float(m["generation"].get("length_penalty", 1.0))
        #: subtracted from the end-of-report log-probability at every step (``generation.eos_penalty``):
        #: a small model trained with label smoothing stops early; this lengthens the reports
        #: without changing the probabilities reported for the words
        self.eos_penalty = float(m["generation"].get("eos_penalty", 0.0))
        self.beam_size = int(beam_size or m["generation"].get("beam_size", 3))
        obs = m.get("observations", {}) if self._prefix_lm else m["observations"]
        self.observation_names: list[str] = list(obs.get("names", []))
        self.thresholds = np.asarray(obs.get("thresholds", [0.5] * len(self.observation_names)), dtype=np.float32)
        #: optional separate findings classifier (``observations.classifier``): its
        #: probabilities replace the encoder's ``obs_logits`` (``combine: "replace"``) or are
        #: averaged with them (``"mean"``) for the prompts and the grounding
        clf = obs.get("classifier")
        self._clf: tuple[str, int, float, float] | None = None
        self._clf_combine = "replace"
        if clf:
            norm = clf.get("normalisation", inp["normalisation"])
            self._clf = (str(clf["graph"]), int(clf["image_size"]), float(norm["mean"]), float(norm["std"]))
            self._clf_combine = str(clf.get("combine", "replace"))
            if self._clf_combine not in ("replace", "mean"):
                raise BundleError(f"{self.bundle.path}: observations.classifier.combine must be "
                                  f"'replace' or 'mean', not {self._clf_combine!r}")
        #: the manifest's grounding step (None when the bundle has none); see :class:`Grounding`
        self.grounding = Grounding.from_manifest(m["generation"])
        #: the input gate (``manifest["input_check"]``), None when the bundle has none
        self.input_gate = self._load_gate()
        vc = m.get("view_classifier", {})
        self._vc_size = int(vc.get("image_size", 64))
        self._vc_labels: list[str] = list(vc.get("labels", ["FRONTAL", "LATERAL"]))

    # --- public API -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def classify_views(self, images: list[np.ndarray]) -> list[tuple[str, float]]:
        """FRONTAL/LATERAL with probability for each 2-D MONOCHROME2 image in [0, 1]."""
        if not images:
            return []
        if "view_classifier" not in self._sessions:
            raise BundleError(f"{self.bundle.path}: bundle has no view_classifier graph")
        x = np.stack([prepare(im, self._vc_size, self._mean, self._std) for im in images])[:, None]
        (probs,) = self._sessions["view_classifier"].run(None, {"images": x})
        out = []
        for p in probs:
            i = int(np.argmax(p))
            out.append((self._vc_labels[i], float(p[i])))
        return out

    def check_inputs(self, images: Sequence[np.ndarray], views: Sequence[str]) -> list[ViewCheck] | None:
        """The input gate's verdict on each view (2-D MONOCHROME2 images in [0, 1] at any size,
        each with the view position the model will read it as), or None when the bundle has no
        ``input_check`` (the gate is off; logged once). See :mod:`onnx_models.input_gate`."""
        if self.input_gate is None:
            return None
        return self.input_gate.check(list(images), list(views), self.view_embeddings)

    def view_embeddings(self, images: list[np.ndarray], views: list[str]) -> np.ndarray:
        """One vector per view, each read alone as a one-view study: the encoder's image tokens
        mean-pooled (``encoder-decoder``) or its ``image_embeds`` mean-pooled (``decoder-only``)."""
        studies = [StudyInput(views=[(im, v)]) for im, v in zip(images, views, strict=True)]
        return self._pooled(studies, per_view=True)[:, 0]

    def _load_gate(self) -> InputGate | None:
        section = self.bundle.manifest.get("input_check")
        if not section:
            _log_once(logging.WARNING, f"model {self.name} {self.version}: the bundle has no input_check "
                      "section: the input gate is off (drafts are written for any image)")
            return None
        try:
            stats = GateStatistics.load(self.bundle.file(str(section.get("statistics", STATS_FILE))))
            return InputGate(section, stats)
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{self.bundle.path}: input_check is unusable: {exc}") from exc

    def embed_images(self, studies: list[StudyInput]) -> np.ndarray:
        """One vector per study: the encoder's image tokens mean-pooled over tokens and real
        views (used by the nearest-report baseline and for retrieval); for a decoder-only
        bundle the ``image_embeds`` mean-pooled over the tokens (``image_mask`` if given)."""
        return self._pooled(studies, per_view=False)

    def _pooled(self, studies: list[StudyInput], per_view: bool) -> np.ndarray:
        """Mean-pooled encoder output per study [B, D] (or per view [B, V, D])."""
        images, view_ids, view_mask = self._pixels(studies)
        if self._prefix_lm:
            out = self._run_encoder(images, view_ids, view_mask)
            embeds = out["image_embeds"]
            w = out.get("image_mask", np.ones(embeds.shape[:2], dtype=np.float32))[:, :, None]
            pooled_all = (embeds * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1.0)
            return pooled_all[:, None] if per_view else pooled_all
        tokens = self._run_encoder(images, view_ids, view_mask)["image_tokens"]
        pooled = tokens.mean(axis=2)  # B, V, D
        if per_view:
            return pooled
        m = view_mask[:, :, None]
        return (pooled * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)

    def generate(
        self,
        studies: list[StudyInput],
        beam_size: int | None = None,
        max_tokens: int | None = None,
        no_repeat_ngram_size: int | None = None,
        grounding: bool | None = None,
    ) -> list[GeneratedReport]:
        """Draft one report per study. ``grounding`` (default: the manifest's
        ``generation.grounding.enabled``) appends a templated sentence for every observation the
        head predicts positive that the text does not mention (see :class:`Grounding`); the
        added tokens carry the head probability in ``tokens``."""
        if not studies:
            return []
        t0 = time.perf_counter()
        beam = int(beam_size if beam_size is not None else self.beam_size)
        max_len = int(max_tokens if max_tokens is not None else self.max_tokens)
        ngram = self.no_repeat_ngram_size if no_repeat_ngram_size is None else int(no_repeat_ngram_size)
        probs, state = self._encode(studies)
        if beam <= 1:
            seqs = self._greedy(state, max_len, ngram)
        else:
            seqs = self._beam(state, max_len, ngram, beam)
        elapsed = (time.perf_counter() - t0) * 1000.0 / len(studies)
        ground = self.grounding
        if ground is not None and not (ground.enabled if grounding is None else grounding):
            ground = None
        if grounding and self.grounding is None:
            _log_once(logging.WARNING, f"model {self.name} {self.version}: bundle has no grounding step")
        reports = []
        for (ids, tok_probs), p in zip(seqs, probs, strict=True):
            reports.append(self._to_report(ids, tok_probs, p, elapsed, ground))
        return reports

    # --- internals ----------------------------------------------------------------------------
    def _tok_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise BundleError(f"{self.bundle.path}: tokenizer has no token {token!r}")
        return int(i)

    def _view_id(self, view: str) -> int:
        v = (view or "").strip().upper()
        return self._views.index(v) if v in self._views else self._views.index("UNKNOWN")

    def _pixels(self, studies: list[StudyInput], size: int | None = None, mean: float | None = None,
                std: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = len(studies)
        mean = self._mean if mean is None else mean
        std = self._std if std is None else std
        for i, st in enumerate(studies):
            if not st.views:
                raise ValueError(f"study {i} has no views")
        v = min(max(len(st.views) for st in studies), self._max_views)
        s = size or self.image_size
        images = np.zeros((b, v, 1, s, s), dtype=np.float32)
        view_ids = np.full((b, v), self._view_id("UNKNOWN"), dtype=np.int64)
        view_mask = np.zeros((b, v), dtype=np.float32)
        for i, st in enumerate(studies):
            for j, (img, view) in enumerate(st.views[: self._max_views]):
                images[i, j, 0] = prepare(np.asarray(img, dtype=np.float32), s, mean, std)
                view_ids[i, j] = self._view_id(view)
                view_mask[i, j] = 1.0
        return images, view_ids, view_mask

    def _check_decoder_only(self) -> None:
        """The graph contract of a decoder-only bundle (README.md), checked once at load."""
        want = {"encoder": ({"images"}, {"image_embeds"}),  # view_ids/view_mask if it uses them
                "embed": ({"input_ids"}, {"inputs_embeds"}),
                "decoder": ({"inputs_embeds", "attention_mask", "past_k", "past_v"},
                            {"logits", "present_k", "present_v"})}
        for role, (inputs, outputs) in want.items():
            sess = self._sessions[role]
            missing = (inputs - {i.name for i in sess.get_inputs()}) | (outputs - {o.name for o in sess.get_outputs()})
            if missing:
                raise BundleError(f"{self.bundle.path}: decoder-only graph {role!r} lacks {sorted(missing)}")
        dec = self.bundle.manifest.get("decoder", {})
        try:
            self._kv_dims = (int(dec["layers"]), int(dec["heads"]), int(dec["head_dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{self.bundle.path}: decoder-only bundle needs decoder.layers, "
                              "decoder.heads and decoder.head_dim in the manifest") from exc

    def _run_encoder(self, images: np.ndarray, view_ids: np.ndarray, view_mask: np.ndarray) -> dict[str, np.ndarray]:
        return self._run("encoder", {"images": images, "view_ids": view_ids, "view_mask": view_mask})

    def _run(self, role: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph ``role`` with the inputs of ``feed`` it declares; its outputs by name."""
        sess = self._sessions[role]
        outs = sess.run(None, {k: v for k, v in feed.items() if k in self._graph_inputs[role]})
        return {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}

    def _word_pairs(self, ids: list[int], tok_probs: list[float]) -> tuple[list[tuple[str, float]], int]:
        """(word, probability) pairs of a generated sequence without the section separator, and
        where the impression starts in them. Word-level tokenizers: one token, one word. Subword
        tokenizers: the tokenizer's decoder joins the pieces and each word (``\\w+`` or a
        punctuation mark) gets the lowest probability of the pieces it is made of. Without a
        separator the whole text is ``generation.section``."""
        cut = ids.index(self._sep) if self._sep in ids else (len(ids) if self._section != "impression" else 0)
        parts = [(ids[:cut], tok_probs[:cut]), (ids[cut + (self._sep in ids):], tok_probs[cut + (self._sep in ids):])]
        out: list[list[tuple[str, float]]] = []
        for part_ids, part_probs in parts:
            if not self._subword:
                out.append([(self.tokenizer.id_to_token(i) or "", p) for i, p in zip(part_ids, part_probs, strict=True)])
                continue
            ends = [len(self.tokenizer.decode(part_ids[: k + 1], skip_special_tokens=True))
                    for k in range(len(part_ids))]
            text = self.tokenizer.decode(part_ids, skip_special_tokens=True)
            words = []
            for m in _WORDS.finditer(text):
                ps = [p for k, p in enumerate(part_probs) if (ends[k - 1] if k else 0) < m.end() and ends[k] > m.start()]
                words.append((m.group(), min(ps) if ps else 1.0))
            out.append(words)
        return out[0] + out[1], len(out[0])

    def _observation_probs(self, studies: list[StudyInput], view_ids: np.ndarray, view_mask: np.ndarray,
                           obs_logits: np.ndarray | None) -> np.ndarray:
        """Observation probabilities [batch, 13] (encoder head and/or ``observations.classifier``),
        or [batch, 0] when the bundle has neither."""
        probs = None if obs_logits is None else 1.0 / (1.0 + np.exp(-obs_logits))
        if self._clf is not None:
            graph, size, mean, std = self._clf
            big, _, _ = self._pixels(studies, size, mean, std)
            (clf_logits,) = self._sessions[graph].run(
                None, {"images": big, "view_ids": view_ids, "view_mask": view_mask}
            )
            clf_probs = 1.0 / (1.0 + np.exp(-clf_logits))
            probs = clf_probs if self._clf_combine == "replace" or probs is None else (probs + clf_probs) / 2.0
        return np.zeros((len(studies), 0), dtype=np.float32) if probs is None else probs

    def _encode(self, studies: list[StudyInput]) -> tuple[np.ndarray, _State]:
        """Observation probabilities and the decoding state for the studies' first step."""
        if self._prefix_lm:
            return self._encode_prefix(studies)
        b = len(studies)
        images, view_ids, view_mask = self._pixels(studies)
        enc = self._run_encoder(images, view_ids, view_mask)
        tokens, obs_logits = enc["image_tokens"], enc.get("obs_logits")
        probs = self._observation_probs(studies, view_ids, view_mask, obs_logits)
        states = (probs >= self.thresholds[None, :]).astype(np.int64)
        ind_ids = [self._indication_ids(st.indication) for st in studies]
        li = max(len(x) for x in ind_ids)
        ind = np.full((b, li), self._pad, dtype=np.int64)
        ind_mask = np.zeros((b, li), dtype=np.float32)
        for i, ids in enumerate(ind_ids):
            ind[i, : len(ids)] = ids
            ind_mask[i, : len(ids)] = 1.0
        br = self._run("bridge", {"image_tokens": tokens, "view_mask": view_mask, "obs_states": states,
                                  "indication_ids": ind, "indication_mask": ind_mask})
        cond = br.get("cond", np.zeros((b, 0), dtype=np.float32))
        return probs, _CrossState(br["cross_k"], br["cross_v"], br["memory_mask"], cond)

    def _encode_prefix(self, studies: list[StudyInput]) -> tuple[np.ndarray, _PrefixState]:
        """Decoder-only: prefix = ``[image_embeds ; embed(indication ids, left-padded)]``; the
        first decoding step appends ``[BOS]``. Padding has attention mask 0, as have the image
        embeddings the encoder's optional ``image_mask`` marks 0 (padded views)."""
        b = len(studies)
        images, view_ids, view_mask = self._pixels(studies)
        out = self._run_encoder(images, view_ids, view_mask)
        probs = self._observation_probs(studies, view_ids, view_mask, out.get("obs_logits"))
        embeds = out["image_embeds"].astype(np.float32)
        img_mask = out.get("image_mask", np.ones(embeds.shape[:2], dtype=np.float32)).astype(np.float32)
        if self._prompt is not None:
            return probs, self._templated_prefix(studies, embeds, img_mask)
        ind_ids = [self._indication_ids(st.indication) for st in studies]
        li = max(len(x) for x in ind_ids)
        ind = np.full((b, li), self._pad, dtype=np.int64)
        ind_mask = np.zeros((b, li), dtype=np.float32)
        for i, ids in enumerate(ind_ids):
            ind[i, li - len(ids) :] = ids
            ind_mask[i, li - len(ids) :] = 1.0
        (text,) = self._sessions["embed"].run(None, {"input_ids": ind})
        prefix = np.concatenate([embeds, text.astype(np.float32)], axis=1)
        return probs, _PrefixState(prefix, np.concatenate([img_mask, ind_mask], axis=1))

    def _templated_prefix(self, studies: list[StudyInput], embeds: np.ndarray, img_mask: np.ndarray) -> _PrefixState:
        """Prefix from the manifest's ``prompt``: per study ``[prefix_tokens ; text before
        <image> ; image_embeds ; text after]``, ``{indication}`` (at most
        ``input.max_indication_tokens`` tokens; ``prompt.empty_indication`` when there is none)
        and ``{views}`` (the view names read) filled in; left-padded with mask 0."""
        p = self._prompt or {}
        n = embeds.shape[1]
        before, _, after = str(p["template"]).partition("<image>")
        pre = [self._tok_id(t) for t in p.get("prefix_tokens", [])]
        rows = []
        for st in studies:
            ids = self.tokenizer.encode(" ".join((st.indication or "").split()), add_special_tokens=False).ids
            ind = self.tokenizer.decode(ids[: self._max_ind]) if ids else str(p.get("empty_indication", "none"))
            views = ", ".join(v for _, v in st.views[: self._max_views])
            text = [part.replace("{indication}", ind).replace("{views}", views) for part in (before, after)]
            rows.append([pre + self.tokenizer.encode(text[0], add_special_tokens=False).ids,
                         self.tokenizer.encode(text[1], add_special_tokens=False).ids])
        total = [len(a) + n + len(c) for a, c in rows]
        width = max(total)
        ids_m = np.full((len(studies), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(studies), width), dtype=np.float32)
        for i, (a, c) in enumerate(rows):
            o = width - total[i]
            ids_m[i, o : o + len(a)] = a
            ids_m[i, o + len(a) + n :] = c
            mask[i, o:] = 1.0
            mask[i, o + len(a) : o + len(a) + n] = img_mask[i]
        (prefix,) = self._sessions["embed"].run(None, {"input_ids": ids_m})
        prefix = prefix.astype(np.float32)
        for i, (a, _) in enumerate(rows):
            o = width - total[i] + len(a)
            prefix[i, o : o + n] = embeds[i]
        return _PrefixState(prefix, mask)

    def _indication_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text or "").ids[: self._max_ind] if (text or "").strip() else []
        return ids or [self._none]

    #: run the decoder with I/O binding (``_run_decoder``): set from ``kv_device`` at load (on
    #: for a GPU, off on CPU); changed only to measure or to test the bound path on CPU
    io_binding: bool
    #: host arrays already copied to ``kv_device`` in this decode, by ``id`` (``_run_decoder``)
    _uploaded: dict[int, tuple[np.ndarray, ort.OrtValue]]

    def _run_decoder(self, feed: dict[str, Any]) -> tuple[np.ndarray, _KV, _KV]:
        """One decoder call -> (logits on the host, present_k, present_v). With I/O binding the
        inputs are bound where they are (an OrtValue from the previous step stays on its
        device; host arrays are bound in place on CPU, copied to the device otherwise), the
        logits are copied to the host and the presents stay on ``kv_device``."""
        sess = self._sessions["decoder"]
        names = self._graph_inputs["decoder"]
        feed = {k: v for k, v in feed.items() if k in names}
        if not self.io_binding:
            host = {k: v.numpy() if isinstance(v, ort.OrtValue) else v for k, v in feed.items()}
            logits, pk, pv = sess.run(["logits", "present_k", "present_v"], host)
            return logits, pk, pv
        io = sess.io_binding()
        keep = []  # host arrays bound by address: alive until the run returns
        for name, value in feed.items():
            if isinstance(value, ort.OrtValue):
                io.bind_ortvalue_input(name, value)
                continue
            arr = np.ascontiguousarray(value)
            keep.append(arr)
            if self.kv_device == "cpu":
                io.bind_cpu_input(name, arr)
                continue
            # a state constant over the steps (cross_k/v, memory_mask) is uploaded once per decode
            cached = self._uploaded.get(id(value))
            if cached is None or cached[0] is not value:
                cached = (value, ort.OrtValue.ortvalue_from_numpy(arr, self.kv_device, 0))
                self._uploaded[id(value)] = cached
            io.bind_ortvalue_input(name, cached[1])
        io.bind_output("logits", "cpu")
        io.bind_output("present_k", self.kv_device)
        io.bind_output("present_v", self.kv_device)
        sess.run_with_iobinding(io)
        logits, pk, pv = io.get_outputs()
        del keep
        return logits.numpy(), pk, pv

    def _step(self, ids: np.ndarray, st: _State, pk: _KV,
              pv: _KV) -> tuple[np.ndarray, _KV, _KV, _State]:
        """One decoder call for ``ids`` [rows, seq] -> last logits, present K/V, next state."""
        if isinstance(st, _CrossState):
            logits, pk, pv = self._run_decoder({
                "input_ids": ids, "memory_mask": st.memory_mask, "cross_k": st.cross_k, "cross_v": st.cross_v,
                "past_k": pk, "past_v": pv, "cond": st.cond})
            return logits[:, -1, :], pk, pv, st
        (emb,) = self._sessions["embed"].run(None, {"input_ids": ids})
        if st.prefix is not None:
            emb = np.concatenate([st.prefix, emb], axis=1)
        mask = np.concatenate([st.mask, np.ones(ids.shape, dtype=np.float32)], axis=1)
        logits, pk, pv = self._run_decoder({"inputs_embeds": emb, "attention_mask": mask, "past_k": pk, "past_v": pv})
        return logits[:, -1, :], pk, pv, _PrefixState(None, mask)

    def _empty_past(self, st: _State) -> tuple[np.ndarray, np.ndarray]:
        n = st.rows
        if isinstance(st, _CrossState):
            like = st.cross_k
            shape = (like.shape[0], n, like.shape[2], 0, like.shape[4])
        else:
            layers, heads, head_dim = self._kv_dims
            shape = (layers, n, heads, 0, head_dim)
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)

    def _log_probs(self, logits: np.ndarray, histories: list[list[int]], ngram: int) -> np.ndarray:
        logits = logits.astype(np.float64)
        logits[:, self._banned] = -np.inf
        for r, hist in enumerate(histories):
            if self._sep in hist:
                logits[r, self._sep] = -np.inf
            for t in _banned_ngram_tokens(hist, ngram):
                logits[r, t] = -np.inf
        mx = logits.max(axis=1, keepdims=True)
        lse = mx + np.log(np.exp(logits - mx).sum(axis=1, keepdims=True))
        out = logits - lse
        if self.eos_penalty:
            out[:, self._eos] -= self.eos_penalty
        return out

    def _greedy(self, st: _State, max_len: int, ngram: int) -> list[tuple[list[int], list[float]]]:
        b = st.rows
        self._uploaded.clear()
        pk: _KV
        pv: _KV
        pk, pv = self._empty_past(st)
        cur = np.full((b, int(self._bos >= 0)), self._bos, dtype=np.int64)
        hist: list[list[int]] = [[] for _ in range(b)]
        probs: list[list[float]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        for _ in range(max_len):
            logits, pk, pv, st = self._step(cur, st, pk, pv)
            lp = self._log_probs(logits, hist, ngram)
            nxt = lp.argmax(axis=1)
            for i in range(b):
                if done[i]:
                    continue
                if nxt[i] == self._eos:
                    done[i] = True
                else:
                    hist[i].append(int(nxt[i]))
                    probs[i].append(float(math.exp(lp[i, nxt[i]])))
            if done.all():
                break
            cur = nxt.astype(np.int64)[:, None]
        return list(zip(hist, probs, strict=True))

    def _beam(self, st: _State, max_len: int, ngram: int, k: int) -> list[tuple[list[int], list[float]]]:
        b = st.rows
        st = st.expand(np.repeat(np.arange(b), k))
        self._uploaded.clear()
        pk: _KV
        pv: _KV
        pk, pv = self._empty_past(st)
        scores = np.full((b, k), -np.inf)
        scores[:, 0] = 0.0
        hist: list[list[int]] = [[] for _ in range(b * k)]
        tprobs: list[list[float]] = [[] for _ in range(b * k)]
        finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        cur = np.full((b * k, int(self._bos >= 0)), self._bos, dtype=np.int64)
        lp_pen = self.length_penalty
        for _ in range(max_len):
            logits, pk, pv, st = self._step(cur, st, pk, pv)
            lp = self._log_probs(logits, hist, ngram)
            vocab = lp.shape[1]
            cand = (scores[:, :, None] + lp.reshape(b, k, vocab)).reshape(b, k * vocab)
            top = np.argsort(-cand, axis=1)[:, : 2 * k]
            new_rows = np.zeros(b * k, dtype=np.int64)
            new_tok = np.full(b * k, self._eos, dtype=np.int64)
            new_scores = np.full((b, k), -np.inf)
            new_hist: list[list[int]] = [[] for _ in range(b * k)]
            new_probs: list[list[float]] = [[] for _ in range(b * k)]
            for i in range(b):
                if done[i]:
                    new_rows[i * k : (i + 1) * k] = i * k
                    continue
                n = 0
                for c in top[i]:
                    sc = cand[i, c]
                    if not np.isfinite(sc):
                        break
                    beam_i, tok = divmod(int(c), vocab)
                    row = i * k + beam_i
                    p = float(math.exp(lp[row, tok]))
                    if tok == self._eos:
                        length = len(hist[row]) + 1
                        finished[i].append((sc / length**lp_pen, hist[row], tprobs[row]))
                        continue
                    dst = i * k + n
                    new_rows[dst] = row
                    new_tok[dst] = tok
                    new_scores[i, n] = sc
                    new_hist[dst] = hist[row] + [tok]
                    new_probs[dst] = tprobs[row] + [p]
                    n += 1
                    if n == k:
                        break
                if len(finished[i]) >= k or n == 0:
                    done[i] = True
            if done.all():
                break
            pk, pv, st = _host(pk)[:, new_rows], _host(pv)[:, new_rows], st.reorder(new_rows)
            scores, hist, tprobs = new_scores, new_hist, new_probs
            cur = new_tok[:, None]
        out = []
        for i in range(b):
            if not finished[i]:
                for j in range(k):
                    row = i * k + j
                    if np.isfinite(scores[i, j]):
                        finished[i].append((scores[i, j] / max(1, len(hist[row])) ** lp_pen, hist[row], tprobs[row]))
            best = max(finished[i], key=lambda f: f[0]) if finished[i] else (0.0, [], [])
            out.append((best[1], best[2]))
        return out

    #: apply the consistency rules (:func:`onnx_models.consistency.make_consistent`) to every
    #: draft after decoding and grounding; off only to measure what they change
    consistency: bool = True

    def _decision_thresholds(self) -> dict[str, float]:
        """Per observation, the probability at which it counts as present: the grounding's
        thresholds when the bundle has a grounding step, else the prompt thresholds."""
        g = self.grounding
        thr = g.thresholds if g is not None and g.thresholds is not None else self.thresholds
        return {n: float(t) for n, t in zip(self.observation_names, thr, strict=True)}

    def _to_report(self, ids: list[int], tok_probs: list[float], obs: np.ndarray, elapsed: float,
                   grounding: Grounding | None = None) -> GeneratedReport:
        pairs, cut = self._word_pairs(ids, tok_probs)
        findings, impression = _drop_repeated_sentences(pairs[:cut]), _drop_repeated_sentences(pairs[cut:])
        observations = {n: float(p) for n, p in zip(self.observation_names, obs, strict=True)} if len(obs) else {}
        sentences: list[tuple[str, float]] = []
        if grounding is not None:
            text = detokenize([w for w, _ in findings]) + " " + detokenize([w for w, _ in impression])
            thr = grounding.thresholds if grounding.thresholds is not None else self.thresholds
            thresholds = {n: float(t) for n, t in zip(self.observation_names, thr, strict=True)}
            negated = grounding.contradicted(text, observations, thresholds) if grounding.replace_negated else set()
            affirmed = grounding.unsupported(observations)
            if negated or affirmed:
                findings = grounding.drop_sentences(findings, negated, affirmed)
                impression = grounding.drop_sentences(impression, negated, affirmed)
                text = detokenize([w for w, _ in findings]) + " " + detokenize([w for w, _ in impression])
            sentences = [(sentence, prob) for _, sentence, prob in grounding.additions(text, observations, thresholds)]
            added = [(w, prob) for sentence, prob in sentences for w in _WORDS.findall(sentence.lower())]
            section = impression if grounding.section == "impression" else findings
            if added and section and section[-1][0] not in (".", "!", "?"):
                added.insert(0, (".", added[0][1]))  # close a sentence cut off by max_tokens
            if grounding.section == "impression":
                impression = impression + added
            else:
                findings = findings + added
        if self.consistency:
            findings, impression, edits = make_consistent(findings, impression, observations,
                                                          self._decision_thresholds())
            if edits:
                log.debug("consistency rules: %s", "; ".join(f"{e.action} ({e.reason})" for e in edits))
            kept = {" ".join(w for w, _ in s) for s in split_sentences(findings + impression)}
            sentences = [(s, p) for s, p in sentences if " ".join(_WORDS.findall(s.lower())) in kept]
        return GeneratedReport(
            findings=detokenize([w for w, _ in findings]),
            impression=detokenize([w for w, _ in impression]),
            tokens=findings + impression,
            observations=observations,
            duration_ms=elapsed,
            grounded=sentences,
        )


def _host(kv: _KV) -> np.ndarray:
    """A KV cache as a host array (a copy when it is on a GPU; a view of CPU memory)."""
    return kv.numpy() if isinstance(kv, ort.OrtValue) else kv


def _drop_repeated_sentences(tokens: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """A section's tokens without a sentence that repeats an earlier one word for word (a
    decoding artefact: a report never needs the same sentence twice in one section)."""
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for sentence in _sentences(tokens):
        key = " ".join(w.lower() for w, _ in sentence if w not in _SENTENCE_ENDS)
        if key not in seen:
            out += sentence
            seen.add(key)
    return out


#: the one sentence splitter (grounding, the repeat filter and the consistency rules)
_sentences = split_sentences


def _banned_ngram_tokens(hist: list[int], n: int) -> list[int]:
    if n <= 0 or len(hist) < n - 1:
        return []
    if n == 1:
        return list(set(hist))
    prefix = hist[len(hist) - n + 1 :]
    banned = []
    for i in range(len(hist) - n + 1):
        if hist[i : i + n - 1] == prefix:
            banned.append(hist[i + n - 1])
    return banned
