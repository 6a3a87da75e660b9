"""A throwaway PostgreSQL cluster for tests: initdb in a temporary directory, trust auth, loopback.

PostgreSQL refuses to run as root, so as root the cluster is created and run by the `postgres` user
(`runuser -u postgres --`) in a directory it owns; as any other user it runs as that user. Tests get
a fresh database each (`Cluster.new_database`). `available()` says why PostgreSQL cannot be used
here (None when it can), so tests that need it are skipped with that reason. fsync is off: the tests
kill clients and servers of the store, never the database machine.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile

# Debian's postgresql-15 (`dpkg -L postgresql-15 | grep bin/initdb`); newer majors also work.
_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def _bin_dir() -> str | None:
  for candidate in sorted(glob.glob(_BIN_GLOB), reverse=True):
    if os.path.exists(os.path.join(candidate, "initdb")):
      return candidate
  found = shutil.which("initdb")
  return os.path.dirname(found) if found else None


def available() -> str | None:
  """None if a cluster can be started here, else the reason it cannot."""
  try:
    import psycopg  # noqa: F401, PLC0415
  except ImportError:
    return "psycopg is not installed (pip install 'psycopg[binary]')"
  if _bin_dir() is None:
    return f"no PostgreSQL server binaries (no initdb in {_BIN_GLOB} or on PATH)"
  if os.geteuid() == 0 and (shutil.which("runuser") is None or _postgres_uid() is None):
    return "running as root without runuser or a 'postgres' user to run the server as"
  return None


def _postgres_uid() -> int | None:
  import pwd  # noqa: PLC0415

  try:
    return pwd.getpwnam("postgres").pw_uid
  except KeyError:
    return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Cluster:
  """A running cluster; `stop()` shuts it down and deletes its directory."""

  def __init__(self):
    self._bin = _bin_dir()
    self._as_root = os.geteuid() == 0
    self.root = tempfile.mkdtemp(prefix="rlhb-pg-")
    if self._as_root:
      os.chown(self.root, _postgres_uid(), -1)
    self.data = os.path.join(self.root, "data")
    self.port = _free_port()
    self._names = itertools.count()
    options = (
      f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
      "-c max_connections=200"
    )
    log = os.path.join(self.root, "server.log")
    initdb = ("-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    try:
      self._run("initdb", *initdb)
      self._run("pg_ctl", "-D", self.data, "-l", log, "-o", options, "-w", "-t", "60", "start")
    except BaseException:
      self.stop()  # nothing left behind by a cluster that did not come up
      raise

  def _run(self, tool: str, *args: str) -> None:
    command = [os.path.join(self._bin, tool), *args]
    if self._as_root:
      command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=120, cwd=self.root)

  def url(self, database: str = "postgres") -> str:
    return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

  def new_database(self) -> str:
    """Creates an empty database; returns its URL."""
    import psycopg  # noqa: PLC0415

    name = f"t{os.getpid()}_{next(self._names)}"
    with psycopg.connect(self.url(), autocommit=True) as conn:
      conn.execute(f"CREATE DATABASE {name}")
    return self.url(name)

  def stop(self) -> None:
    try:
      if os.path.exists(os.path.join(self.data, "postmaster.pid")):
        self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
    finally:
      shutil.rmtree(self.root, ignore_errors=True)
