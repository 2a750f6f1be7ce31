"""A real S3 endpoint on loopback for the tests: moto's server in a process of its own.

It runs apart from the test process because delta-rs lets no other Python thread run while it waits on
the store, so a server in one of the test's threads would never answer it. With `outages=True` it is
reached through a TCP proxy (another process) that can go down and come back on the same port, the
objects kept, as an outage of the store.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import s3fs
from conftest import free_port

HOST = "127.0.0.1"
PROXY = Path(__file__).with_name("tcp_proxy.py")


def _wait_until_listening(port: int, process: subprocess.Popen, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the process for port {port} exited"
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {seconds} s")


class LoopbackS3:
    def __init__(self, secret: str, *, outages: bool = False, client_retries: bool = True):
        self.server_port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.server_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until_listening(self.server_port, self.server)
        self.proxy = None
        self.port = free_port() if outages else self.server_port
        if outages:
            self.start()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.options = {
            "key": "testing-key",
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-west-2"},
        }
        if not client_retries:  # the client's own retries kept short, so a test measures fimood's
            self.options["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
            self.options["skip_instance_cache"] = True

    def fs(self) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(**self.options)

    def bucket(self, name: str) -> str:
        """A fresh, empty bucket."""
        fs = self.fs()
        if fs.exists(name):
            fs.rm(name, recursive=True)
        fs.mkdir(name)
        return name

    def stop(self) -> None:
        """The store goes down: connections drop and new ones are refused."""
        self.proxy.kill()
        self.proxy.wait()

    def start(self) -> None:
        self.proxy = subprocess.Popen([sys.executable, str(PROXY), HOST, str(self.port), str(self.server_port)])
        _wait_until_listening(self.port, self.proxy)

    def close(self) -> None:
        for process in (self.proxy, self.server):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
