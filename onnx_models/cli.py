"""``cxrnode train | export | import-hf | eval``: the model subcommands (torch only imported by train/export)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _training_args(p: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    """The options every training command shares."""
    p.add_argument("--data", required=True, help="dataset folder (studies.jsonl or the Kaggle/Open-i layout)")
    p.add_argument("--out", required=True, help="run folder (checkpoints; re-run to resume)")
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="studies per batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=13, help="random seed (default %(default)s)")
    p.add_argument("--max-train-studies", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the reference report model (needs the [train] extra)")
    _training_args(p, epochs=8, lr=5e-4)
    p.add_argument("--head-epochs", type=int, default=4,
                   help="stage 2: epochs of encoder + observation head training with the decoder frozen")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is much faster than 2 when other jobs share the CPU)")
    p.add_argument("--init-from", default="", help="start from the weights of this checkpoint")
    p.add_argument("--freeze-image", action="store_true",
                   help="train only the text side (bridge + decoder); image encoder and head frozen")
    p.add_argument("--max-val-studies", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--bundle", default="", help="also export the best checkpoint to this bundle folder")
    p.set_defaults(func=_train)

    p = sub.add_parser("train-findings",
                       help="train the bundle's 256 px findings classifier (needs the [train] extra)")
    _training_args(p, epochs=14, lr=2e-3)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=_train_findings)

    p = sub.add_parser("export", help="export a checkpoint to an ONNX model bundle")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="bundle folder (replaced)")
    p.add_argument("--name", default="default")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--model-card", default="", help="Markdown file to ship as MODEL_CARD.md")
    p.add_argument("--findings", default="",
                   help="findings classifier checkpoint (from train-findings) to drive the observations")
    p.add_argument("--combine", choices=["replace", "mean"], default="replace",
                   help="with --findings: use its probabilities alone, or their mean with the report model's head")
    p.add_argument("--prompt-scale", type=float, default=1.0,
                   help="multiply the thresholds that turn observation probabilities into the decoder's prompts")
    p.add_argument("--grounding-threshold", type=float, default=None,
                   help="one probability threshold for every observation in the grounding step "
                        "(default: per-observation thresholds)")
    p.add_argument("--replace-negated", action="store_true",
                   help="grounding: drop sentences that negate a positive observation and add its sentence")
    p.add_argument("--drop-below", type=float, default=None,
                   help="grounding: drop sentences affirming an observation whose probability is below this")
    p.add_argument("--eos-penalty", type=float, default=0.0,
                   help="subtract this from the end-of-report log-probability at every decoding step (longer reports)")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "calibrate-gate",
        help="compute a bundle's input gate (out-of-distribution limits) from its training images",
        description="Fit the input gate's statistics on the train split (less its tune hold-out), set "
                    "the limits on the hold-out, measure the share of val views rejected, and write "
                    "input_check.npz and the manifest's input_check section into the bundle folder.")
    p.add_argument("--bundle", required=True, help="bundle folder (changed in place) or name")
    p.add_argument("--data", required=True, help="dataset folder (studies.jsonl or the Kaggle/Open-i layout)")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="limit = this quantile of the hold-out's distances (default 0.99)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    p.add_argument("--version", default="", help="also set the bundle's version (the bundle changes)")
    p.set_defaults(func=_calibrate_gate)

    p = sub.add_parser(
        "import-hf",
        help="convert a local Hugging Face checkpoint folder into a model bundle (needs the [import] extra)",
        description="Read a local transformers checkpoint folder (never the network; no remote code) and write "
                    "a bundle the node runs: ONNX graphs on the bundle's graph contract, tokenizer.json, the "
                    "image processor's settings, a generated MODEL_CARD.md. Supported: VisionEncoderDecoderModel "
                    "with a BERT decoder (encoder-decoder bundle), LlavaForConditionalGeneration with a Llama "
                    "language model and Gemma3ForConditionalGeneration (MedGemma's family) (decoder-only bundles). "
                    "The bundle is checked against transformers (logits, "
                    "greedy text); see onnx_models/README.md.")
    p.add_argument("checkpoint", help="checkpoint folder (config.json, model.safetensors, preprocessor_config.json, "
                                      "tokenizer.json)")
    p.add_argument("--out", required=True, help="bundle folder (replaced)")
    p.add_argument("--name", default="", help="bundle name (default: the checkpoint folder's name)")
    p.add_argument("--version", default="", help="bundle version (default 0.0.0)")
    p.add_argument("--views", choices=["first-frontal", "all"], default="first-frontal",
                   help="VisionEncoderDecoderModel: first-frontal: read one view, the first frontal (default); "
                        "all: up to 4 views, their tokens concatenated (only for models trained on several views)")
    p.add_argument("--section", choices=["findings", "impression"], default="findings",
                   help="the report section the model writes (default findings)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--int8", action="store_true", help="CPU: dynamic int8 quantisation of the linear layers")
    speed.add_argument("--fp16", action="store_true", help="CUDA: float16 graphs (float32 inputs and outputs)")
    p.add_argument("--prompt-template", default="",
                   help="LLaVA / Gemma 3: the prompt, with <image> (the views' image blocks), {indication} "
                        "and {views} (LLaVA default: 'USER: <image>\\nViews: {views}. Indication: "
                        "{indication}\\nWrite the findings. ASSISTANT:'; Gemma 3 default: its chat turn, "
                        "see onnx_models/README.md)")
    p.add_argument("--calibration-images", default="",
                   help="folder of 8-bit grey PNG/JPEG images like the model's training films (>= 125): fit "
                        "the input gate on them (else the bundle's gate is off)")
    p.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_import_hf)

    p = sub.add_parser("eval", help="evaluate a bundle on a dataset split (NLG, clinical efficacy, consistency)")
    p.add_argument("--bundle", default="default", help="bundle name or folder (default %(default)s)")
    p.add_argument("--data", required=True, help="dataset folder (studies.jsonl or the Kaggle/Open-i layout)")
    p.add_argument("--split", default="val", help="the split to evaluate (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--predictions", default="", help="write one JSON line per study to this file")
    p.add_argument("--beam-size", type=int, default=None, help="beam width (default: the bundle's)")
    p.add_argument("--no-repeat-ngram", type=int, default=None,
                   help="forbid repeating n-grams of this size (default: the bundle's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is much faster than 2 when other jobs share the CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="studies per batch (default %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N studies (default 0: all)")
    p.add_argument("--no-baselines", action="store_true",
                   help="skip the baselines on the same split (the most common training report, the nearest training report by image embedding)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (it needs Java; slow)")
    p.add_argument("--input-check", choices=["enforce", "warn", "off"], default="enforce",
                   help="apply the bundle's input gate as the node does (pipeline.input_check; default "
                        "enforce: a study the node would withhold scores as an empty draft)")
    p.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    tc = TrainConfig(
        data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, threads=args.threads, head_epochs=args.head_epochs,
        init_from=args.init_from, freeze_image=args.freeze_image, max_train_studies=args.max_train_studies,
        max_val_studies=args.max_val_studies, max_steps=args.max_steps,
    )
    best = train(tc)
    print(f"best checkpoint: {best}")
    if args.bundle:
        from .export import export_bundle

        export_bundle(best, args.bundle)
        print(f"bundle: {args.bundle}")
    return 0


def _train_findings(args: argparse.Namespace) -> int:
    from .train_findings import FindingsConfig, train_findings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fc = FindingsConfig(data=args.data, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, threads=args.threads,
                        max_train_studies=args.max_train_studies, max_steps=args.max_steps)
    print(f"best checkpoint: {train_findings(fc)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import export_bundle

    card = Path(args.model_card).read_text(encoding="utf-8") if args.model_card else None
    out = export_bundle(args.checkpoint, args.out, name=args.name, version=args.version, model_card=card,
                        findings=args.findings or None, combine=args.combine, prompt_scale=args.prompt_scale,
                        grounding_threshold=args.grounding_threshold, replace_negated=args.replace_negated,
                        drop_below=args.drop_below, eos_penalty=args.eos_penalty)
    print(f"bundle: {out}")
    return 0


def _calibrate_gate(args: argparse.Namespace) -> int:
    from .gate_calibration import calibrate_bundle

    section = calibrate_bundle(args.bundle, args.data, quantile=args.quantile, threads=args.threads,
                               version=args.version)
    print(json.dumps(section, indent=2))
    return 0


def _import_hf(args: argparse.Namespace) -> int:
    from .import_hf import ImportHFError, import_hf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        out = import_hf(args.checkpoint, args.out, name=args.name, version=args.version, views=args.views,
                        section=args.section, int8=args.int8, fp16=args.fp16,
                        prompt_template=args.prompt_template.replace("\\n", "\n"),  # a typed \n is a newline
                        calibration_images=args.calibration_images or None, check=not args.no_check)
    except ImportHFError as exc:
        print(f"import-hf: {exc}", file=sys.stderr)
        return 2
    print(f"bundle: {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    res = evaluate(
        bundle=args.bundle, data=args.data, split=args.split, predictions=args.predictions or None,
        beam_size=args.beam_size, no_repeat_ngram_size=args.no_repeat_ngram, threads=args.threads,
        batch_size=args.batch_size, limit=args.limit, baselines=not args.no_baselines,
        meteor=not args.no_meteor, input_check=args.input_check,
    )
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for system, m in res["systems"].items():
            print(system, " ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float)))
        # the consistency checker on the reference reports: the baseline for the rates above
        refs = res["consistency"]["reference_reports"]
        print("reference_reports", " ".join(f"{k}={v:.3f}" for k, v in refs.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrnode-models")
    add_subcommands(parser.add_subparsers(dest="command"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "func", None):
        build_parser().print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
