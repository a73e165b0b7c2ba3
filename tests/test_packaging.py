"""A wheel carries what a run reads: installed (not editable, no checkout on the path), every shipped recipe
and DeepSpeed configuration loads from the installed package, and `--config NAME` finds a recipe there.
An editable install reads the DeepSpeed configurations from the checkout's top-level ds_configs/."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Runs in the installed copy, from a folder that holds no checkout.
LOAD_EVERYTHING = """
import json, sys
import deberta_ds
from deberta_ds.resources import DS_CONFIGS, config_path, ds_config_file, ds_config_names, recipe_names
from deberta_ds.training.ds_config import build_ds_config
from deberta_ds.training.run_config import load_run_config

loaded = {"package": deberta_ds.__file__, "ds_config_folder": str(DS_CONFIGS), "recipes": {}, "ds_configs": {}}
for name in recipe_names():
    config = load_run_config(name)
    data_parallel = config.train.global_batch_size // config.train.micro_batch_size
    ds = build_ds_config(config, data_parallel_size=data_parallel, lr=config.optim.lr, on_cpu=False)
    loaded["recipes"][name] = [str(config_path(name)), config.model, ds["zero_optimization"]["stage"]]
for name in ds_config_names():
    loaded["ds_configs"][name] = json.loads(ds_config_file(name).read_text())["zero_optimization"]["stage"]
print(json.dumps(loaded))
"""


PIP = ["-m", "pip", "--disable-pip-version-check", "--quiet"]
WITHOUT_PYTHONPATH = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _copy_sources(tmp_path: Path) -> Path:
    """A copy of what setup.py packs (the checkout stays clean)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("deberta_ds", "data_prep", "ds_configs"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("setup.py", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, source / name)
    return source


def _build_and_install(tmp_path: Path) -> Path:
    """The wheel of a copy of the sources, installed into a fresh target folder."""
    source = _copy_sources(tmp_path)
    subprocess.run([sys.executable, *PIP, "wheel", "--no-deps", "--no-build-isolation", str(source), "-w",
                    str(tmp_path / "wheel")], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("deberta_ds-*.whl")
    target = tmp_path / "installed"
    subprocess.run([sys.executable, *PIP, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   cwd=tmp_path)
    return target


def _load_everything(python: str, cwd: Path, env: dict) -> dict:
    result = subprocess.run([python, "-c", LOAD_EVERYTHING], capture_output=True, text=True, cwd=cwd, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_installed_wheel_loads_every_recipe_and_deepspeed_configuration(tmp_path):
    target = _build_and_install(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = WITHOUT_PYTHONPATH | {"PYTHONPATH": str(target)}
    loaded = _load_everything(sys.executable, elsewhere, env)
    assert Path(loaded["package"]).is_relative_to(target)           # the installed copy, not the checkout
    assert Path(loaded["ds_config_folder"]) == target / "deberta_ds" / "ds_configs"  # mapped from ds_configs/
    shipped_recipes = sorted(str(p.relative_to(REPO / "deberta_ds" / "recipes").with_suffix(""))
                             for p in (REPO / "deberta_ds" / "recipes").rglob("*.yaml"))
    assert sorted(loaded["recipes"]) == shipped_recipes and "quickstart" in shipped_recipes
    for name, (path, model, stage) in loaded["recipes"].items():
        assert Path(path).is_relative_to(target), name
        assert model in ("tiny", "xsmall", "small", "base", "large") and stage in (0, 1, 2, 3)
    shipped_configs = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
    assert sorted(loaded["ds_configs"]) == shipped_configs and len(shipped_configs) == 15
    assert all(loaded["ds_configs"][name] == int(name[4]) for name in shipped_configs)  # zero{stage}_...

    unknown = subprocess.run([sys.executable, "-m", "deberta_ds.resources", "recipe", "huge"], capture_output=True,
                             text=True, cwd=elsewhere, env=env, timeout=120)
    assert unknown.returncode == 2 and "--config huge: neither a file nor a shipped recipe" in unknown.stderr
    assert "extend/base_2048" in unknown.stderr


def test_an_editable_install_reads_the_top_level_ds_configs(tmp_path):
    """`pip install -e` in a fresh environment (this one's packages visible): the package is the
    checkout's, and the DeepSpeed configurations are its top-level ds_configs/, where they are edited."""
    source = _copy_sources(tmp_path)
    (source / "ds_configs" / "zero9_fp32.json").write_text(json.dumps({"zero_optimization": {"stage": 9}}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, *PIP, "install", "--no-deps", "--no-build-isolation", "-e", str(source)], check=True,
                   cwd=tmp_path, env=WITHOUT_PYTHONPATH)
    loaded = _load_everything(python, tmp_path, WITHOUT_PYTHONPATH)
    assert Path(loaded["package"]) == source / "deberta_ds" / "__init__.py"
    assert Path(loaded["ds_config_folder"]) == source / "ds_configs"
    assert loaded["ds_configs"]["zero9_fp32"] == 9                  # an edit there is what the package reads
    assert len(loaded["recipes"]) == len(list((REPO / "deberta_ds" / "recipes").rglob("*.yaml")))


def _without(tmp_path: Path, *modules: str) -> dict:
    """An environment in which `modules` cannot be imported, as when their extra is not installed."""
    hook = tmp_path / f"without_{'_'.join(modules)}"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({modules!r}))\n")
    return WITHOUT_PYTHONPATH | {"PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}


def test_a_missing_extra_is_named_in_one_line(tmp_path):
    """`finetune` without transformers and `convert to-onnx` without onnx stop before any work, with
    one line naming the extra to install (no traceback, no output file)."""
    from deberta_ds.config import preset
    from deberta_ds.model import Encoder
    from deberta_ds.native_checkpoint import save_native

    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    finetune = subprocess.run([sys.executable, "-m", "deberta_ds.finetune", "--model", str(tmp_path / "model"),
                               "--train", str(tmp_path / "train.tsv"), "--valid", str(tmp_path / "train.tsv"),
                               "--out", str(tmp_path / "ft")], capture_output=True, text=True, cwd=tmp_path,
                              env=_without(tmp_path, "transformers"), timeout=300)
    assert (finetune.returncode, finetune.stderr) == (1, "error: fine-tuning (deberta_ds.finetune) needs the Python "
                                                         "package 'transformers', which is not installed: pip install "
                                                         "'deberta_ds[hf]'\n")
    save_native(Encoder(preset("tiny", vocab_size=256)), tmp_path / "checkpoint")
    onnx = subprocess.run([sys.executable, "-m", "deberta_ds.convert", "to-onnx", "--checkpoint",
                           str(tmp_path / "checkpoint"), "--out", str(tmp_path / "model.onnx")], capture_output=True,
                          text=True, cwd=tmp_path, env=_without(tmp_path, "onnx"), timeout=300)
    assert (onnx.returncode, onnx.stderr) == (2, "error: ONNX export (convert to-onnx) needs the Python package "
                                                 "'onnx', which is not installed: pip install 'deberta_ds[onnx]'\n")
    assert not list(tmp_path.glob("model.onnx*"))


def test_a_broken_install_keeps_its_traceback(tmp_path, monkeypatch):
    """An installed package that fails on a missing dependency of its own is not a missing extra."""
    from deberta_ds.extras import MissingExtraError, require_extra

    (tmp_path / "half_installed").mkdir()
    (tmp_path / "half_installed" / "__init__.py").write_text("import a_dependency_it_lacks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_it_lacks"):
        require_extra("hf", "half_installed", feature="a feature")
    with pytest.raises(MissingExtraError, match=r"a feature needs the Python package 'not_installed_at_all', .*"
                                                r"pip install 'deberta_ds\[hf\]'"):
        require_extra("hf", "not_installed_at_all", feature="a feature")
