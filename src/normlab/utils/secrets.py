"""Keep secrets from the environment out of everything a run writes.

A value reaches a run's config through ``${oc.env:...}`` interpolations or a command-line
override; from there it would be copied into config_resolved.yaml, every checkpoint, Hydra's
``.hydra/`` files and the wandb config, and into error messages that quote a config value (the
log, a sweep job's outcome). Every environment variable whose name looks secret has its value
masked in all of those.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
MASK = "***"
# Shorter values (flags like "1") would mask unrelated text.
_MIN_LENGTH = 6


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the variables named like secrets (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_...),
    longest first so a secret containing another is masked whole."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= _MIN_LENGTH}
    return sorted(values, key=len, reverse=True)


def mask_secrets(value: Any, secrets: list[str] | None = None) -> Any:
    """``value`` (strings, dicts, lists, tuples, nested) with every secret replaced by ***."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, Mapping):
        return {key: mask_secrets(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(mask_secrets(item, secrets) for item in value)
    return value


def masked_config(node: DictConfig | None) -> DictConfig | None:
    """A resolved copy of a config node with secrets masked (None stays None)."""
    if node is None:
        return None
    return OmegaConf.create(mask_secrets(OmegaConf.to_container(node, resolve=True)))


def mask_secrets_in_files(directory: Path, secrets: list[str] | None = None) -> None:
    """Mask secrets in the text files directly under ``directory`` (Hydra's ``.hydra/``, written
    before normlab runs: the overrides and the config as typed)."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets or not directory.is_dir():
        return
    for path in directory.iterdir():
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        masked = mask_secrets(text, secrets)
        if masked != text:
            path.write_text(masked)


class SecretMaskingFilter(logging.Filter):
    """Masks secrets in a log record, its message and its traceback, before a handler writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        if not secrets:
            return True
        record.msg, record.args = mask_secrets(record.getMessage(), secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text, secrets)
        return True


def mask_secrets_in_logs() -> None:
    """Mask secrets in everything the root logger's handlers (Hydra's ``<job>.log`` and console)
    write from now on."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, SecretMaskingFilter) for f in handler.filters):
            handler.addFilter(SecretMaskingFilter())
