"""Checkpoint loading that cannot run code from the checkpoint.

`torch.load(weights_only=False)` unpickles anything: a replaced checkpoint file would run
arbitrary code on resume, `to-hf`, `init_from` or `split-tp`. DeepSpeed loads its own files
that way (its checkpoint engine, zero_to_fp32, the universal-checkpoint tools), so every load
of a training checkpoint runs inside `weights_only_loads()`: torch.load is weights-only there
whatever the caller asks, with only the few DeepSpeed classes its files hold allowed besides
tensors and containers. `python -m deberta_ds.safe_load MODULE ARGS...` runs a module
(DeepSpeed's ds_to_universal) the same way.
"""

from __future__ import annotations

import contextlib
import pickle
import runpy
import sys

import torch

from deberta_ds.errors import UserError


class UnsafeCheckpointError(UserError):
    """A checkpoint file holds something other than tensors, containers and the allowed classes."""


class UnreadableCheckpointError(UserError):
    """A checkpoint file is truncated or damaged."""


def _allowed_deepspeed_classes() -> list:
    """What DeepSpeed 0.19's model and optimizer state files hold besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, every torch.load is weights-only (the DeepSpeed classes above allowed);
    a file that holds anything else raises UnsafeCheckpointError naming it, and nothing of it runs."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as error:
            first_line = str(error).strip().splitlines()[0]
            raise UnsafeCheckpointError(f"{f}: refused to load, it holds objects a checkpoint must not hold "
                                        f"({first_line}); was the file replaced?") from None
        except (RuntimeError, EOFError) as error:  # torch's zip reader on a truncated or damaged file
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UnreadableCheckpointError(f"{f}: cannot be read, the file is truncated or damaged "
                                            f"({first_line})") from None

    with torch.serialization.safe_globals(_allowed_deepspeed_classes()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m deberta_ds.safe_load MODULE [ARG ...]: runs `python -m MODULE ARG ...` (a DeepSpeed "
              "tool) with every torch.load weights-only")
        sys.exit(0 if len(sys.argv) > 1 else 2)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    with weights_only_loads():
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
