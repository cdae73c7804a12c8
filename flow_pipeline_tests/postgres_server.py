"""A throwaway PostgreSQL server for tests, from the Debian ``postgresql`` package's binaries.

``start_postgres()`` runs ``initdb`` into a fresh temp directory, starts the server with ``pg_ctl`` on a free port of
127.0.0.1 (its unix socket in the same directory, never the system's /var/run/postgresql), and creates a
login role and a database owned by it. ``PostgresServer.stop()`` stops the server and deletes the directory.

initdb and postgres refuse to run as root; as root the server runs as the ``postgres`` system user that the Debian
package creates (``runuser -u postgres``), otherwise as the current user. Passwords are required on TCP
(scram-sha-256), so clients really exercise the password they are given.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flow_pipeline_tests.helpers import free_port

HOST = "127.0.0.1"
SUPERUSER = "postgres"
SERVER_USER_WHEN_ROOT = "postgres"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (Debian package ``postgresql``) are not installed here."""


@dataclass
class PostgresServer:
    """A running server: connect to ``host:port`` as ``username``/``password`` to the database ``db_name``."""

    host: str
    port: int
    username: str
    password: str
    db_name: str
    superuser_password: str
    root: Path
    bin_dir: Path
    run_as: str | None  # the system user the server runs as (None: the current user)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def dagster_env(self) -> dict[str, str]:
        """The environment variables that ``deploy/dagster-postgres.yaml`` reads."""
        return {"DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_USERNAME": self.username,
                "DAGSTER_PG_PASSWORD": self.password, "DAGSTER_PG_DB": self.db_name}

    def connect(self, superuser: bool = False):
        """A psycopg2 connection over TCP (autocommit) as the owner of ``db_name``, or as the superuser."""
        import psycopg2

        user, password = (SUPERUSER, self.superuser_password) if superuser else (self.username, self.password)
        connection = psycopg2.connect(host=self.host, port=self.port, user=user, password=password,
                                      dbname=self.db_name if not superuser else "postgres", connect_timeout=10)
        connection.autocommit = True
        return connection

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate if needed) and delete its directory."""
        if self.data_dir.exists():
            stopped = _run(self, [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w",
                                  "-t", "30", "stop"], check=False)
            if stopped.returncode != 0:
                _run(self, [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "stop"],
                     check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb (Debian), else the directory of ``initdb``
    on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresUnavailable("PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb and no "
                              "initdb on PATH): install the Debian package 'postgresql' (scripts/install.sh test "
                              "does this when run as root)")


def start_postgres(username: str = "dagster", db_name: str = "dagster", attempts: int = 3) -> PostgresServer:
    """initdb + pg_ctl start on a free port + CREATE ROLE/DATABASE; raises :class:`PostgresUnavailable` without
    the binaries. Retries on another port if the chosen one was taken in the meantime."""
    bin_dir = find_bin_dir()
    run_as = SERVER_USER_WHEN_ROOT if os.geteuid() == 0 else None
    if run_as is not None:
        try:
            pwd.getpwnam(run_as)
        except KeyError:
            raise PostgresUnavailable(f"running as root but there is no '{run_as}' system user to run PostgreSQL "
                                      "(the Debian 'postgresql' package creates it)") from None
    # Not under pytest's tmp_path: that lives in a 0700 directory of root's that the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="flow-pg-"))
    server = PostgresServer(host=HOST, port=0, username=username, password=secrets.token_hex(12), db_name=db_name,
                            superuser_password=secrets.token_hex(12), root=root, bin_dir=bin_dir, run_as=run_as)
    try:
        _initdb(server)
        for attempt in range(attempts):
            server.port = free_port(HOST)
            started = _run(server, [str(bin_dir / "pg_ctl"), "-D", str(server.data_dir), "-l", str(root / "server.log"),
                                    "-w", "-t", "60", "-o", _server_options(server), "start"], check=False)
            if started.returncode == 0:
                break
            if attempt == attempts - 1:
                log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
                raise RuntimeError(f"pg_ctl start failed ({started.returncode}): {started.stdout}{started.stderr}\n"
                                   f"{log[-3000:]}")
        _create_role_and_database(server)
    except BaseException:
        server.stop()
        raise
    return server


def _initdb(server: PostgresServer) -> None:
    if server.run_as is not None:
        entry = pwd.getpwnam(server.run_as)
        os.chown(server.root, entry.pw_uid, entry.pw_gid)
    password_file = server.root / "superuser-password"
    password_file.write_text(server.superuser_password + "\n")
    if server.run_as is not None:
        os.chown(password_file, entry.pw_uid, entry.pw_gid)
    _run(server, [str(server.bin_dir / "initdb"), "-D", str(server.data_dir), "-U", SUPERUSER, "-E", "UTF8",
                  "--no-locale", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256",
                  f"--pwfile={password_file}"])
    password_file.unlink()


def _server_options(server: PostgresServer) -> str:
    # TCP on 127.0.0.1 only; the socket in our own directory; durability off: the data is thrown away anyway.
    return (f"-p {server.port} -k {server.root} -c listen_addresses={HOST} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")


def _create_role_and_database(server: PostgresServer) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            connection = server.connect(superuser=True)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {server.username} LOGIN PASSWORD %s", (server.password,))
        cursor.execute(f"CREATE DATABASE {server.db_name} OWNER {server.username}")
    connection.close()


def _run(server: PostgresServer, command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a server binary as the server's system user, in the server's directory (readable by that user)."""
    if server.run_as is not None:
        command = ["runuser", "-u", server.run_as, "--", *command]
    result = subprocess.run(command, cwd=server.root, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result
