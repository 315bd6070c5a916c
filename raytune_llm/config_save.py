"""A resolved run config written into its run folder, with secret-looking values redacted (also what a rerun of the
same name is compared against, train/resume.py)."""

from __future__ import annotations

import os
from pathlib import Path

from raytune_llm.config import RunConfig, to_dict

_SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")


def redact(data):
    """Replace values of secret-looking keys (and values equal to secret env vars) before saving or logging."""
    secrets = {v for k, v in os.environ.items() if any(m in k.upper() for m in _SECRET_MARKERS) and len(v) >= 6}
    if isinstance(data, dict):
        return {
            k: ("***" if any(m in str(k).upper() for m in _SECRET_MARKERS) and v else redact(v))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact(v) for v in data]
    if isinstance(data, str) and data in secrets:
        return "***"
    return data


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (secrets redacted) as YAML."""
    from omegaconf import OmegaConf

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(redact(to_dict(cfg)))))
    tmp.replace(path)
