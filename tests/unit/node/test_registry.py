"""``node.registry`` is the one list of the node's programs: supervisord runs exactly those, each service
process carries the name and mode listed there, and every counter it declares reads as a counter."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

import node
from node import registry

ROOT = Path(node.__file__).resolve().parent.parent


def test_supervisord_runs_exactly_the_registered_programs() -> None:
    conf = configparser.RawConfigParser()
    conf.read(ROOT / "supervisord.conf")
    commands = {section.removeprefix("program:"): conf.get(section, "command")
                for section in conf.sections() if section.startswith("program:")}
    assert {name: command.split()[1:] for name, command in commands.items()} == {
        p.name: ["-m", p.module] for p in registry.PROGRAMS}


@pytest.mark.parametrize("program", registry.SERVICES, ids=lambda p: p.name)
def test_each_service_process_is_the_one_the_registry_names(program: registry.Program) -> None:
    module = __import__(f"{program.module}.service", fromlist=["Service"])
    services = [v for v in vars(module).values()
                if isinstance(v, type) and getattr(v, "name", None) == program.name and hasattr(v, "mode")]
    assert [s.mode for s in services] == [program.mode]


def test_modes_and_names_agree() -> None:
    assert registry.NAMES == ("pow", "inference", "train")
    assert {registry.MODE_OF[n]: n for n in registry.NAMES} == registry.SERVICE_OF
    assert registry.STOPPED not in registry.MODES


def test_counters_end_in_total_and_names_are_unique() -> None:
    names: list[str] = []
    for program in registry.PROGRAMS:
        for item in program.metrics:
            metrics = item.metrics if isinstance(item, registry.Each) else (item,)
            for metric in metrics:
                assert (metric.kind == "counter") == metric.name.endswith("_total"), metric.name
                names.append(metric.name)
    assert len(names) == len(set(names))
