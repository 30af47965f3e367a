"""Helpers for tests: compose the real configs, run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from qcflow.api import compose_config
from qcflow.cli import config_dir

__all__ = ["compose_cfg", "run_cli", "EXPERIMENTS", "check_report"]

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/config.yaml`` like the CLI does, with ``paths.output_dir`` made concrete."""
    return compose_config(overrides, output_dir)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m qcflow ARGS`` in a subprocess with the test environment."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "qcflow", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_report(report: Path, scan_ids: list[str]) -> list[str]:
    """Assert a report.html is offline-safe, references only existing files and lists every
    scan; returns the referenced files."""
    import re

    text = report.read_text()
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", text)
    assert not [r for r in refs if "://" in r or r.startswith("//")], "external reference"
    for ref in refs:
        assert (report.parent / ref).is_file(), f"{ref} referenced but missing"
    for sid in scan_ids:
        assert f"<td>{sid}</td>" in text, sid
    return refs
