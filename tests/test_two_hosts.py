"""A real two-host launch: two network namespaces with their own addresses (192.0.2.1 and
192.0.2.2, the documentation range) joined by a veth pair, one `deepspeed --no_ssh` launcher in
each. A few steps train across them; then one host's link goes down mid-run: the ranks fail
with a clear error within the run config's collective timeout (plus start-up margin), and a
relaunch resumes from the last complete checkpoint. Needs root and iproute2 (skipped with the
reason where either is missing); the namespaces are removed afterwards."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from deberta_ds.parallel_env import free_port
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
ADDRESSES = ("192.0.2.1", "192.0.2.2")
TIMEOUT_S = 20


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@pytest.fixture
def two_hosts():
    """[(namespace, interface)] for hosts 0 and 1."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to build two hosts from network namespaces")
    tag = f"dds{os.getpid() % 100000}"
    hosts = [(f"{tag}h{i}", f"{tag}v{i}") for i in range(2)]
    try:
        for namespace, _ in hosts:
            _ip("netns", "add", namespace)
        _ip("link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for (namespace, link), address in zip(hosts, ADDRESSES):
            _ip("link", "set", link, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", namespace, "link", "set", link, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
    except RuntimeError as error:
        for namespace, _ in hosts:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {error}")
    yield hosts
    for namespace, _ in hosts:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _launch(hosts, hostfile: Path, config: Path, logs: Path, *overrides: str) -> list[subprocess.Popen]:
    port, processes = str(free_port()), []
    for rank, (namespace, link) in enumerate(hosts):
        log = open(logs / f"host{rank}.log", "w")
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={link}", "deepspeed", "--hostfile",
             str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", ADDRESSES[0], "--master_port",
             port, "--module", "deberta_ds.train", "--config", str(config), *overrides],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return processes


def _wait(processes, deadline_s: float) -> list[int | None]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(0.2)
    codes = [p.poll() for p in processes]
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return codes


@pytest.mark.slow
def test_two_hosts_train_lose_a_link_fail_clearly_and_resume(two_hosts, train_shards, tmp_path):
    run = tiny_run(train_shards, tmp_path / "out", train={"steps": 100000, "save_every": 2, "log_every": 1,
                                                          "collective_timeout_s": TIMEOUT_S})
    config = tmp_path / "run.json"
    config.write_text(json.dumps(run))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("host0 slots=1\nhost1 slots=1\n")
    checkpoints = tmp_path / "out" / "checkpoints"
    processes = _launch(two_hosts, hostfile, config, tmp_path)
    deadline = time.monotonic() + 300
    while not (checkpoints / "step_00000002" / "COMPLETE").exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), (tmp_path / "host0.log").read_text()[-3000:]
        time.sleep(0.05)
    assert (checkpoints / "step_00000002" / "COMPLETE").exists(), "the two hosts never trained 2 steps together"
    _ip("-n", two_hosts[1][0], "link", "set", two_hosts[1][1], "down")  # host 1 drops off the network
    cut = time.monotonic()
    codes = _wait(processes, TIMEOUT_S + 120)
    assert all(code not in (0, None) for code in codes), codes  # both failed, neither hung
    assert time.monotonic() - cut < TIMEOUT_S + 120
    survivor = (tmp_path / "host0.log").read_text()
    assert "lost contact with the other ranks" in survivor and "train.collective_timeout_s=20" in survivor, \
        survivor[-3000:]
    last = (checkpoints / "latest").read_text().strip()
    assert (checkpoints / last / "COMPLETE").exists()
    _ip("-n", two_hosts[1][0], "link", "set", two_hosts[1][1], "up")
    target = int(last.split("_")[1]) + 2
    relaunched = _launch(two_hosts, hostfile, config, tmp_path, f"train.steps={target}")
    assert _wait(relaunched, 300) == [0, 0], (tmp_path / "host0.log").read_text()[-3000:]
    assert f"resumed from {checkpoints / last}" in (tmp_path / "host0.log").read_text()
    assert (checkpoints / "latest").read_text() == f"step_{target:08d}"
    state = json.loads((checkpoints / f"step_{target:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == target
