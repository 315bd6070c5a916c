"""Cluster runs: cluster.yaml passes Ray's own validation, and `ray job submit` of the quickstart works on a
real two-node cluster (`ray start --head` + `ray start --address`, both on 127.0.0.1, token auth on)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["idle_timeout_minutes"] > 0 and config["setup_commands"] and config["file_mounts"]
    # bash expands ~ only outside quotes: pip was given "~/raytune_llm[...]" as a literal path until session 26
    assert not any('"~' in c for c in config["setup_commands"]), config["setup_commands"]
    gpu_types = [t for t, spec in config["available_node_types"].items() if t != config["head_node_type"]]
    assert gpu_types
    config["available_node_types"][gpu_types[0]]["not_a_field"] = 1
    with pytest.raises(Exception, match="not_a_field"):
        validate_config(prepare_config(config))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_job_submit_quickstart_on_two_nodes(tmp_path):
    bindir = Path(sys.executable).parent
    ray_bin = shutil.which("ray", path=str(bindir)) or "ray"
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        RAYTUNE_LLM_PROGRESS="0",
    )
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    # Own session folder (never collides with the test session's cluster), short: AF_UNIX paths max 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rtj", dir="/tmp"))
    temp2 = Path(tempfile.mkdtemp(prefix="rtw", dir="/tmp"))

    def ray(*args, timeout=180, check=True):
        out = subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    out_dir = tmp_path / "runs"
    try:
        ray(
            "start",
            "--head",
            # No --node-ip-address: Ray's detected node IP is where the job agent registers. Each node's agent
            # gets its own HTTP port: the default 52365 is already taken by the first Ray node on the machine
            # (the test session's own cluster), and the head would then have no job agent to submit to.
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--num-cpus=1",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        )
        from ray.util import get_node_ip_address

        ray(
            "start",
            f"--address={get_node_ip_address()}:{gcs}",
            "--num-cpus=1",
            f"--dashboard-agent-listen-port={_free_port()}",
            # its own session folder: two nodes on one machine sharing one would let the second node's runtime-env
            # agent delete the job's working directory under the running driver
            f"--temp-dir={temp2}",
        )
        entry = [
            "python",
            "-m",
            "raytune_llm",
            "train",
            "conf/quickstart.yaml",
            f"output_dir={out_dir}",
            "name=jobrun",
            "train.num_workers=2",
            "train.cpus_per_worker=0.5",
            "train.placement_strategy=STRICT_SPREAD",
            "train.max_steps=20",
            "train.checkpoint_every=10",
            "data.num_examples=800",
            "data.eval_examples=20",
            "export.formats=[adapter]",
        ]
        runtime_env = {"excludes": [".venv", ".whl", "runs", ".git"], "env_vars": {"RAYTUNE_LLM_PROGRESS": "0"}}
        submit = [
            "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}",
            f"--runtime-env-json={json.dumps(runtime_env)}", "--", *entry,
        ]  # fmt: skip
        for _ in range(30):  # the head's job agent needs a few seconds after `ray start` on a busy machine
            sub = ray(*submit, timeout=900, check=False)
            if "No available agent" not in sub.stdout + sub.stderr:
                break
            time.sleep(5)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        assert "succeeded" in sub.stdout.lower(), sub.stdout[-3000:]
        job_id = re.search(r"raysubmit_\w+", sub.stdout).group(0)
        logs = ray("job", "logs", f"--address=http://127.0.0.1:{dash}", job_id).stdout
        nodes = set(re.findall(r"worker rank \d/2 on node (\w+)", logs))
        assert len(nodes) == 2, f"workers were not placed one per node: {nodes}\n{logs[-3000:]}"
        assert "ray: joined" in logs  # the job's driver joined the running cluster instead of starting one
        run = out_dir / "jobrun"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == 20 and summary["final_loss"] < summary["first_loss"]
        assert (run / "adapter" / "adapter_model.safetensors").exists()
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 20
        assert list((run / "ray" / "train").glob("checkpoint_*"))  # checkpoints went to the storage path
    finally:
        _stop_cluster(temp, gcs)
        _stop_cluster(temp2, gcs)


def _stop_cluster(temp: Path, gcs: int) -> None:
    """Stop only this test's cluster: `ray stop` would kill every Ray process on the machine."""
    import psutil

    port = re.compile(rf":{gcs}\b")  # the head's GCS port appears in every process of this cluster
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if (str(temp) in cmd or port.search(cmd)) and p.pid != os.getpid():
            procs.append(p)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
