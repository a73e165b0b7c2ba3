"""The files that ship inside the package: DeepSpeed configurations and run-config recipes.

They are package data (read through `importlib.resources`), so a wheel, `pip install .` or the
Docker image find them without a checkout. The DeepSpeed configurations live in the checkout's
top-level `ds_configs/` (the design card's layout), which setup.py maps onto the package's
`deberta_ds/ds_configs/` in a wheel; a checkout or an editable install reads the folder itself.
`python -m deberta_ds.resources recipes` lists the recipe names and
`python -m deberta_ds.resources recipe NAME` prints one recipe's file (for shell scripts).
"""

from __future__ import annotations

import sys
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path

from deberta_ds.errors import UserError

_PACKAGE = files("deberta_ds")
RECIPES = _PACKAGE / "recipes"        # NAME.yaml, extend/NAME.yaml


def _ds_configs() -> Traversable:
    """zero{0,1,2,3}[_offload]_{fp32,bf16,fp16}.json: inside an installed package (a wheel, `pip
    install .`, `--target`), else in the checkout beside the package (from a checkout or editable)."""
    installed = _PACKAGE / "ds_configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "ds_configs"


DS_CONFIGS = _ds_configs()


def ds_config_names() -> list[str]:
    return sorted(entry.name.removesuffix(".json") for entry in DS_CONFIGS.iterdir() if entry.name.endswith(".json"))


def ds_config_file(name: str) -> Traversable:
    """The shipped DeepSpeed JSON `name` (without .json)."""
    entry = DS_CONFIGS / f"{name}.json"
    if not entry.is_file():
        raise UserError(f"no shipped DeepSpeed configuration {name!r}; the package holds {ds_config_names()}")
    return entry


def recipe_names() -> list[str]:
    """Every shipped recipe, as `--config` takes it: `base`, `extend/base_2048`, ..."""
    names = []
    for entry in RECIPES.iterdir():
        if entry.is_dir():
            names += [f"{entry.name}/{sub.name[:-5]}" for sub in entry.iterdir() if sub.name.endswith(".yaml")]
        elif entry.name.endswith(".yaml"):
            names.append(entry.name[:-5])
    return sorted(names)


def recipe_file(name: str) -> Traversable:
    """The shipped recipe `name` (`base`, `extend/base_2048`; a trailing .yaml is allowed)."""
    entry = RECIPES.joinpath(*f"{name.removesuffix('.yaml')}.yaml".split("/"))
    if not entry.is_file():
        moved = _moved_recipe(name)
        hint = f"the recipes moved into the package: use --config {moved}; " if moved else ""
        raise UserError(f"--config {name}: neither a file nor a shipped recipe; {hint}"
                        f"recipes: {' '.join(recipe_names())}")
    return entry


def _moved_recipe(path: str) -> str | None:
    """The shipped recipe an old file path names (`launch_scripts/quickstart.yaml`, where the
    recipes once lived, or any folder's `extend/base_2048.yaml`), if any."""
    parts = Path(path.removesuffix(".yaml")).parts
    names = recipe_names()
    return next(("/".join(parts[-n:]) for n in (2, 1) if len(parts) > n and "/".join(parts[-n:]) in names), None)


def config_path(config: str | Path) -> Path:
    """`--config` as a path: an existing file as given, else a shipped recipe's file by name."""
    path = Path(config)
    if path.is_file():
        return path
    with as_file(recipe_file(str(config))) as recipe:  # a real file for an installed (not zipped) package
        return recipe


USAGE = "usage: python -m deberta_ds.resources recipes | recipe NAME"


def main(argv: list[str]) -> int:
    if argv in (["-h"], ["--help"]):
        print(f"{USAGE}\n  recipes      the shipped recipes' names, as --config and RECIPE= take them\n"
              "  recipe NAME  the file of recipe NAME (a file path is printed as given)")
        return 0
    if argv == ["recipes"]:
        print(" ".join(recipe_names()))
        return 0
    if len(argv) == 2 and argv[0] == "recipe":
        try:
            print(config_path(argv[1]))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
