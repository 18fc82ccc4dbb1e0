"""nginx as the ceiling: a generated config proxying to the upstream, in a temp prefix."""

from __future__ import annotations

import shutil
from pathlib import Path

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")


def find_nginx() -> str | None:
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def write_config(
    prefix: Path, *, port: int, upstream_port: int, keys: list[str], access_log: bool = False
) -> Path:
    """nginx.conf for `nginx -p prefix -c conf`: one worker, keepalive to the upstream,
    no response buffering, and the same key check as the reference (an exact-match map)."""
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    key_lines = "\n".join(f'        "Bearer {key}" 1;' for key in keys)
    log = f"access_log {prefix}/logs/access.log;" if access_log else "access_log off;"
    conf = f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    {log}
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 1000000;
    map_hash_bucket_size 256;
    map $http_authorization $key_ok {{
        default 0;
{key_lines}
    }}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location /mcp-connect/bench {{
            if ($key_ok = 0) {{ return 401; }}
            rewrite ^/mcp-connect/bench(.*)$ /mcp$1 break;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return path


def command(binary: str, prefix: Path, conf: Path) -> list[str]:
    return [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "logs" / "error.log")]
