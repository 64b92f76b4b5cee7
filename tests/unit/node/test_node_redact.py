"""Secrets out of what the node writes down: secret flags, secret-looking variables, URL passwords."""

from __future__ import annotations

import io
import json

from node.logging import configure, get_logger
from node.redact import MASK, is_secret_env, is_secret_flag, redact_args, scrub, secret_values


def test_which_flags_and_variables_carry_secrets() -> None:
    assert all(is_secret_flag(f) for f in ("--api-key", "--hf-token", "--hf_token=x", "--db-password"))
    assert not any(is_secret_flag(f) for f in ("--max-num-batched-tokens", "--tokenizer", "--ssl-keyfile",
                                                "--return-tokens-as-token-ids", "--skip-tokenizer-init"))
    assert all(is_secret_env(n) for n in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                                          "VLLM_API_KEY", "OPENAI_API_KEY", "DB_PASSWORD"))
    assert not any(is_secret_env(n) for n in ("TOKENIZERS_PARALLELISM", "PATH", "HF_HOME", "KEYBOARD"))


def test_secret_flag_values_are_masked_in_argument_lists() -> None:
    args = ["--api-key", "k1", "k2", "--hf-token=hf_abc", "--seed", "3", "--revision", "main"]
    assert redact_args(args) == ["--api-key", MASK, MASK, f"--hf-token={MASK}", "--seed", "3",
                                 "--revision", "main"]
    # Values shorter than 4 characters are masked in arguments but not searched for in free text.
    assert secret_values(args, {"HF_TOKEN": "hf_from_env", "HOME": "/root"}) == {"hf_abc", "hf_from_env"}


def test_free_text_is_scrubbed_of_known_secrets_and_url_passwords() -> None:
    secrets = secret_values(["--api-key", "sekrit-key"], {"HF_TOKEN": "hf_sekrit"})
    assert secrets == {"sekrit-key", "hf_sekrit"}
    text = "non-default args: {'api_key': ['sekrit-key']} token=hf_sekrit url=http://u:pw@host/x"
    assert scrub(text, secrets) == (f"non-default args: {{'api_key': ['{MASK}']}} token={MASK} "
                                    f"url=http://{MASK}@host/x")


def test_log_lines_mask_secrets() -> None:
    out = io.StringIO()
    configure("test", "info", stream=out)
    get_logger("t").info("engine_spawned", argv=["python", "--api-key", "sekrit"], secret_key="abc",
                         url="http://user:pw@api:9100/v1", additional_args=["--hf-token=hf_x"])
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["argv"] == ["python", "--api-key", MASK]
    assert line["secret_key"] == MASK and line["url"] == f"http://{MASK}@api:9100/v1"
    assert line["additional_args"] == [f"--hf-token={MASK}"]
