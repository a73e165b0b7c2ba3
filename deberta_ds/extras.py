"""Optional features and the pip extra that installs each (setup.py's extras_require holds their
packages): a command whose feature is not installed stops with one line naming the extra, not
with an ImportError traceback from deep inside it."""

from __future__ import annotations

import importlib

from deberta_ds.errors import UserError


class MissingExtraError(UserError):
    """An optional package is not installed; the message says which extra installs it."""


def require_extra(extra: str, module: str, feature: str) -> None:
    """Import `module` (a package of the extra `extra`), or raise MissingExtraError naming
    `pip install 'deberta_ds[extra]'`. A module that is there but fails on its own imports keeps
    its traceback: that is a broken install, not a missing extra."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module.split(".")[0]:
            raise
        raise MissingExtraError(f"{feature} needs the Python package {module!r}, which is not installed: "
                                f"pip install 'deberta_ds[{extra}]'") from None


# The modules of the `hf` extra that fine-tuning and downstream evaluation import (transformers first:
# the one a plain install lacks most often).
HF_MODULES = ("transformers", "sklearn", "scipy", "seqeval")


def require_hf(feature: str) -> None:
    """Every module of the `hf` extra, or MissingExtraError naming it."""
    for module in HF_MODULES:
        require_extra("hf", module, feature)
