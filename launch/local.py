"""Start N cooperating processes of a command on this machine (a local "cluster").

Each process gets the environment that ``csq_jax.distributed`` reads
(``CSQ_COORDINATOR=localhost:PORT``, ``CSQ_NUM_PROCESSES=N``,
``CSQ_PROCESS_ID=i``), so ``python -m csq_jax.main`` joins the others through
``jax.distributed.initialize`` and trains one model data-parallel across
them. Output lines are prefixed with ``[pI]``. The launcher waits for all of
them; when one fails, the others are stopped (they would wait forever for its
collectives) and the launcher exits with the failed process's status.

Usage:
  python launch/local.py -n 2 -- python -m csq_jax.main --config=configs/default.py --workdir=/tmp/run
  python launch/local.py -n 2 --cpu_devices=4 -- python -m csq_jax.main ...   # 2 processes x 4 CPU devices
  python launch/local.py -n 4 --gpu_each -- python -m csq_jax.main ...        # one GPU per process

Uses: trying multi-host code paths on one machine (CPU processes talk
through gloo), or one process per GPU on a multi-GPU machine.
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

GRACE_S = 10.0  # after a failure, how long the others get to exit before they are killed


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, port: int, cpu_devices: int | None, gpu_each: bool,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process ``i`` of ``n``."""
  env = dict(os.environ if base is None else base)
  env.update(CSQ_COORDINATOR=f"localhost:{port}", CSQ_NUM_PROCESSES=str(n), CSQ_PROCESS_ID=str(i))
  env["PYTHONUNBUFFERED"] = "1"  # interleave the processes' lines as they come
  if cpu_devices:
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
  if gpu_each:
    env["JAX_LOCAL_DEVICE_IDS"] = str(i)  # read by jax.distributed.initialize
  return env


def _pump(i: int, stream, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"[p{i}] {line}")
      out.flush()
  stream.close()


def run(command: list[str], n: int, port: int | None = None, cpu_devices: int | None = None,
        gpu_each: bool = False, out=None) -> int:
  """Run ``command`` as ``n`` processes; returns 0, or the first failure's
  exit status (negative: killed by that signal)."""
  out = sys.stdout if out is None else out
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  for i in range(n):
    p = subprocess.Popen(command, env=process_env(i, n, port, cpu_devices, gpu_each), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(p)
    pumps.append(threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True))
    pumps[-1].start()
  status = 0
  try:
    while None in [p.poll() for p in procs]:  # a list: poll every process, each time
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0]
        _stop(procs)
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    _stop(procs)
    status = 130
  for p in procs:
    p.wait()
  for t in pumps:
    t.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  return status


def _stop(procs) -> None:
  """SIGTERM the processes still running, SIGKILL those left after GRACE_S."""
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.monotonic() + GRACE_S
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      p.kill()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("-n", "--num_processes", type=int, default=2, help="processes to start (default 2)")
  p.add_argument("--port", type=int, default=0, help="coordinator port on localhost (default: a free one)")
  p.add_argument("--cpu_devices", type=int, default=0,
                 help="run on CPU with this many (fake) devices per process (default: JAX's platform)")
  p.add_argument("--gpu_each", action="store_true", help="give process i GPU i only (JAX_LOCAL_DEVICE_IDS)")
  p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
  args = p.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command or args.num_processes < 1:
    p.error("give -n >= 1 and a command after --, e.g. -- python -m csq_jax.main --config=... --workdir=...")
  status = run(command, args.num_processes, args.port, args.cpu_devices or None, args.gpu_each)
  if status:
    print(f"local.py: a process exited with status {status}; stopped the others.", file=sys.stderr)
  return 1 if status < 0 else status


if __name__ == "__main__":
  sys.exit(main())
