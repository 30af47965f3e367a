"""Task ``validate``: check every scan under ``data.root`` and write ``validation.tsv``.

``python -m qcflow experiment=validate data.root=/path/to/bids`` lists the scans
(:func:`~qcflow.data.discovery.discover_scans`), checks each one with
:func:`~qcflow.data.nifti.validate_scan` (a bad scan never stops the others), writes one row
per scan into ``<paths.output_dir>/validation.tsv`` and prints a summary with every error. It
fails (exit code 1 from the CLI) only when not a single scan is usable.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qcflow.data.discovery import Scan, discover_scans, resolve_data_root
from qcflow.data.nifti import validate_scan
from qcflow.errors import QCFlowError
from qcflow.utils.io import atomic_path

__all__ = ["run", "validate_scans", "write_validation_tsv", "COLUMNS"]

log = logging.getLogger(__name__)

#: columns of validation.tsv (``site`` is appended when any scan has one)
COLUMNS = ("scan_id", "path", "status", "reason", "shape", "voxel_size", "warning")
#: below this many scans no progress bar is shown
_PROGRESS_MIN = 20


def _progress(rows: Iterator[dict[str, Any]], total: int) -> Iterator[dict[str, Any]]:
    """Wrap ``rows`` in a tqdm bar on stderr when there are many scans and stderr is a TTY."""
    if total < _PROGRESS_MIN or not sys.stderr.isatty():
        return rows
    from tqdm.auto import tqdm

    return iter(tqdm(rows, total=total, desc="validating", unit="scan", file=sys.stderr))


def validate_scans(scans: Sequence[Scan], num_workers: int = 0) -> list[dict[str, Any]]:
    """One :func:`~qcflow.data.nifti.validate_scan` row per scan, in the order of ``scans``.

    Args:
        scans: the scans to check.
        num_workers: threads reading in parallel (0 = in this thread); decompression and
            file reads release the GIL.

    Returns:
        Rows with ``scan_id`` first, then the keys of ``validate_scan`` and ``site``.
    """

    def one(scan: Scan) -> dict[str, Any]:
        row = validate_scan(scan.path)
        return {"scan_id": scan.scan_id, **row, "site": scan.site or ""}

    if num_workers > 0 and len(scans) > 1:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            return list(_progress(pool.map(one, scans), len(scans)))
    return list(_progress(map(one, scans), len(scans)))


def write_validation_tsv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as a TSV atomically (``COLUMNS``, plus ``site`` when any is known).

    Args:
        rows: rows from :func:`validate_scans`.
        path: output file.

    Returns:
        ``path``.
    """
    import pandas as pd

    columns = list(COLUMNS)
    if any(row.get("site") for row in rows):
        columns.append("site")
    table = pd.DataFrame(list(rows), columns=columns).fillna("")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    return Path(path)


def _summary(rows: Sequence[dict[str, Any]], root: Path | str, tsv: Path) -> str:
    n_ok = sum(row["status"] == "ok" for row in rows)
    warned = [row for row in rows if row["status"] == "ok" and row.get("warning")]
    head = f"validated {len(rows)} scans in {root}: {n_ok} ok, {len(rows) - n_ok} error"
    lines = [head + (f", {len(warned)} with a warning" if warned else "")]
    lines += [f"  {row['scan_id']}: {row['reason']}" for row in rows if row["status"] != "ok"]
    lines += [f"  {row['scan_id']}: warning: {row['warning']}" for row in warned]
    lines.append(f"report: {tsv}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate every scan of ``cfg.data`` and write ``validation.tsv`` into the run folder.

    Args:
        cfg: the composed config (``data.root`` / ``data.split`` / ``data.pattern``,
            ``data.num_workers``, ``paths.output_dir``).

    Returns:
        ``{"n_scans", "n_ok", "n_error", "n_warning", "validation_tsv"}``.

    Raises:
        QCFlowError: no scan found, or none of them is valid (the TSV is written first).
    """
    root = resolve_data_root(cfg.data)
    scans = discover_scans(root, cfg.data.get("pattern"))
    rows = validate_scans(scans, int(cfg.data.get("num_workers") or 0))
    tsv = write_validation_tsv(rows, Path(cfg.paths.output_dir) / "validation.tsv")
    print(_summary(rows, root, tsv))
    n_ok = sum(row["status"] == "ok" for row in rows)
    errors = [row for row in rows if row["status"] != "ok"]
    if n_ok == 0:
        first = errors[0]
        raise QCFlowError(
            f"{root}: no valid scan ({len(rows)} of {len(rows)} failed; first: "
            f"{first['path']}: {first['reason']}; all reasons in {tsv})"
        )
    if errors:
        log.warning("%d of %d scans failed validation (see %s)", len(errors), len(rows), tsv)
    n_warning = sum(row["status"] == "ok" and bool(row.get("warning")) for row in rows)
    return {
        "n_scans": len(rows),
        "n_ok": n_ok,
        "n_error": len(errors),
        "n_warning": n_warning,
        "validation_tsv": str(tsv),
    }
