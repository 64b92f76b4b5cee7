"""``python -m services.inference.cpu_engine --model DIR --host H --port P [...]``.

Flags mirror vLLM's OpenAI server so the inference service launches both engines through one code
path; flags we do not know (``--quantization fp8``, ``--tensor-parallel-size 4`` ...) are logged once
and ignored. The port is bound at once and ``GET /health`` answers 503 until the model is loaded, 200
after (the readiness signal); a load failure exits with status 1 after logging ``model_load_failed``.
A ``--model`` that is not a local model directory is served by a tiny model made from ``--seed``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch
import uvicorn

from node.logging import configure, get_logger
from services.inference.validation.request import DEFAULT_MODE, MODES

from .checkpoint import load_or_synthesize
from .server import EngineApp, EngineSettings

log = get_logger(__name__)


def _model_len(text: str) -> int:
    """vLLM spellings: ``4096``, ``4k`` (x1000), ``4K`` (x1024)."""
    scale = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}.get(text[-1:], 1)
    digits = text[:-1] if scale != 1 else text
    try:
        value = int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"length must be positive, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.inference.cpu_engine", allow_abbrev=False)
    p.add_argument("--model", required=True, help="model directory (HF layout) or a name to synthesize")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None, help="names in /v1/models (first = id)")
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float", "float16", "half", "bfloat16"]
    )
    p.add_argument("--max-model-len", type=_model_len, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=_positive, default=64, help="sequences stepped together")
    p.add_argument("--cpu-threads", type=_positive, default=1, help="torch intra-op threads")
    p.add_argument("--logprobs-mode", choices=MODES, default=DEFAULT_MODE,
                   help="logprobs of a request that names no logprobs_mode (vLLM's flag)")
    p.add_argument("--log-level", default="info")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Known flags, and the unknown ones (ignored by the engine, reported by the caller)."""
    return build_parser().parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, unknown = parse_args(argv)
    configure("cpu_engine", args.log_level)
    if unknown:
        log.warning("ignored_engine_args", args=unknown, reason="not used by the CPU engine")
    torch.set_num_threads(args.cpu_threads)
    names = tuple(args.served_model_name or [args.model])
    app = EngineApp(EngineSettings(args.model, names, args.max_num_seqs, args.seed, args.logprobs_mode))
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    failed = threading.Event()

    def load() -> None:
        began = time.monotonic()
        try:
            loaded = load_or_synthesize(args.model, args.dtype, args.max_model_len, args.seed)
            app.attach(loaded)
        except Exception as exc:
            log.error("model_load_failed", model=args.model, error=str(exc))
            failed.set()
            server.should_exit = True
            return
        log.info(
            "engine_ready",
            model=args.model,
            served_name=names[0],
            host=args.host,
            port=args.port,
            max_model_len=loaded.max_model_len,
            dtype=str(loaded.model.dtype).removeprefix("torch."),
            load_s=round(time.monotonic() - began, 3),
        )

    log.info("engine_starting", model=args.model, host=args.host, port=args.port)
    threading.Thread(target=load, name="cpu-engine-load", daemon=True).start()
    server.run()
    return 1 if failed.is_set() or not server.started else 0


if __name__ == "__main__":
    sys.exit(main())
