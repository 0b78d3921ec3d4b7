"""``seqpar export hf CHECKPOINT --output DIR``: a training checkpoint as a Hugging Face Llama
(config.json + safetensors) that ``transformers`` loads."""

from __future__ import annotations

import argparse
import sys


def cmd_export_hf(args: argparse.Namespace) -> int:
    from seqpar.model.hf import HFConfigError, load_checkpoint_model, save_pretrained

    try:
        model = load_checkpoint_model(args.checkpoint)
        written = save_pretrained(model, args.output, max_shard_bytes=int(args.max_shard_gib * 2**30))
    except (HFConfigError, OSError) as e:
        print(f"seqpar: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {', '.join(written)} ({model.num_params():,} parameters)")
    return 0


def add_export_commands(sub) -> None:
    export = sub.add_parser("export", help="convert checkpoints for other frameworks").add_subparsers(
        dest="export_command", required=True)
    p = export.add_parser("hf", help="a checkpoint (or a run directory: its newest) as a Hugging Face Llama")
    p.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_N, or RUN_DIR")
    p.add_argument("--output", required=True, help="directory for config.json and the safetensors")
    p.add_argument("--max-shard-gib", type=float, default=5.0, help="shard above this size (with an index)")
    p.set_defaults(func=cmd_export_hf)
