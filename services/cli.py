"""``mlnode``, the console script: the node's commands plus the ones that need a service.

This is the composition root above ``node``, ``bus`` and ``services``: ``node.cli`` knows supervisord,
keys and settings but no service and no bus, so ``status`` (each service asked over the bus), the model
command (a tiny CPU checkpoint, written by the inference service's CPU engine) and ``validate`` (one
inference the way the network runs and checks it) are added here, and ``up --tiny-model-if-missing``
makes that model before the node starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bus.local import LocalBus
from node import cli
from node.config import Settings
from node.errors import MLNodeError
from node.identity import ensure_node_keys
from node.registry import NAMES


def cmd_up(args: argparse.Namespace) -> int:
    model = cli.load_settings().inference_autostart
    if args.tiny_model_if_missing and model is not None and not (model / "config.json").exists():
        from services.inference.cpu_engine.checkpoint import create_tiny  # torch: only when needed

        create_tiny(model, seed=0)
        print(f"mlnode: created a tiny CPU model at {model} for the inference engine")
    return cli.cmd_up(args)


def cmd_create_tiny(args: argparse.Namespace) -> int:
    from services.inference.cpu_engine.checkpoint import create_tiny

    create_tiny(Path(args.directory), seed=args.seed, arch=args.arch)
    print(f"tiny {args.arch} model written to {Path(args.directory).resolve()}")
    return 0


def _user_request(args: argparse.Namespace) -> dict[str, Any]:
    messages = json.loads(args.messages) if args.messages else [{"role": "user", "content": args.prompt}]
    body: dict[str, Any] = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
                            "stream": args.stream}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return body


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when the validator would accept the executor's answer, 1 when not, 2 when a node failed."""
    from services.inference.validation.check import CheckFailed, outcome_json, run_check

    try:
        outcome = run_check(args.executor, args.validator or args.executor, _user_request(args),
                            token=args.token, validator_token=args.validator_token, mode=args.mode,
                            timeout_s=args.timeout, seed=args.seed)
    except (CheckFailed, ValueError) as exc:
        print(f"mlnode validate: {exc}", file=sys.stderr)
        return 2
    print(outcome_json(outcome) if args.json else "\n".join(outcome.lines()))
    return 0 if outcome.passed else 1


def _add_validate(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "validate", help="send one inference as the Network Node does, replay it as a validator, compare",
        description="Sends one chat request to --executor (a node's inference base URL) exactly as the "
                    "Network Node rewrites it, replays the answer with enforced_tokens on --validator (the "
                    "same node by default) and prints the similarity and verdict (> 0.99 passes).")
    check.add_argument("--executor", required=True, help="base URL, e.g. http://node-a:5000")
    check.add_argument("--validator", help="base URL of the validating node (default: the executor)")
    check.add_argument("--model", required=True, help="the served model name")
    check.add_argument("--prompt", default="Explain proof of compute in one paragraph.")
    check.add_argument("--messages", help="a JSON list of chat messages (instead of --prompt)")
    check.add_argument("--max-tokens", type=int, default=64)
    check.add_argument("--temperature", type=float)
    check.add_argument("--top-p", type=float)
    check.add_argument("--top-k", type=int)
    check.add_argument("--seed", type=int, help="the request's seed (default: one the client draws)")
    check.add_argument("--stream", action="store_true", help="the executor streams its answer (SSE)")
    check.add_argument("--mode", choices=["processed_logprobs", "raw_logprobs"],
                       help="logprobs_mode (default: the chain's, processed_logprobs)")
    check.add_argument("--token", help="bearer token of the executor (and the validator, unless given)")
    check.add_argument("--validator-token")
    check.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(fn=cmd_validate)


async def _statuses(settings: Settings) -> dict[str, Any]:
    bus = LocalBus(settings, ensure_node_keys(settings.keys_dir), role="cli")
    try:
        async def one(service: str) -> tuple[str, Any]:
            client = bus.client(service)
            try:
                return service, await client.request("status", timeout=3, connect_timeout=2)
            except MLNodeError as exc:
                return service, {"error": exc.message}
            finally:
                client.close()

        return dict(await asyncio.gather(*(one(s) for s in NAMES)))
    finally:
        bus.close()


def cmd_status(args: argparse.Namespace) -> int:
    settings = cli.load_settings()
    services = asyncio.run(_statuses(settings))
    try:
        code, state = cli.http_json(f"{cli.local_url(settings, settings.api_port)}/api/v1/state",
                                     token=settings.api_token)
        node_state: Any = state if code == 200 else {"error": f"HTTP {code}"}
    except OSError as exc:
        node_state = {"error": f"gateway unreachable: {exc}"}
    doc = {"node": node_state, "services": services, "state_dir": str(settings.state_dir)}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"node:      {json.dumps(node_state)}")
        for name, status in services.items():
            print(f"{name + ':':10} {json.dumps(status)}")
    return 0 if all("error" not in s for s in services.values()) else 1



def build_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    up = commands.choices["up"]
    up.add_argument("--tiny-model-if-missing", action="store_true",
                    help="create a tiny CPU model at MLNODE_INFERENCE_AUTOSTART when none is there")
    up.set_defaults(fn=cmd_up)
    model = commands.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser(
        "create-tiny", help="write a deterministic tiny Llama or Qwen3 (HF layout, head_dim 32: every engine)"
    )
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--arch", choices=["llama", "qwen3"], default="llama")
    tiny.set_defaults(fn=cmd_create_tiny)
    status = commands.add_parser("status", help="node state and each service's status")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)
    _add_validate(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, build_parser())


if __name__ == "__main__":
    raise SystemExit(main())
