"""Two processes (2 CPU devices each, jax.distributed) run the stage-3 step like one process does.

The workers (tests/tiny_refiner.py as a script) build a ("data" 2, "fsdp" 2) mesh over the 4
devices, shard the parameters by the "fsdp" rules and each feed half of every batch; the result is
compared with the 1-device reference run in this process, with the tolerances of
test_multidevice.py (tiny_refiner.assert_states_close).
"""

import os
import subprocess
import sys

import numpy as np
import portpicker

from tests import tiny_refiner as tiny


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "tiny_refiner.py")


def test_two_processes_match_one_process(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  np.savez(tmp_path / "initial.npz", **tiny.flat(tiny.initial_state_numpy(3)))
  procs = [subprocess.Popen(
      [sys.executable, WORKER, "--port", str(port), "--process_id", str(i), "--num_processes", "2",
       "--initial", str(tmp_path / "initial.npz"), "--out", str(tmp_path)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    want_state, want_history = tiny.reference_run(3)  # meanwhile (cached if already computed)
    outputs = [p.communicate(timeout=400)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"worker {i} failed (rc {p.returncode}):\n{out[-4000:]}"

  result = dict(np.load(tmp_path / "result.npz"))
  assert int(result.pop("num_devices")) == 4
  np.testing.assert_allclose(result.pop("losses"), [h["loss"] for h in want_history], rtol=1e-5)
  got = {k[len("state/"):]: v for k, v in result.items()}
  want = tiny.flat(want_state)
  assert got.keys() == want.keys()
  tiny.assert_states_close(got, want)
