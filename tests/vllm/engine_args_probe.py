"""Run under vLLM's interpreter: every flag the engine-argument policy accepts, read by vLLM's own parser.

Prints one JSON document: ``problems`` (empty when vLLM reads every accepted argument as the policy says)
and ``checked`` (how many flags and spellings were compared). ``tests/vllm/test_engine_args_vllm.py``
runs it and asserts on the result.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from pathlib import Path
from typing import Any

from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

from services.inference.engine_args import FLAGS, NODE_OWNED, REASONS, REPLACED, EnginePolicy, Flag, Json
from services.inference.up_request import UpRequest

#: Every model trusted: the probe reads --trust-remote-code too (who may pass it is the policy's business).
POLICY = EnginePolicy(model_roots=(Path("/srv/models"),), trust_remote_code=("*",))
#: Values for the JSON flags: what the network uses, or the allowed keys.
JSON_SAMPLES = {
    "--compilation-config": '{"max_cudagraph_capture_size": 640, "cudagraph_capture_sizes": [1, 2, 4], '
                            '"cudagraph_mode": "FULL_AND_PIECEWISE", "mode": 3}',
    "--speculative-config": '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, '
                            '"prompt_lookup_min": 2}',
    "--override-generation-config": '{"temperature": 0.6, "top_p": 0.95}',
    "--default-chat-template-kwargs": '{"enable_thinking": false}',
    "--limit-mm-per-prompt": '{"image": 0, "video": 1}',
}
#: Tried in order: "4k" first, so that sizes vLLM reads with a suffix are compared as numbers.
CANDIDATES = ("4k", "2", "0.5", "auto", "fp8", "org/model", "deepseek_v4", "FLASHINFER", "main")


def parser() -> argparse.ArgumentParser:
    return make_arg_parser(FlexibleArgumentParser(description="probe"))


def sample(flag: Flag, choices: Any) -> list[str]:
    """A value the policy accepts for ``flag`` (none for a switch), one of vLLM's choices if it has any."""
    if flag.value is None and not flag.model:
        return []
    if flag.name in JSON_SAMPLES:
        return [JSON_SAMPLES[flag.name]]
    options = getattr(flag.value, "options", None)
    candidates = (options[-1],) if options else CANDIDATES
    if choices:
        candidates = tuple(str(c) for c in choices if str(c) != "None")
    for candidate in candidates:
        try:
            POLICY.vet(UpRequest("org/model", "auto", (flag.name, candidate)))
        except Exception:
            continue
        return [candidate, candidate] if flag.many else [candidate]
    raise AssertionError(f"no sample value for {flag.name}")


def same(actual: Any, expected: Any) -> bool:
    """``actual`` as vLLM's namespace holds it means ``expected`` (enums by name or value)."""
    if type(actual) is type(expected) and actual == expected:
        return True
    if isinstance(actual, enum.Enum):
        return expected in (actual.name, actual.value)
    return isinstance(actual, int | float) and isinstance(expected, int | float) and actual == expected \
        and not isinstance(actual, bool) and not isinstance(expected, bool)


def json_same(actual: Any, expected: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in expected.items():
        if dataclasses.is_dataclass(actual):
            got = getattr(actual, key, "<missing>")
        elif isinstance(actual, dict):
            got = actual.get(key, "<missing>")
        else:
            return [f"parsed to {type(actual).__name__}, not an object"]
        if isinstance(value, list) and isinstance(got, list | tuple):
            ok = len(got) == len(value) and all(same(g, v) for g, v in zip(got, value, strict=True))
        else:
            ok = same(got, value)
        if not ok:
            problems.append(f"key {key!r}: vLLM reads {got!r}, the policy means {value!r}")
    return problems


def check_flag(p: argparse.ArgumentParser, flag: Flag) -> list[str]:
    problems: list[str] = []
    actions = p._option_string_actions
    for name in flag.names:
        action = actions.get(name)
        if action is None:
            problems.append(f"{flag.name}: vLLM has no option {name}")
            continue
        if action.dest != flag.dest:
            problems.append(f"{name}: vLLM stores it in {action.dest!r}, the policy says {flag.dest!r}")
        takes_value = flag.value is not None or flag.model
        if takes_value != (action.nargs != 0):
            problems.append(f"{name}: vLLM nargs={action.nargs!r}, the policy says "
                            f"{'a value' if takes_value else 'a switch'}")
        if flag.many != (action.nargs == "+"):
            problems.append(f"{name}: vLLM nargs={action.nargs!r}, the policy says many={flag.many}")
        options = getattr(flag.value, "options", None)
        if options and action.choices is not None:
            extra = [o for o in options if o not in [str(c) for c in action.choices]]
            if extra:
                problems.append(f"{name}: the policy allows {extra}, which vLLM does not offer")
    if problems:
        return problems
    values = sample(flag, actions[flag.name].choices)
    vetted = POLICY.vet(UpRequest("org/model", "auto", (flag.name, *values))).additional_args
    try:
        namespace = p.parse_args(list(vetted))
    except SystemExit:
        return [f"{flag.name} {values}: vLLM's parser refuses what the policy accepts"]
    actual = getattr(namespace, flag.dest)
    if isinstance(flag.value, Json):
        return [f"{flag.name}: {m}" for m in json_same(actual, json.loads(values[0]))]
    if not values:
        expected: Any = True
    elif flag.many:
        expected = [flag.meaning(v) for v in values]
    else:
        expected = flag.meaning(values[0])
    if flag.many and isinstance(actual, list | tuple) and isinstance(expected, list):
        pairs = zip(actual, expected, strict=False)
        matches = len(actual) == len(expected) and all(same(a, e) for a, e in pairs)
    else:
        matches = same(actual, expected)
    if not matches:
        problems.append(f"{flag.name} {values}: vLLM reads {actual!r}, the policy means {expected!r}")
    if flag.negatable:
        negated = POLICY.vet(UpRequest("org/model", "auto", ("--no-" + flag.name[2:],))).additional_args
        if getattr(p.parse_args(list(negated)), flag.dest) is not False:
            problems.append(f"--no-{flag.name[2:]}: vLLM does not read it as false")
    for alias in flag.aliases:
        canonical = POLICY.vet(UpRequest("org/model", "auto", (alias, *values))).additional_args
        if canonical != vetted:
            problems.append(f"{alias}: the policy writes {canonical}, not {vetted}")
    return problems


def main() -> int:
    """Stdin: a JSON list of ``[model, additional_args]`` configurations to read whole as well."""
    configs = json.loads(sys.stdin.read() or "[]")
    p = parser()
    problems: list[str] = []
    for flag in FLAGS:
        problems += check_flag(p, flag)
    for model, args in configs:
        vetted = POLICY.vet(UpRequest(model, "auto", tuple(args))).additional_args
        try:
            p.parse_args(["--model", model, *vetted])
        except SystemExit:
            problems.append(f"{model}: vLLM's parser refuses the configuration the policy accepts")
    # The refused names are real vLLM options (the list names what it guards against) ...
    for name in [*REASONS, *NODE_OWNED, *REPLACED]:
        if name not in p._option_string_actions:
            problems.append(f"refused flag {name} is not a vLLM option")
    # ... and an abbreviation is what makes refusing unknown spellings necessary: vLLM takes it.
    abbreviated = p.parse_args(["--hos=0.0.0.0", "--trust-remote"])
    if (abbreviated.host, abbreviated.trust_remote_code) != ("0.0.0.0", True):
        problems.append("vLLM no longer takes abbreviations: the test of the danger is out of date")
    print(json.dumps({"problems": problems, "checked": len(FLAGS), "configurations": len(configs),
                      "spellings": sum(len(f.names) for f in FLAGS), "allow_abbrev": p.allow_abbrev}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
