"""Reliability on a real local Ray cluster: exact resume, worker-failure recovery, SIGTERM and Ctrl-C, atomic
checkpoints, non-finite losses, and the security defaults."""

from __future__ import annotations

import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytune_llm.config import load_config
from raytune_llm.train.driver import UserError, run_training
from tests._runs import TWO_WORKERS, assert_resumed_from, joining_env, logged_losses, small_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "data.num_examples=400",
    "data.eval_examples=0",
    "export.formats=[]",
    "train.max_steps=20",
    "train.checkpoint_every=10",
    "train.log_every=1",
    "train.warmup_steps=2",
]


def _cfg(out: Path, name: str, *extra: str):
    return small_config(out, name, SMALL, *extra)


_losses = logged_losses


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("rel")


# The runs of the SIGTERM / resume test: one worker, 100 steps, so that the SIGTERM lands long before the end (a step
# takes ~50 ms here) while the run it is resumed against is the same schedule. checkpoint_every does not change what
# a run computes, and each run sets its own.
ONE_WORKER = ["train.num_workers=1", "train.max_steps=100"]


class _Flag:
    """The stop flag actor's handle as `stop_on_signals` uses it: ``set.remote()`` answers whether a step has run."""

    def __init__(self, stepped):
        self.set, self.calls, self.stepped = self, 0, stepped

    def remote(self):
        self.calls += 1
        if isinstance(self.stepped, Exception):
            raise self.stepped
        return self.stepped


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("stepped", [True, TimeoutError("no answer")])  # no answer: the path that loses nothing
def test_sigterm_and_ctrl_c_ask_for_a_checkpoint_then_a_second_stops_now(sig, stepped):
    from raytune_llm.train.driver import stop_on_signals

    flag, logged = _Flag(stepped), []
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(KeyboardInterrupt), stop_on_signals(flag, logged.append, get=lambda x: x) as received:
        os.kill(os.getpid(), sig)
        time.sleep(0.1)
        assert received == [sig.name] and flag.calls == 1 and logged[0].startswith(f"[raytune-llm] {sig.name}: ")
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, either: stop now
        time.sleep(5)
    assert flag.calls == 1
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers before it are back


def test_a_signal_before_the_first_step_stops_at_once():
    # the workers still loading the model: nothing to save, so the first Ctrl-C does not wait for the load
    from raytune_llm.train.driver import stop_on_signals

    flag, logged = _Flag(False), []
    with pytest.raises(KeyboardInterrupt), stop_on_signals(flag, logged.append, get=lambda x: x):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert flag.calls == 1 and logged == ["[raytune-llm] SIGINT before the first step: nothing to save, stopping now"]


@pytest.mark.ray
def test_the_stop_flag_actor_answers_whether_a_step_ran(ray_session):
    import ray

    from raytune_llm.train.driver import make_stop_flag

    flag = make_stop_flag()
    assert ray.get(flag.is_set.remote()) is False
    assert ray.get(flag.set.remote()) is False and ray.get(flag.is_set.remote()) is True
    flag.step_done.remote()  # what rank 0 sends once its first step is done
    assert ray.get(flag.set.remote()) is True
    ray.kill(flag)


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_then_resume_in_new_process_is_bitwise_then_nan_stops(ray_session, out, tmp_path, monkeypatch, capsys):
    """Three fits prove three things:

    1. `full1`, uninterrupted (in this process): the reference curve.
    2. `term`, the CLI in a new process: Ctrl-C (SIGINT to its process group; SIGTERM takes the same path, as the test
       above shows) once its step-5 checkpoint is written; the workers save a
       checkpoint at the step they reached and stop, the CLI exits 2 naming the step.
    3. `term` resumed in this process (not the one that wrote the checkpoint), a NaN loss injected at the 11th step
       after the stop: the 10 steps before it are bitwise the uninterrupted run's, and the default on_nonfinite=stop
       ends the run at the NaN with nothing saved after it.
    """
    run_training(_cfg(out, "full1", *ONE_WORKER, "train.checkpoint_every=0"))
    full = _losses(out / "full1")
    assert sorted(full) == list(range(1, 101))

    from raytune_llm.train.worker import latest_complete

    args = ["train", "conf/quickstart.yaml", f"output_dir={out}", "name=term", *SMALL, *ONE_WORKER]
    args += ["train.checkpoint_every=5"]  # the step-5 checkpoint is the cue (no log forwarding in between)
    log = tmp_path / "term.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "raytune_llm", *args],
            cwd=ROOT,
            env=joining_env(ray_session),  # a new process (no second cluster start)
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
    train = out / "term" / "ray" / "train"
    deadline = time.time() + 400
    while latest_complete(train) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: every process of the group gets it, as from a terminal
    proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == 2, text[-3000:]
    stopped = re.search(r"stopped at step (\d+) on SIGINT", text)
    assert stopped, text[-3000:]
    stop = int(stopped.group(1))
    saved = json.loads((latest_complete(train) / "trainer_state.json").read_text())
    assert saved["stopped_early"] and saved["step"] == stop >= 5, (saved, stop)  # the SIGTERM's own checkpoint

    nan_at = stop + 11
    assert nan_at <= 100, f"the SIGTERM landed at step {stop} of 100"
    monkeypatch.setenv("RAYTUNE_LLM_FAULT", f"nan:step={nan_at}")
    capsys.readouterr()
    resumed_at = time.time()
    with pytest.raises(RuntimeError, match=f"non-finite loss nan at step {nan_at}; parameters left unchanged"):
        # a checkpoint right before the NaN holds the resumed steps
        run_training(_cfg(out, "term", *ONE_WORKER, f"train.checkpoint_every={nan_at - 1}"))
    monkeypatch.delenv("RAYTUNE_LLM_FAULT")
    assert "resuming from" in capsys.readouterr().out
    ckpt = latest_complete(train)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == nan_at - 1 and not state["stopped_early"], state  # nothing was saved after the NaN
    rows = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, nan_at))  # each step once
    # steps up to the stop were trained by the SIGTERMed run, the rest by the resumed one (not trained again)
    assert all((r["time"] < resumed_at) == (r["step"] <= stop) for r in rows), (stop, [r["time"] for r in rows])
    for r in rows:
        assert r["loss"] == full[r["step"]], (r["step"], r["loss"], full[r["step"]])  # bitwise


@pytest.mark.ray
@pytest.mark.slow
def test_resume_refuses_other_seed_or_seq_len(ray_session, out):
    if not (out / "full1").exists():
        run_training(_cfg(out, "full1", *ONE_WORKER, "train.checkpoint_every=0"))
    with pytest.raises(UserError, match="seed"):
        run_training(_cfg(out, "full1", *ONE_WORKER, "train.seed=1", "train.max_steps=130"))
    with pytest.raises(UserError, match="seq_len"):
        run_training(_cfg(out, "full1", *ONE_WORKER, "data.seq_len=64", "train.max_steps=130"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_finished_run_run_again_trains_nothing_and_exports_what_it_lacks(ray_session, out, capsys):
    if not (out / "full1").exists():
        run_training(_cfg(out, "full1", *ONE_WORKER, "train.checkpoint_every=0"))
    run = out / "full1"
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    began = time.time()
    summary = run_training(_cfg(out, "full1", *ONE_WORKER, "train.checkpoint_every=0", "export.formats=[adapter]"))
    took = time.time() - began
    text = capsys.readouterr().out
    assert "already trained to step 100" in text and "exporting adapter" in text, text
    assert "resuming from" not in text and "ray:" not in text  # no Ray, no training
    assert summary["steps"] == 100 and (run / "metrics.jsonl").read_bytes() == metrics
    assert (Path(summary["exports"]["adapter"]) / "adapter_config.json").is_file(), summary["exports"]
    again = run_training(_cfg(out, "full1", *ONE_WORKER, "export.formats=[adapter]"))
    assert "its exports are in place" in capsys.readouterr().out and again["exports"] == summary["exports"]
    assert took < 60, took


@pytest.mark.ray
@pytest.mark.slow
def test_worker_kill_restarts_once_and_matches_then_ends_run_with_cause(ddp_two_workers, out, monkeypatch):
    """Worker 1 is killed before step 7 and Ray Train restarts the group (train.max_failures=1), which resumes from
    the step-4 checkpoint and trains on the uninterrupted curve; killed again before step 9, past the limit, the run
    ends at once naming the cause. The uninterrupted run is the session's 2-worker DDP run (conftest.ddp_two_workers,
    also the ZeRO tests' reference): the same config, 10 steps (checkpoint_every does not change what a run
    computes). A run that completes after a restart is the ZeRO-3 test's (tests/test_train_zero.py)."""
    full = _losses(ddp_two_workers)
    monkeypatch.setenv("RAYTUNE_LLM_FAULT", "kill:rank=1:step=7,9")
    with pytest.raises(RuntimeError, match="training failed") as exc:
        run_training(small_config(out, "kill2", TWO_WORKERS, "train.max_failures=1", "train.checkpoint_every=4"))
    failed = time.time()
    run = out / "kill2"
    assert failed - (run / ".fault_fired_1_9").stat().st_mtime < 120  # the second kill ended the run quickly
    cause = str(exc.value).lower()
    # Which report arrives first is a race: the controller's health check, or the surviving rank's gloo error
    # about its dead peer ("reset by peer", or "closed by peer ... a remote worker crashing", seen on a busy CPU).
    words = ("exit", "died", "health check failed", "connection reset by peer", "closed by peer")
    assert any(w in cause for w in words), str(exc.value)[:500]
    from raytune_llm.train.worker import latest_complete

    ckpt = latest_complete(run / "ray" / "train")  # step 8: steps 5-8 were trained by the restarted group
    got = _losses(ckpt)
    assert sorted(got) == list(range(1, 9))  # each step once
    assert_resumed_from(ckpt, run / ".fault_fired_1_7", 4)  # the first kill happened; resumed at 4
    for step in got:
        assert abs(got[step] - full[step]) <= 1e-6, (step, got[step], full[step])


@pytest.mark.ray
@pytest.mark.slow
def test_nonfinite_loss_skip_then_abort_after_3_in_a_row(ray_session, out, monkeypatch):
    """One run of on_nonfinite=skip: NaN at step 3 (skipped and counted), step 4 trains and checkpoints, NaN at
    5-7 aborts at the third in a row. The default `stop` is proven by the resumed run of the SIGTERM test."""
    monkeypatch.setenv("RAYTUNE_LLM_FAULT", "nan:step=3,5-7")
    skip = ["train.num_workers=1", "train.on_nonfinite=skip", "train.max_steps=10", "train.checkpoint_every=4"]
    with pytest.raises(RuntimeError, match=r"3 non-finite losses in a row \(last at step 7\)"):
        run_training(_cfg(out, "nanskip", *skip))
    from raytune_llm.train.worker import latest_complete

    ckpt = latest_complete(out / "nanskip" / "ray" / "train")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["skipped_steps"] == 1, state  # step 3 counted as skipped
    assert sorted(_losses(ckpt)) == [1, 2, 4]  # skipped, not logged as a trained step; step 4 trained on


# One process pays the imports and builds the model once, then forks a fresh writer per kill: the child saves
# checkpoints back to back until it is SIGKILLed, so each kill lands at a random moment inside a save.
_WRITER = r"""
import os, sys, torch
from pathlib import Path
torch.set_num_threads(1)
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from raytune_llm.train.worker import save_checkpoint
root = Path(sys.argv[2])
model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(r=8, target_modules=["q_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
print("ready", flush=True)
for line in sys.stdin:
    step = int(line)
    pid = os.fork()
    if pid == 0:
        while True:
            step += 1
            save_checkpoint(root / f"ckpt_{step:05d}", model, opt, sch, {"step": step}, [{"step": step, "loss": 1.0}])
    print(pid, flush=True)
    os.waitpid(pid, 0)  # returns once the test has SIGKILLed it
    print("reaped", flush=True)
"""


def test_checkpoint_writer_killed_at_20_random_moments(tmp_path):
    from raytune_llm.models.tiny import build_tiny_model
    from raytune_llm.train.worker import is_complete, latest_complete

    model = build_tiny_model(tmp_path / "m", hidden_size=32, intermediate_size=64)
    root = tmp_path / "ckpts"
    rng = random.Random(0)
    last_step = 0
    server = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(model), str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout.readline().strip() == "ready"
    for _ in range(20):
        server.stdin.write(f"{last_step}\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(pid, signal.SIGKILL)
        assert server.stdout.readline().strip() == "reaped"
        complete = sorted(
            (json.loads((p / "trainer_state.json").read_text())["step"], p)
            for p in root.glob("ckpt_*")
            if not p.name.endswith(".partial") and is_complete(p)
        )
        best = latest_complete(root)
        if complete:
            assert best == complete[-1][1]
            last_step = complete[-1][0]
            assert (best / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        else:
            assert best is None
    server.stdin.close()
    server.wait(timeout=60)
    assert last_step > 0


# the ports the agents persist in the session folder once their servers are up (-1: not started)
_AGENT_PORT_FILES = (
    "gcs_server_port",
    "runtime_env_agent_port",
    "metrics_agent_port",  # the dashboard agent's gRPC server
    "metrics_export_port",  # its Prometheus endpoint
    "dashboard_agent_listen_port",  # its HTTP server (52365; -1 when another cluster on the machine holds it)
)


def _session_processes(session: str) -> dict:
    """pid -> psutil.Process for the driver and every process of Ray session `session`: the daemons that name
    the session folder on their command line (gcs_server, raylet, monitors) and their descendants (the agents and
    the workers, which rename themselves ray::...)."""
    import psutil

    procs = {os.getpid(): psutil.Process()}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if session in " ".join(p.info["cmdline"] or []):
                procs[p.pid] = p
                procs.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:  # exited meanwhile
            continue
    return procs


def _listeners(session: str) -> list[tuple[str, int, str, int]]:
    """(process name, pid, ip, port) of every listening TCP socket of the session's processes."""
    import psutil

    rows = []
    for pid, p in _session_processes(session).items():
        try:
            name = p.name()
            conns = p.net_connections(kind="inet")
        except psutil.Error:  # a worker that exited meanwhile
            continue
        rows += [(name, pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return sorted(rows)


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (::ffff:127.x.x.x) on a dual-stack socket."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _table(rows) -> str:
    return "\n".join(f"  {name} (pid {pid}) {ip} port {port}" for name, pid, ip, port in rows)


@pytest.mark.ray
def test_local_cluster_listens_on_loopback_only(ray_session):
    """Every listening socket of the local cluster is on loopback: gcs_server, raylet, the core workers of driver
    and workers, the dashboard agent's gRPC / HTTP / metrics servers, the runtime env agent, the metrics ports of
    the autoscaler monitor and the dashboard head. No dashboard HTTP server; token auth on.

    Ray 2.60 has no bind setting; its servers pick loopback when the node IP is exactly 127.0.0.1, which
    `driver.start_local_ray` (the conftest's `ray_session` too) arranges. See its docstring."""
    ray = ray_session
    assert ray.util.get_node_ip_address() == "127.0.0.1", "the shared cluster was not started by start_local_ray"
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    node = ray.get_runtime_context().get_node_id()
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while len(ports) < len(_AGENT_PORT_FILES) and time.monotonic() < deadline:
        for name in _AGENT_PORT_FILES:
            try:
                ports[name] = int((session_dir / f"{name}_{node}").read_text())
            except (OSError, ValueError):  # not written yet
                time.sleep(0.2)
    assert set(ports) == set(_AGENT_PORT_FILES), f"agents not up after 60 s: {ports}"

    @ray.remote
    def pid() -> int:
        return os.getpid()

    worker = ray.get(pid.remote())  # at least one worker's core worker server is listening
    rows = _listeners(session_dir.name)
    listed = {(p, port) for _, p, _, port in rows}
    names = {name for name, *_ in rows}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, _table(rows)
    assert any(p == worker for p, _ in listed), f"worker {worker} not found\n{_table(rows)}"
    missing = [f"{k}={v}" for k, v in ports.items() if v > 0 and v not in {port for _, port in listed}]
    assert not missing, f"ports the session recorded but no listener of ours holds: {missing}\n{_table(rows)}"
    offenders = [r for r in rows if not _is_loopback(r[2])]
    assert not offenders, f"listening on a non-loopback address:\n{_table(offenders)}\nall:\n{_table(rows)}"

    # include_dashboard=False still starts dashboard.py as a head with only the usage-stats module and no HTTP
    # server: it may hold its Prometheus port, nothing else
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    head = {pid for pid, p in _session_processes(session_dir.name).items() if "dashboard/dashboard.py" in _cmdline(p)}
    served = [r for r in rows if r[3] == 8265 or r[1] in head and r[3] != DASHBOARD_METRIC_PORT]
    assert not served, f"a dashboard HTTP server is listening:\n{_table(served)}"
    assert os.environ.get("RAY_AUTH_MODE") == "token"
    assert (Path.home() / ".ray" / "auth_token").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_training_listens_on_loopback_only(ray_session, tmp_path):
    """During a 2-worker Ray Train fit (gloo on CPU) with our `LoopbackTorchConfig` every listener of the session
    is on loopback: the cluster's, rank 0's TCPStore on MASTER_PORT (Ray's own torch backend leaves it on "::",
    torch having no bind address) and both ranks' gloo pairs (on the host name's address otherwise)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytune_llm.train.loopback import LoopbackTorchConfig

    ray = ray_session
    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    out = tmp_path / "listeners.json"

    def loop(config):
        import torch.distributed as dist

        pids = [None, None]
        dist.all_gather_object(pids, os.getpid())  # and every rank's gloo pairs are listening
        if dist.get_rank() == 0:
            seen = {"pids": pids, "store": int(os.environ["MASTER_PORT"]), "rows": _listeners(session)}
            Path(config["out"]).write_text(json.dumps(seen))
        dist.barrier()  # the store and the pairs stay up until rank 0 has listed them

    TorchTrainer(
        loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="listeners"),
        torch_config=LoopbackTorchConfig(),
    ).fit()
    seen = json.loads(out.read_text())
    rows = [tuple(r) for r in seen["rows"]]
    rank0, rank1 = seen["pids"]
    assert any(r[1] == rank0 and r[3] == seen["store"] for r in rows), f"no store listener found\n{_table(rows)}"
    assert any(r[1] == rank1 for r in rows), f"rank 1 (pid {rank1}) not listed\n{_table(rows)}"
    offenders = [r for r in rows if not _is_loopback(r[2])]
    assert not offenders, f"listening on a non-loopback address:\n{_table(offenders)}\nall:\n{_table(rows)}"


def test_no_unsafe_deserialisation_in_source():
    problems = []
    for path in sorted((ROOT / "raytune_llm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("torch.load") or name == "load" and "torch" in path.read_text():
                kw = {k.arg: k.value for k in node.keywords}
                if name.endswith("torch.load") and not (
                    "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value
                ):
                    problems.append(f"{path}:{node.lineno} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "cloudpickle.load", "dill.load", "eval", "exec"):
                problems.append(f"{path}:{node.lineno} {name}")
    assert not problems, "\n".join(problems)


def test_trust_remote_code_off_by_default():
    assert load_config(None).model.trust_remote_code is False


def test_a_local_ray_cluster_that_does_not_start_is_one_line():
    # Ray's own refusal (here of an object store below its minimum, raised before any process starts) reaches the
    # user as a UserError, which the CLI prints as one line, not as Ray's traceback.
    code = (
        "from raytune_llm.train.driver import UserError, start_local_ray\n"
        "try:\n    start_local_ray(object_store_memory=1)\n"
        "except UserError as exc:\n    print('USER', exc)\n"
    )
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert "USER a local Ray cluster did not start: ValueError:" in out.stdout, out.stderr[-2000:]
    assert "\n" not in out.stdout.strip()
