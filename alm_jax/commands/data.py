"""`alm-jax data`: build the synthetic corpus, compose multi-audio questions, pack a manifest into ArrayRecord.

  alm-jax data synth --out DIR --n N [--seed S] [--workers W]
  alm-jax data compose --in MANIFEST --out DIR [--seed S] [--questions N|T,V,E] [--clips 2-5] [--types ...]
  alm-jax data pack MANIFEST OUT [--shards K] [--skip-bad]
"""

from __future__ import annotations

import argparse


def _compose_types() -> tuple[str, ...]:
  """The question types of `data compose` (kept here so --help does not import numpy)."""
  return ("which", "match", "count", "order", "same")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
  synth = sub.add_parser("synth", help="Write the synthetic audio-QA corpus (train/validation/test JSONL, wavs, "
                         "tokenizer.json).")
  synth.add_argument("--out", required=True, help="output folder")
  synth.add_argument("--n", type=int, required=True, help="number of examples (all splits)")
  synth.add_argument("--seed", type=int, default=0, help="random seed; output depends only on --n and --seed")
  synth.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
  synth.add_argument("--vocab-size", type=int, default=1024, help="upper bound of the BPE vocabulary")
  compose = sub.add_parser("compose", help="Compose multi-audio questions (which clip, which two match, how many, "
                           "in what order, same or not) from a labelled single-clip manifest or CSV.")
  compose.add_argument("--in", dest="inputs", action="append", required=True, metavar="MANIFEST",
                       help="labelled single-clip input: a JSONL/JSON manifest, a CSV (ESC-50 meta/esc50.csv, "
                       "Clotho, AudioCaps) or a folder of them; repeatable")
  compose.add_argument("--out", required=True, help="output folder (train/validation/test.jsonl, tokenizer.json)")
  compose.add_argument("--seed", type=int, default=0, help="random seed; output depends only on inputs and flags")
  compose.add_argument("--questions", default="200,25,25",
                       help="questions per type: N (train; validation and test N//8) or TRAIN,VALIDATION,TEST")
  compose.add_argument("--clips", default="2-5", help="clips per question: N or LOW-HIGH (default 2-5)")
  compose.add_argument("--types", default=",".join(_compose_types()),
                       help="comma-separated question types (default: all of " + ",".join(_compose_types()) + ")")
  compose.add_argument("--label-key", default=None,
                       help="field (or CSV column) holding each clip's label; a.b reads nested fields "
                       "(default: the first of text, answer, meta.label, label, category, caption, caption_1)")
  compose.add_argument("--select", action="append", default=[], metavar="KEY=V1,V2",
                       help="keep only lines whose KEY is one of the values (repeatable); others are ignored")
  compose.add_argument("--audio-root", default=None, help="folder holding a CSV's audio (default: beside it)")
  compose.add_argument("--resplit", action="store_true",
                       help="ignore the source's splits and folds; split 80/10/10 by clip")
  compose.add_argument("--vocab-size", type=int, default=1024, help="upper bound of the BPE vocabulary")
  pack = sub.add_parser("pack", help="Pack a manifest (JSONL, MMAU, MMAU-Pro or AF3 JSON) and its audio into "
                        "ArrayRecord shards.")
  pack.add_argument("manifest", help="manifest file")
  pack.add_argument("out", help="output folder; shards are OUT/<manifest stem>-XXXXX-of-YYYYY.array_record")
  pack.add_argument("--shards", type=int, default=1, help="number of shard files")
  pack.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines and missing audio")


def run(args: argparse.Namespace) -> int:
  if args.data_command == "synth":
    from alm_jax.data.synth import write_corpus  # pylint: disable=import-outside-toplevel

    summary = write_corpus(args.out, args.n, seed=args.seed, workers=args.workers, vocab_size=args.vocab_size,
                           progress=True)
    print(f"wrote {summary['n']} examples to {args.out} in {summary['seconds']:.1f} s "
          f"(train {summary['splits']['train']}, validation {summary['splits']['validation']}, "
          f"test {summary['splits']['test']}; vocabulary {summary['vocab_size']})")
    return 0
  if args.data_command == "compose":
    from alm_jax.data import compose  # pylint: disable=import-outside-toplevel

    summary = compose.write_composed(
        args.inputs, args.out, seed=args.seed, questions=compose.parse_question_counts(args.questions),
        clip_range=compose.parse_clip_range(args.clips), types=[t for t in args.types.split(",") if t],
        label_key=args.label_key, select=compose.parse_select(args.select), audio_root=args.audio_root,
        resplit=args.resplit, vocab_size=args.vocab_size)
    splits, clips = summary["splits"], summary["source_clips"]
    print(f"composed {sum(splits.values())} questions into {args.out} (train {splits['train']}, validation "
          f"{splits['validation']}, test {splits['test']}; from {sum(clips.values())} clips with "
          f"{summary['labels']['train']}/{summary['labels']['validation']}/{summary['labels']['test']} labels)")
    return 0
  if args.data_command == "pack":
    from alm_jax.data.sources import pack_manifest  # pylint: disable=import-outside-toplevel

    result = pack_manifest(args.manifest, args.out, shards=args.shards, skip_bad=args.skip_bad, progress=True)
    print(f"packed {result['records']} records into {len(result['files'])} shard(s) under {args.out}"
          + (f"; skipped {result['skipped']}" if result["skipped"] else ""))
    return 0
  print("alm-jax data: choose an action: synth, compose or pack (see --help)")
  return 2
