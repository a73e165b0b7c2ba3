"""``python -m deberta_ds.convert``: deberta_ds checkpoints to and from Hugging Face ``DebertaV2``
checkpoints (the key layout is ``deberta_ds.hf_format``'s), TP splits and ONNX.

deberta_ds checkpoints (native, split-tp, or a training run's) are read by
``deberta_ds.checkpoint_reader`` and written by ``deberta_ds.native_checkpoint``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from deberta_ds.checkpoint_reader import COMPLETE, WEIGHTS, load_native, recorded_tokenizer, vouch
from deberta_ds.errors import CheckpointError, UserError
from deberta_ds.hf_format import from_hf, hf_state_from_model
from deberta_ds.model import ReplacedTokenDetection
from deberta_ds.native_checkpoint import atomic_save, atomic_write_json, save_native, split_tp


def to_hf(checkpoint, out_dir, part: str = "discriminator") -> Path:
    """Write config.json + model.safetensors for `transformers` from a model or a checkpoint dir."""
    model = checkpoint if isinstance(checkpoint, torch.nn.Module) else load_native(checkpoint)
    hf_config, state = hf_state_from_model(model, part)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save({k: v.detach().contiguous().clone() for k, v in state.items()}, out_dir / WEIGHTS)
    atomic_write_json(hf_config, out_dir / "config.json")
    return out_dir


def export_tokenizer(checkpoint, out_dir, tokenizer: str | None, vocab_size: int) -> None:
    """The tokenizer files beside an export: from --tokenizer, else the one the training run
    recorded (checked against its hash). An export without a tokenizer is an error: transformers
    would otherwise load a 7-token default and tokenise every text into [UNK]s."""
    from deberta_ds.data.tokenizer import load_tokenizer
    from deberta_ds.hf_tokenizer import write_hf_tokenizer

    recorded = recorded_tokenizer(checkpoint)  # compared by hash with a --tokenizer given too
    if tokenizer is None and recorded is None:
        raise CheckpointError(f"--tokenizer: {checkpoint} does not record a tokenizer (a native or converted "
                              "checkpoint); pass --tokenizer DIR, the directory of the spm.model it was trained with")
    path = tokenizer or recorded[0]
    try:
        meta = load_tokenizer(path)[1]
    except FileNotFoundError as error:
        raise CheckpointError(f"--tokenizer: {error}") from None
    if recorded and meta.sha256 != recorded[1]:
        raise CheckpointError(f"--tokenizer: {path} has sha256 {meta.sha256}, but the run was trained with "
                              f"{recorded[1]} ({recorded[0]}); pass --tokenizer with the run's tokenizer")
    if meta.mask_id >= vocab_size:
        raise CheckpointError(f"--tokenizer: {path} has {meta.mask_id + 1} ids, more than the model's vocabulary "
                              f"of {vocab_size}; it is not this model's tokenizer")
    write_hf_tokenizer(path, out_dir)


def export_with_progress(args) -> None:
    """to-hf in its three stages (check and consolidate the weights, the tokenizer, write), with a
    progress bar and its ETA on stderr."""
    from tqdm import tqdm

    with tqdm(total=3, desc="to-hf", unit="stage", file=sys.stderr, dynamic_ncols=True) as bar:
        bar.set_postfix_str("checking and loading the checkpoint")
        model = load_native(args.checkpoint)
        bar.update()
        bar.set_postfix_str("tokenizer")
        config = model.config.discriminator if isinstance(model, ReplacedTokenDetection) else model.config
        export_tokenizer(args.checkpoint, args.out, args.tokenizer, config.vocab_size)  # both parts share it
        bar.update()
        bar.set_postfix_str("writing the weights")
        to_hf(model, args.out, args.part)
        bar.update()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deberta_ds.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    from_cmd = commands.add_parser("from-hf", help="HF DebertaV2 checkpoint -> deberta_ds checkpoint")
    from_cmd.add_argument("--hf", required=True, help="HF checkpoint directory (the discriminator, or any encoder)")
    from_cmd.add_argument("--generator", help="HF generator checkpoint directory: build an RTD pair")
    from_cmd.add_argument("--rtd", action="store_true", help="build an RTD pair even without a generator")
    from_cmd.add_argument("--embedding-sharing", default="gdes", choices=["gdes", "es", "nes"],
                          help="embedding sharing of the RTD pair (default gdes)")
    from_cmd.add_argument("--out", required=True, help="output deberta_ds checkpoint directory")
    to_cmd = commands.add_parser("to-hf", help="deberta_ds checkpoint -> HF DebertaV2 checkpoint")
    to_cmd.add_argument("--checkpoint", required=True, help="deberta_ds checkpoint directory")
    to_cmd.add_argument("--out", required=True, help="output HF checkpoint directory")
    to_cmd.add_argument("--part", default="discriminator", choices=["discriminator", "generator"],
                        help="which model of an RTD pair to export (default discriminator)")
    to_cmd.add_argument("--tokenizer", help="tokenizer directory (spm.model + tokenizer.json of data_prep) to "
                                            "export beside the model (default: the one a training run recorded)")
    onnx_cmd = commands.add_parser("to-onnx", help="deberta_ds checkpoint -> ONNX discriminator (dynamic batch "
                                                   "and length; hidden states and RTD logits)")
    onnx_cmd.add_argument("--checkpoint", required=True, help="deberta_ds checkpoint or training run")
    onnx_cmd.add_argument("--out", required=True, help="output .onnx file")
    split_cmd = commands.add_parser("split-tp", help="TP = 1 RTD checkpoint -> N tensor-parallel shards")
    split_cmd.add_argument("--checkpoint", required=True, help="deberta_ds checkpoint or training output_dir")
    split_cmd.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    split_cmd.add_argument("--out", required=True, help="output directory (weights_tp{r}.safetensors)")
    vouch_cmd = commands.add_parser("vouch", help="record the files of a training checkpoint step folder as they are "
                                                  "now in its COMPLETE marker: the explicit way to accept an old "
                                                  "checkpoint whose marker records no hashes")
    vouch_cmd.add_argument("--checkpoint", required=True, help="a step folder (OUTPUT/checkpoints/step_N)")
    args = parser.parse_args(argv)
    out = Path(getattr(args, "out", "") or ".")
    if args.command not in ("to-onnx", "vouch") and out.exists() and not out.is_dir():
        print(f"error: --out {args.out} is a file; name a directory to write the checkpoint into", file=sys.stderr)
        return 2
    if args.command == "to-onnx" and out.is_dir():
        print(f"error: --out {args.out} is a directory; name the .onnx file to write", file=sys.stderr)
        return 2
    try:
        if args.command == "from-hf":
            model = from_hf(args.hf, args.generator, as_rtd=args.rtd, embedding_sharing=args.embedding_sharing)
            save_native(model, args.out)
        elif args.command == "split-tp":
            split_tp(args.checkpoint, args.out, args.tp)
        elif args.command == "to-onnx":
            from deberta_ds.onnx_export import export_onnx
            export_onnx(load_native(args.checkpoint), args.out)
        elif args.command == "vouch":
            count = vouch(Path(args.checkpoint))
            print(f"recorded {count} files of {args.checkpoint} in its {COMPLETE} marker, as they are now: from "
                  "here on every load checks them")
            return 0
        else:
            export_with_progress(args)
    except UserError as error:  # a bad checkpoint or flag; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
