"""``rangelens serve``: the atlas over HTTP on loopback, read-only, never outside the atlas directory.

Requests are GET or HEAD only. A path is percent-decoded once and refused (404) when any segment is
``.`` or ``..``, when it holds a backslash, a NUL or a ``%`` left after decoding (a double-encoded
``%252e%252e``), or when the file it resolves to (following symlinks) lies outside the atlas. On
loopback, a request whose ``Host`` is not a loopback name (in any letter case) is refused (403), so
a web page cannot read the atlas through DNS rebinding.
"""

from __future__ import annotations

import mimetypes
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from rangelens.artifacts import ATLAS, check_output_dir
from rangelens.errors import RangelensError
from rangelens.report.atlas import atlas_is_current, build_atlas
from rangelens.rundir import RunDir

LOOPBACK = ("127.0.0.1", "::1", "localhost")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
mimetypes.add_type("image/svg+xml", ".svg")
mimetypes.add_type("text/javascript", ".js")


def resolve_request(root: Path, target: str) -> Path | None:
    """The file under ``root`` that request ``target`` names, or None if it is not one.

    ``root`` must be resolved. Directories map to their ``index.html``.
    """
    path = unquote(urlsplit(target).path, errors="strict")
    if any(bad in path for bad in ("\\", "\0", "%")):
        return None
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        return None
    candidate = root.joinpath(*parts)
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if resolved.is_dir():
        resolved = resolved / "index.html"
    if not resolved.is_relative_to(root) or not resolved.is_file():
        return None
    return resolved


class AtlasHandler(BaseHTTPRequestHandler):
    """Serves the files of ``server.root`` (an :class:`AtlasServer`) and nothing else."""

    server: AtlasServer
    server_version = "rangelens"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle_timeout)  # drop idle or half-sent requests

    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._send(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(body=False)

    def _refuse(self) -> None:
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815

    def _send(self, *, body: bool) -> None:
        try:
            path = resolve_request(self.server.root, self.path)
        except UnicodeDecodeError:
            path = None
        hosts = self.server.allowed_hosts
        host = self.headers.get("Host", "").strip().lower()  # host names are case-insensitive
        if hosts is not None and host not in hosts:
            path, status, payload = None, HTTPStatus.FORBIDDEN, b"forbidden host\n"
        else:
            status, payload = HTTPStatus.NOT_FOUND, b"not found\n"
        if path is None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
        else:
            payload = path.read_bytes()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            charset = "; charset=utf-8" if kind.startswith("text/") or kind.endswith("+xml") else ""
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", kind + charset)
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base signature)
        if self.server.verbose:
            super().log_message(format, *args)


class AtlasServer(ThreadingHTTPServer):
    """A threading HTTP server bound to ``root`` (an atlas directory)."""

    daemon_threads = True

    def __init__(
        self,
        root: Path,
        address: tuple[str, int],
        *,
        verbose: bool = False,
        idle_timeout: float = 30.0,
    ) -> None:
        self.root = root.resolve()
        self.verbose = verbose
        self.idle_timeout = idle_timeout
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, AtlasHandler)
        port = self.server_address[1]
        self.allowed_hosts = (
            {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")}
            if address[0] in LOOPBACK
            else None
        )


def make_server(atlas: str | Path, host: str = "127.0.0.1", port: int = 8000) -> AtlasServer:
    """A server for the built atlas directory ``atlas`` (port 0: any free port); not started."""
    return AtlasServer(Path(atlas), (host, port))


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``RUN_DIR/atlas`` (built first if missing or out of date) until interrupted."""
    if not 0 <= port <= 65535:
        raise RangelensError(f"--port {port} is not a TCP port; valid: 0-65535 (0: any free port)")
    run_path = Path(run_dir)
    RunDir(run_path).require()
    atlas = RunDir(run_path).atlas
    if not atlas_is_current(run_path, atlas):
        check_output_dir(atlas, ATLAS, keep=[run_path])
        print(f"building the atlas in {atlas} ...", file=sys.stderr)
        build_atlas(run_path, atlas)
    try:
        server = AtlasServer(atlas, (host, port), verbose=True)
    except (OSError, OverflowError) as err:
        reason = getattr(err, "strerror", None) or err
        raise RangelensError(
            f"cannot listen on {host}:{port} ({reason}); choose another --port or --host"
        ) from err
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {atlas} at http://{shown}:{server.server_address[1]}/ (Ctrl-C stops)")
    if host not in LOOPBACK:
        print(
            f"warning: bound to {host}: the atlas is reachable from other machines", file=sys.stderr
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
