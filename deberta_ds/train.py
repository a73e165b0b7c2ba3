"""Entry point: `python -m deberta_ds.train` or `deepspeed --module deberta_ds.train` (see training/trainer.py)."""

import sys

from deberta_ds.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
