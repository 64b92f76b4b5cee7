"""The node's commands of ``mlnode``: start and stop the node, talk to supervisord, identity, status.

They need nothing from a service; the ``mlnode`` console script itself is ``services.cli``, which adds
the commands that do (the model command) on top of this parser. Every command reads the same
``MLNODE_*`` settings as the processes (and ``.env`` through the Makefile), so ``mlnode ctl status``
always talks to the supervisord of the node those settings name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node import __version__, config, envfile
from node.config import Settings
from node.errors import ConfigError
from node.identity import ensure_node_keys

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_settings() -> Settings:
    try:
        settings = config.load()
        config.ensure_dirs(settings)
    except ConfigError as exc:
        raise SystemExit(f"mlnode: {exc.message}") from None
    return settings


def supervisor_conf() -> Path:
    path = Path(os.environ.get("MLNODE_SUPERVISOR_CONF", REPO_ROOT / "supervisord.conf"))
    if not path.is_file():
        raise SystemExit(f"mlnode: supervisord config not found at {path} (set MLNODE_SUPERVISOR_CONF)")
    return path


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"mlnode: {name} not found; install the project (make setup)")
    return found


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.to_env())
    env.setdefault("MLNODE_PYTHON", sys.executable)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _supervisord_running(settings: Settings) -> bool:
    pidfile = settings.run_dir / "supervisord.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def http_json(url: str, timeout: float = 3.0, token: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def local_url(settings: Settings, port: int) -> str:
    host = settings.api_host if settings.api_host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{port}"


def cmd_up(args: argparse.Namespace) -> int:
    settings = load_settings()
    # Everything under the state dir is the node's own: supervisord opens its log before applying its
    # umask, so it inherits ours.
    os.umask(0o077)
    ensure_node_keys(settings.keys_dir)
    if _supervisord_running(settings):
        print(f"mlnode: already running (state dir {settings.state_dir}); `mlnode ctl status` shows it")
        return 0
    command = [_tool("supervisord"), "-c", str(supervisor_conf())]
    if args.foreground:
        os.execve(command[0], [*command, "-n"], _env(settings))
    subprocess.run(command, env=_env(settings), check=True)
    api = local_url(settings, settings.api_port)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        try:
            status, body = http_json(f"{api}/api/v1/state", timeout=2, token=settings.api_token)
            if status == 200:
                print(f"MLNode {__version__} is up (state: {body.get('state')})")
                print(f"  management API  {api}   (GET /api/v1/state, /health)")
                print(f"  inference port  {local_url(settings, settings.inference_port)}")
                print(f"  state dir       {settings.state_dir}   logs: {settings.logs_dir}")
                print("  stop with `make stop`; operate with `mlnode ctl status|restart pow|tail -f gateway`")
                return 0
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    print(f"mlnode: the API did not answer on {api} within {args.wait:g} s", file=sys.stderr)
    subprocess.run([_tool("supervisorctl"), "-c", str(supervisor_conf()), "status"], env=_env(settings))
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not _supervisord_running(settings):
        print("mlnode: not running")
        return 0
    pid = int((settings.run_dir / "supervisord.pid").read_text().strip())
    subprocess.run([_tool("supervisorctl"), "-c", str(supervisor_conf()), "shutdown"], env=_env(settings))
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            print("mlnode: stopped")
            return 0
        time.sleep(0.2)
    print("mlnode: supervisord is still running", file=sys.stderr)
    return 1


def cmd_ctl(args: argparse.Namespace) -> int:
    settings = load_settings()
    command = [_tool("supervisorctl"), "-c", str(supervisor_conf()), *args.args]
    os.execve(command[0], command, _env(settings))
    return 0  # not reached


def cmd_identity(args: argparse.Namespace) -> int:
    settings = load_settings()
    keys = ensure_node_keys(settings.keys_dir)
    doc = {"public_key": keys.identity.public, "public_key_hex": keys.identity.public_hex,
           "key_file": str(settings.keys_dir / "node.key")}
    print(json.dumps(doc, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in doc.items()))
    return 0


def cmd_env_template(_args: argparse.Namespace) -> int:
    print(config.env_template(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlnode", description="MLNode: the GPU worker of the network")
    parser.add_argument("--version", action="version", version=f"mlnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start supervisord with the four programs")
    up.add_argument("--foreground", action="store_true", help="run supervisord in the foreground (Docker)")
    up.add_argument("--wait", type=float, default=90.0, help="seconds to wait for the API")
    up.set_defaults(fn=cmd_up)
    down = sub.add_parser("down", help="stop every program and supervisord")
    down.add_argument("--wait", type=float, default=60.0)
    down.set_defaults(fn=cmd_down)
    ctl = sub.add_parser("ctl", help="supervisorctl for this node, e.g. `mlnode ctl restart pow`")
    ctl.add_argument("args", nargs=argparse.REMAINDER)
    ctl.set_defaults(fn=cmd_ctl)
    ident = sub.add_parser("identity", help="this node's CURVE public key")
    ident.add_argument("--json", action="store_true")
    ident.set_defaults(fn=cmd_identity)
    env = sub.add_parser("env-template", help="print a commented .env with every variable and default")
    env.set_defaults(fn=cmd_env_template)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse with ``parser`` (default: the node's commands), apply ``.env``, run the command."""
    args = (parser or build_parser()).parse_args(argv)
    env_file = Path(os.environ.get("MLNODE_ENV_FILE", Path.cwd() / ".env"))
    try:
        envfile.apply(env_file)
    except ConfigError as exc:
        raise SystemExit(f"mlnode: {exc.message}") from None
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
