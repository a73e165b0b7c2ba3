"""Launch scripts validate their input and build the right deepspeed command; Docker pins agree."""

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deberta_ds.resources import config_path, recipe_names

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch_scripts" / "pretrain.sh"


def pretrain(env: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PRETRAIN), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"} | env, cwd=cwd)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "x_00000.idx").write_bytes(b"")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spm.model").write_bytes(b"")
    return {"TRAIN_SHARDS": str(tmp_path / "shards"), "TOKENIZER": str(tmp_path / "tok"), "NUM_GPUS": "4"}


def test_single_node_dry_run(data):
    result = pretrain(data | {"PRESET": "large", "ZERO_STAGE": "3"}, "--dry-run", "train.steps=5")
    assert result.returncode == 0, result.stderr
    command = result.stdout
    assert command.startswith("deepspeed --num_gpus 4 ")
    for part in ("--module deberta_ds.train", "model=large", "train.zero_stage=3", "train.steps=5",
                 "data.tokenizer="):
        assert part in command


def test_relative_paths_resolve_where_the_user_stands(data, tmp_path):
    """Run from a folder outside the clone with relative paths: every path in the command is that
    folder's, the output lands there, and a relative path that is not there is refused at once."""
    (tmp_path / "valid_00000.idx").write_bytes(b"")
    (tmp_path / "run.yaml").write_text("model: tiny\n")
    relative = {"TRAIN_SHARDS": "shards", "TOKENIZER": "tok", "VALID_SHARDS": "valid", "NUM_GPUS": "2"}
    result = pretrain(relative, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    for part in (f"data.train=[{tmp_path}/shards]", f"data.tokenizer={tmp_path}/tok",
                 f"data.valid=[{tmp_path}/valid]", f"output_dir={tmp_path}/runs/ablation_base"):
        assert part in command, (part, command)
    result = pretrain(relative | {"CONFIG": "run.yaml", "OUTPUT_DIR": "out"}, "--dry-run", cwd=tmp_path)
    command = shlex.split(result.stdout)
    assert command[command.index("--config") + 1] == f"{tmp_path}/run.yaml" and f"output_dir={tmp_path}/out" in command
    result = pretrain(relative, "--dry-run", cwd=REPO)  # the same relative names, from where they are not
    assert result.returncode == 2 and f"TRAIN_SHARDS={REPO}/shards matches nothing" in result.stderr


def test_hostfile_and_per_node_multi_node(data, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("worker-1 slots=8\nworker-2 slots=8\n")
    result = pretrain(data | {"HOSTFILE": str(hostfile), "LAUNCHER": "openmpi"}, "--dry-run")
    assert f"--hostfile {hostfile} --launcher openmpi" in result.stdout
    nodes = tmp_path / "nodes"
    result = pretrain(data | {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "NODES_FILE": str(nodes)},
                      "--dry-run")
    assert "--no_ssh --node_rank 1 --master_addr 10.1.2.3" in result.stdout
    assert nodes.read_text() == "node0 slots=4\nnode1 slots=4\n"


@pytest.mark.parametrize("env_change, message", [
    ({"TRAIN_SHARDS": ""}, "TRAIN_SHARDS is not set"),
    ({"TRAIN_SHARDS": "/nonexistent/shards"}, "matches nothing"),
    ({"TOKENIZER": "/nonexistent"}, "holds no spm.model"),
    ({"PRESET": "huge"}, "PRESET=huge"),
    ({"NUM_GPUS": "two"}, "NUM_GPUS=two"),
    ({"NNODES": "2"}, "needs NODE_RANK"),
])
def test_bad_input_prints_usage(data, env_change, message):
    result = pretrain(data | env_change, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr and "Usage:" in result.stdout


def test_slurm_script_is_valid_bash_and_refuses_outside_slurm():
    script = REPO / "launch_scripts" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "sbatch" in result.stderr
    assert "pretrain.sh" in script.read_text() and "NODE_RANK=\\$SLURM_NODEID" in script.read_text()


def test_dockerfile_installs_the_pinned_requirements():
    dockerfile = (REPO / "Dockerfile").read_text()
    release = re.search(r"^FROM nvcr\.io/nvidia/pytorch:(\d\d)\.(\d\d)-py3$", dockerfile, re.M)
    assert release and int(release[1]) >= 25, "an NGC release from 2025 on (24.10's Triton never met the kernel)"
    assert "pip install --no-cache-dir --no-build-isolation -r requirements.txt" in dockerfile
    assert not re.search(r"(deepspeed|sentencepiece|tensorboard)[=<>]=", dockerfile), "pins belong in requirements.txt"
    pins = dict(re.findall(r"^([a-z_-]+)==(\S+)", (REPO / "requirements.txt").read_text(), re.M))
    assert {"deepspeed", "sentencepiece", "tensorboard"} <= set(pins)
    from setup import requirements  # setup.py reads the same file
    assert [r for r in requirements() if "==" in r] == [f"{k}=={v}" for k, v in pins.items()]
    assert "docker run" in dockerfile and "DS_BUILD_CPU_ADAM=1" in dockerfile


def _setup_keyword(name: str):
    """The literal value of setup(name=...) in setup.py."""
    calls = [node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"]
    return ast.literal_eval(next(k.value for k in calls[0].keywords if k.arg == name))


def test_the_image_copies_what_setup_packs_and_installs_the_feature_extras():
    """Every folder the package is built from (ds_configs/ included) is copied into the image, and
    the install carries the extras of the commands the image runs (finetune: hf, to-onnx: onnx)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, re.M))
    assert all((REPO / path).exists() for path in copied), copied
    packed = {"deberta_ds", "data_prep", *_setup_keyword("package_dir").values()}
    assert packed == {"deberta_ds", "data_prep", "ds_configs"} and packed <= copied
    installed = re.search(r'pip install [^\n]*"\.\[([\w,]+)\]"', dockerfile)
    extras = _setup_keyword("extras_require")
    assert installed and {"hf", "onnx"} <= set(installed[1].split(",")) <= set(extras)
    assert any(r.startswith("transformers") for r in extras["hf"]) and any(r.startswith("onnx") for r in extras["onnx"])


RECIPES = [config_path(name) for name in recipe_names() if "/" not in name and name != "quickstart"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_each_recipe_loads_validates_and_cites_its_numbers(recipe):
    from deberta_ds.config import preset
    from deberta_ds.training.ds_config import build_ds_config
    from deberta_ds.training.run_config import load_run_config

    config = load_run_config(recipe)
    assert config.model == recipe.stem.removeprefix("ablation_")
    preset(config.model, **config.model_overrides)                 # the model section validates too
    ds = build_ds_config(config, data_parallel_size=64, lr=config.optim.lr, on_cpu=False)
    assert ds["train_batch_size"] == config.train.global_batch_size and ds["gradient_clipping"] == 1.0
    assert (config.train.global_batch_size, config.train.steps) == \
        ((2048, 125_000) if recipe.stem.startswith("ablation") else (8192, 500_000))
    for field in ("lr:", "betas:", "eps:", "weight_decay:", "warmup_steps:", "steps:", "global_batch_size:"):
        line = next(line for line in recipe.read_text().splitlines() if line.strip().startswith(field))
        assert re.search(r"#.*(\[paper\]|\[script\]|\[code\]|no from-scratch)", line), (recipe.name, line)


def test_recipe_selects_the_run_config_and_a_bad_recipe_is_named(data, tmp_path):
    result = pretrain(data | {"RECIPE": "large"}, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "recipes/large.yaml" in result.stdout and f"output_dir={tmp_path}/runs/large" in result.stdout
    assert "model=" not in result.stdout                          # the recipe's own model
    result = pretrain(data | {"RECIPE": "huge"}, "--dry-run")
    assert result.returncode == 2
    assert ("RECIPE=huge is not one of: ablation_base base extend/base_2048 extend/base_8192 large quickstart "
            "small xsmall") in result.stderr
    result = pretrain(data | {"RECIPE": "extend/base_2048"}, "--dry-run")
    assert result.returncode == 2 and "give its checkpoint as init_from=DIR" in result.stderr
    result = pretrain(data | {"RECIPE": "extend/base_2048"}, "--dry-run", "init_from=runs/base/checkpoints/x",
                      cwd=tmp_path)
    assert result.returncode == 0 and "recipes/extend/base_2048.yaml" in result.stdout, result.stderr
    assert f"output_dir={tmp_path}/runs/extend/base_2048" in result.stdout


# `--help` of a module README runs, and of each of its subcommands, in one process (runpy, as `python -m`).
HELP_DRIVER = """
import contextlib, io, json, runpy, sys
results = {}
for command in json.loads(sys.argv[1]):
    sys.argv, printed = [command[0], *command[1:], "--help"], io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            runpy.run_module(command[0], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            code = 0 if exit.code is None else exit.code
    results[" ".join(command)] = [code, printed.getvalue()]
print(json.dumps(results))
"""


def _help_of(commands: list[list[str]]) -> dict:
    result = subprocess.run([sys.executable, "-c", HELP_DRIVER, json.dumps(commands)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_command_readme_names_answers_help():
    """Each `python -m MODULE` / `--module MODULE` README names, each subcommand its --help lists,
    and each launch script README runs: --help exits 0 with a usage text, no traceback."""
    readme = (REPO / "README.md").read_text()
    modules = sorted(set(re.findall(r"(?:python -m|--module) ([a-z_][\w.]*)", readme)))
    assert {"data_prep", "deberta_ds.train", "deberta_ds.convert", "deberta_ds.finetune"} <= set(modules)
    helps = _help_of([[module] for module in modules])
    subcommands = [[module, sub] for module in modules
                   for choices in re.findall(r"\{([\w,-]+)\}", helps[module][1])[:1] for sub in choices.split(",")]
    assert len(subcommands) >= 12                                     # data_prep's and convert's
    helps |= _help_of(subcommands)
    for command, (code, printed) in helps.items():
        assert code == 0 and "usage" in printed.lower() and "Traceback" not in printed, (command, code, printed[-500:])
    scripts = sorted(set(re.findall(r"(?:bash|sbatch) (launch_scripts/[\w.]+)", readme)))
    assert len(scripts) >= 5
    for script in scripts:
        result = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=REPO, timeout=60,
                                env={"PATH": "/usr/bin:/bin"})
        header = (REPO / script).read_text().splitlines()[1].lstrip("# ")
        assert result.returncode == 0 and header in result.stdout, (script, result.stdout[-500:], result.stderr[-500:])


def test_an_old_recipe_path_is_named_as_moved():
    from deberta_ds.errors import UserError

    for old, recipe in (("launch_scripts/quickstart.yaml", "quickstart"), ("configs/extend/base_2048.yaml",
                                                                              "extend/base_2048")):
        with pytest.raises(UserError, match=f"--config {old}: neither a file nor a shipped recipe; the recipes moved "
                                            f"into the package: use --config {recipe}; recipes: ablation_base base"):
            config_path(old)
    with pytest.raises(UserError) as error:
        config_path("launch_scripts/huge.yaml")
    assert "moved" not in str(error.value) and "recipes: ablation_base" in str(error.value)
