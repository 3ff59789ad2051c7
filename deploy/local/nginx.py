"""The tenant-affinity router of the local cluster: NGINX with consistent hashing.

Two listeners over the same serving replicas:

* ``affinity`` port: ``hash $http_authorization consistent`` -- every request of one API key
  (so of one tenant) goes to the same replica while it is up, keeping that tenant's adapter
  resident there; losing a replica remaps only the keys that hashed to it (ketama ring).
* ``round_robin`` port: plain round robin, the baseline ``bench.cluster`` compares against.

A replica that refuses or drops a connection is marked down for ``fail_timeout`` and the
request is retried on the next one (``proxy_next_upstream``), so a SIGKILLed replica costs
no client request. Non-idempotent requests (POST) are retried too, but only when the replica
never took the request (connection refused or reset, 502) or refused it with 503 (not ready,
nothing done) -- never after a timeout, when it might have acted on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str:
    found = shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)
    if not found:
        raise FileNotFoundError("nginx is not installed (Debian package 'nginx'; scripts/system-packages.sh "
                                "installs it as root)")
    return found


def render_config(directory: Path, replicas: list[int], affinity_port: int, round_robin_port: int,
                  max_body_mb: int = 80) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in replicas)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the root-owned temp dirs
    proxy = f"""
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_read_timeout 300s;
            proxy_connect_timeout 2s;
            proxy_next_upstream error http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
            client_max_body_size {max_body_mb}m;
            add_header X-Tailor-Upstream $upstream_addr always;"""
    return f"""{user}worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {directory}/nginx-access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream tailor_affinity {{
        hash $http_authorization consistent;
{servers}
        keepalive 64;
    }}
    upstream tailor_round_robin {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{affinity_port};
        location / {{
            proxy_pass http://tailor_affinity;{proxy}
        }}
    }}
    server {{
        listen 127.0.0.1:{round_robin_port};
        location / {{
            proxy_pass http://tailor_round_robin;{proxy}
        }}
    }}
}}
"""


@dataclass
class Router:
    directory: Path
    replicas: list[int]
    affinity_port: int
    round_robin_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        conf.write_text(render_config(self.directory, self.replicas, self.affinity_port, self.round_robin_port))
        nginx = find_nginx()
        check = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(self.directory)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected {conf}: {check.stderr.strip()}")
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.directory)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.directory / "nginx.out", "ab"),
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
