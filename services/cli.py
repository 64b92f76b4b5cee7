"""``mlnode``, the console script: the node's commands plus the ones that need a service.

This is the composition root above ``node`` and ``services``: ``node.cli`` knows supervisord, keys and
settings but no service, so the model command (a tiny CPU checkpoint, written by the inference
service's CPU engine) is added here, and ``up --tiny-model-if-missing`` makes that model before the
node starts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from node import cli


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
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, build_parser())


if __name__ == "__main__":
    raise SystemExit(main())
