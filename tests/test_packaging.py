"""A wheel carries what a run reads: installed (not editable, no checkout on the path), every shipped recipe
and DeepSpeed configuration loads from the installed package, and `--config NAME` finds a recipe there."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in the installed copy, from a folder that holds no checkout.
LOAD_EVERYTHING = """
import json, sys
import deberta_ds
from deberta_ds.resources import config_path, ds_config_file, ds_config_names, recipe_names
from deberta_ds.training.ds_config import build_ds_config
from deberta_ds.training.run_config import load_run_config

loaded = {"package": deberta_ds.__file__, "recipes": {}, "ds_configs": {}}
for name in recipe_names():
    config = load_run_config(name)
    data_parallel = config.train.global_batch_size // config.train.micro_batch_size
    ds = build_ds_config(config, data_parallel_size=data_parallel, lr=config.optim.lr, on_cpu=False)
    loaded["recipes"][name] = [str(config_path(name)), config.model, ds["zero_optimization"]["stage"]]
for name in ds_config_names():
    loaded["ds_configs"][name] = json.loads(ds_config_file(name).read_text())["zero_optimization"]["stage"]
print(json.dumps(loaded))
"""


def _build_and_install(tmp_path: Path) -> Path:
    """The wheel of a copy of the sources (the checkout stays clean), installed into a fresh target folder."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("deberta_ds", "data_prep"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("setup.py", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w", str(tmp_path / "wheel")],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("deberta_ds-*.whl")
    target = tmp_path / "installed"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, cwd=tmp_path)
    return target


def test_an_installed_wheel_loads_every_recipe_and_deepspeed_configuration(tmp_path):
    target = _build_and_install(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", LOAD_EVERYTHING], capture_output=True, text=True, cwd=elsewhere,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(loaded["package"]).is_relative_to(target)           # the installed copy, not the checkout
    shipped_recipes = sorted(str(p.relative_to(REPO / "deberta_ds" / "recipes").with_suffix(""))
                             for p in (REPO / "deberta_ds" / "recipes").rglob("*.yaml"))
    assert sorted(loaded["recipes"]) == shipped_recipes and "quickstart" in shipped_recipes
    for name, (path, model, stage) in loaded["recipes"].items():
        assert Path(path).is_relative_to(target), name
        assert model in ("tiny", "xsmall", "small", "base", "large") and stage in (0, 1, 2, 3)
    shipped_configs = sorted(p.stem for p in (REPO / "deberta_ds" / "ds_configs").glob("*.json"))
    assert sorted(loaded["ds_configs"]) == shipped_configs and len(shipped_configs) == 15
    assert all(loaded["ds_configs"][name] == int(name[4]) for name in shipped_configs)  # zero{stage}_...

    unknown = subprocess.run([sys.executable, "-m", "deberta_ds.resources", "recipe", "huge"], capture_output=True,
                             text=True, cwd=elsewhere, env=env, timeout=120)
    assert unknown.returncode == 2 and "--config huge: neither a file nor a shipped recipe" in unknown.stderr
    assert "extend/base_2048" in unknown.stderr
