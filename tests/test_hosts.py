"""Several hosts, as local processes through jax.distributed (issue 19, items 3 and 4).

The real command in subprocesses on the tiny config: a process killed with SIGKILL stops the other
within the --host_timeout bound with one line naming it, and the same command resumes; a process
that fails at start-up stops the others with its error; a run checkpointed on 2 processes (after
1 -> 2) resumes on 1 and (marked slow) on 4 with the losses of an uninterrupted run. Every run has
4 CPU devices in all (4 x 1, 2 x 2, 1 x 4), so only the collectives' implementation differs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from tests.test_train import pretrained  # noqa: F401  # pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
HOST_TIMEOUT = 3.0  # seconds; the trainer's default is 60


def _start(num_processes: int, args: list[str], per_process_args=None):
  """The trainer on `num_processes` local processes with 4 // num_processes CPU devices each."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={4 // num_processes}")
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(num_processes):
    extra = [] if num_processes == 1 else [
        f"--num_processes={num_processes}", f"--process_id={i}",
        f"--coordinator_address=127.0.0.1:{port}", f"--host_timeout={HOST_TIMEOUT}"]
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "mim_refiner_jax.train", *args, *extra,
         *(per_process_args[i] if per_process_args else [])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout=240):
  try:
    return [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _run(num_processes, args):
  procs = _start(num_processes, args)
  outs = _finish(procs)
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} of {num_processes} (rc {p.returncode}):\n{out[-3000:]}"
  return outs[0]


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _args(pretrained, workdir, *extra):  # noqa: F811
  # Stage 3 (encoder, heads, EMA, top-k queues all train): 64 examples / batch 16 = 4 steps per
  # epoch, 2 epochs = 8 steps.
  return [f"--config={CONFIG}:stage=3,epochs=2,knn=false", f"--workdir={workdir}",
          f"--config.init.pretrained={pretrained}", "--config.checkpoint.every_steps=2", *extra]


@pytest.fixture(scope="module")
def elastic_prefix(pretrained, tmp_path_factory):  # noqa: F811
  """The uninterrupted run's losses, and a run stopped at step 5 (steps 1-2 on 1 process, 3-5 on
  2)."""
  tmp = tmp_path_factory.mktemp("elastic")
  straight = tmp / "straight"
  _run(1, _args(pretrained, straight))
  want = _losses(straight)
  assert sorted(want) == list(range(1, 9))
  run = tmp / "run"
  _run(1, _args(pretrained, run, "--stop_after_steps=2"))      # steps 1-2 on 1 process
  out = _run(2, _args(pretrained, run, "--stop_after_steps=3"))  # steps 3-5 on 2 (1 -> 2)
  assert "resumed" in out and "at step 2" in out and "processes: 2" in out, out
  return want, run


def _resume_elastic(pretrained, elastic_prefix, tmp_path, num_processes):  # noqa: F811
  want, prefix = elastic_prefix
  run = tmp_path / "run"
  shutil.copytree(prefix, run)
  out = _run(num_processes, _args(pretrained, run))  # steps 6-8
  assert "at step 5" in out and f"processes: {num_processes}" in out, out
  got = _losses(run)
  assert sorted(got) == list(range(1, 9))
  # Same global batches (seed, step) on 4 devices in all; only the collectives differ.
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-5)
  assert (run / "export" / "encoder_refined.th").is_file()


def test_elastic_resume(pretrained, elastic_prefix, tmp_path):  # noqa: F811
  """1 -> 2 -> 1 processes continue the uninterrupted run's losses (item 4)."""
  _resume_elastic(pretrained, elastic_prefix, tmp_path, 1)


@pytest.mark.slow  # four processes on CI's two cores; the same code path as 2 -> 1
def test_elastic_resume_on_four_processes(pretrained, elastic_prefix, tmp_path):  # noqa: F811
  """1 -> 2 -> 4 processes continue the uninterrupted run's losses (item 4)."""
  _resume_elastic(pretrained, elastic_prefix, tmp_path, 4)


@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_stops_the_others_and_the_run_resumes(pretrained, tmp_path, victim):  # noqa: F811
  """kill -9 of process 1 mid-run: process 0 exits with status 3 and one line naming process 1
  within the --host_timeout bound; the same command on both processes resumes (item 3).

  Process 0 hosts JAX's coordination service: when it dies, JAX aborts the other's trainer at once
  (SIGABRT, C++ stacks); its supervisor (supervisor.py) turns that into one line, status 3.
  """
  workdir = tmp_path / "run"
  args = _args(pretrained, workdir, "--config.num_epochs=100")
  procs = _start(2, args)
  survivor = procs[1 - victim]
  try:
    lines = []
    for line in procs[0].stdout:  # process 0 logs; kill as the step-6 checkpoint save starts
      lines.append(line)  # (a save whose collective loses its peer still names the lost process)
      if line.split(" ", 1)[-1].startswith("step 6/"):
        break
    killed_at = time.monotonic()
    procs[victim].send_signal(signal.SIGKILL)
    rest = survivor.communicate(timeout=60)[0]
    seconds = time.monotonic() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  # The bound: --host_timeout plus two watchdog intervals (0.6 s each here) and start-up slack.
  assert seconds < HOST_TIMEOUT + 1.2 + 3, (seconds, rest)
  if victim == 0:
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert survivor.returncode == 3, rest
    assert len(errors) == 1 and errors[0].startswith(
        "error: process 1 of 2 lost JAX's coordination service: process 0"), rest
    assert "Terminating process" not in rest and "Stack" not in rest, rest
    report = errors[0].rsplit("JAX's report: ", 1)[1].rstrip(")")
    with open(report) as f:
      assert "Terminating process because the JAX distributed service" in f.read()
    os.remove(report)
    print(f"kill -9 of process 0 -> process 1 exited {seconds:.1f} s later: {errors[0]}")
    return
  errors = [line for line in rest.splitlines() if line.strip()]
  assert survivor.returncode == 3, "".join(lines) + rest
  assert len(errors) == 1 and errors[0].startswith("error: process 1 of 2 stopped responding"), rest
  print(f"kill -9 of process 1 -> process 0 exited {seconds:.1f} s later: {errors[0]}")

  saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved >= 4
  # The same command resumes; a SIGTERM to process 1 alone (one host's preemption notice) then
  # stops both at one agreed step, each saving its shards of it (JAX's preemption sync point).
  procs = _start(2, args)
  lines = []
  for line in procs[0].stdout:
    lines.append(line)
    if line.split(" ", 1)[-1].startswith(f"step {saved + 2}/"):
      procs[1].send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + _finish(procs)[0]
  assert [p.returncode for p in procs] == [0, 0], out
  assert f"at step {saved}" in out and "preemption notice" in out, out
  stopped = int(out.split("stopping at step ")[1].split(":")[0])
  assert str(stopped) in os.listdir(workdir / "checkpoints"), out
  assert sorted(_losses(workdir)) == list(range(1, stopped + 1))


@pytest.mark.parametrize("failing", [1, 0])  # 0 also hosts the coordination service
def test_start_up_failure_on_one_host_stops_all(pretrained, tmp_path, failing):  # noqa: F811
  """A bad path on one process only: both exit with status 2 and that process's error."""
  missing = str(tmp_path / "missing_weights")
  bad = [f"--config.init.pretrained={missing}"]
  procs = _start(2, _args(pretrained, tmp_path / "run"),
                 per_process_args=[bad, []] if failing == 0 else [[], bad])
  outs = _finish(procs, timeout=120)
  assert [p.returncode for p in procs] == [2, 2], "\n-----\n".join(outs)
  own = outs[failing].strip().splitlines()[-1]
  assert own.startswith(f"error: config.init.pretrained={missing}"), outs[failing]
  other = outs[1 - failing].strip().splitlines()[-1]
  assert other.startswith(f"error: process {failing} of 2 failed: config.init.pretrained="
                          f"{missing}"), outs[1 - failing]
  assert "Traceback" not in outs[0] + outs[1] and "Fatal" not in outs[0] + outs[1]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
