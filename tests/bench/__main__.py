"""``make bench``: every benchmark section, each measuring its baseline in the same run."""

from __future__ import annotations

import importlib
import sys
import time

SECTIONS = ("bench_bus", "bench_pow", "bench_pocv2", "bench_pocv2_rounds", "bench_proxy", "bench_edge",
            "bench_metrics", "bench_train", "bench_vllm", "bench_validation")


def main(argv: list[str]) -> int:
    wanted = argv or list(SECTIONS)
    failed = []
    for name in wanted:
        try:
            module = importlib.import_module(f"tests.bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tests.bench.{name}":
                print(f"\n## {name}: not present in this checkout, skipped")
                continue
            raise
        t0 = time.perf_counter()
        try:
            module.run()
        except Exception as exc:  # one broken section must not hide the others
            failed.append(name)
            print(f"\n## {name}: FAILED: {type(exc).__name__}: {exc}")
        print(f"   ({name} took {time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
