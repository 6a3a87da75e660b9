"""Rehearse a multi-host run on one machine: N local JAX processes of D fake CPU devices each.

  python -m rlhb_jax.infra.launch --num_processes 2 --devices_per_process 4 -- \\
      --config configs/default.py --workdir DIR --config.mesh.shape=2,2,2

Every process runs `python -m rlhb_jax.main` with the arguments after `--`, joined into one job
through a coordinator on a free local port (`config.distributed.*`; CPU collectives over gloo), so
the N x D devices form one mesh exactly as the hosts of a pod do. Output lines are prefixed with
the process index. When one process fails the others are ended, and the launcher exits with the
failed process's status (non-zero); it exits 0 when all succeed.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def commands(args: list[str], num_processes: int, port: int) -> list[list[str]]:
  return [
    [
      sys.executable,
      "-m",
      "rlhb_jax.main",
      *args,
      f"--config.distributed.coordinator=127.0.0.1:{port}",
      f"--config.distributed.num_processes={num_processes}",
      f"--config.distributed.process_id={i}",
    ]
    for i in range(num_processes)
  ]


def _relay(i: int, stream, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      sys.stdout.write(f"[{i}] {line}")
      sys.stdout.flush()


def _end(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
  """SIGTERM to the processes still running, SIGKILL to any left after `grace` seconds."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(args: list[str], num_processes: int, devices_per_process: int) -> int:
  """Runs the job; the exit status of the first process to fail, or 0."""
  env = process_env(devices_per_process)
  lock = threading.Lock()
  procs, relays = [], []
  for i, cmd in enumerate(commands(args, num_processes, free_port())):
    p = subprocess.Popen(
      cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    procs.append(p)
    relays.append(threading.Thread(target=_relay, args=(i, p.stdout, lock), daemon=True))
    relays[-1].start()
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed:
        status = failed[0].returncode
        with lock:
          print(
            f"[launch] process {procs.index(failed[0])} exited with {status}; ending the others",
            flush=True,
          )
        _end(procs)
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    _end(procs)
    status = 130
  for t in relays:
    t.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode), 0)
  return 1 if status < 0 else status  # killed by a signal: still a failure


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if "--" not in argv:
    raise SystemExit(
      "usage: python -m rlhb_jax.infra.launch [options] -- <rlhb_jax.main arguments>"
    )
  split = argv.index("--")
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num_processes", type=int, default=2)
  ap.add_argument("--devices_per_process", type=int, default=4)
  opts = ap.parse_args(argv[:split])
  if opts.num_processes < 1 or opts.devices_per_process < 1:
    raise SystemExit("--num_processes and --devices_per_process must be >= 1")
  sys.exit(launch(argv[split + 1 :], opts.num_processes, opts.devices_per_process))


if __name__ == "__main__":
  main()
