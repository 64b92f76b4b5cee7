"""The engine-argument policy against vLLM's own argument parser (no engine is started).

For every flag the policy accepts, vLLM's parser (``make_arg_parser`` of the server the node launches)
must know each of its spellings under the same ``dest``, agree on whether it takes a value, offer every
choice the policy allows, and read the canonical form the policy writes as the value the policy means
(``4k`` is 4000, ``--no-x`` is false, a JSON object's keys land where the policy expects). The network's
own configurations must parse whole, the names the policy refuses must be real vLLM options, and vLLM
must still take abbreviations (the reason the policy spells names out). ``engine_args_probe.py`` runs in
vLLM's interpreter and reports what disagrees.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.network_configs import NETWORK_CONFIGS
from tests.support.node import REPO

PROBE = Path(__file__).with_name("engine_args_probe.py")


def test_every_accepted_argument_means_to_vllm_what_the_policy_thinks(vllm_python: str) -> None:
    proc = subprocess.run([vllm_python, str(PROBE)], input=json.dumps(NETWORK_CONFIGS), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    assert report["configurations"] == len(NETWORK_CONFIGS)
    assert report["checked"] >= 80 and report["spellings"] > report["checked"]
    assert report["allow_abbrev"] is True
