"""``report.html``: a static page (works offline, no external assets) summarising a scoring run.

It shows the thresholds, the density-contour plot with every scan, a sortable/filterable table
of ``scores.tsv`` and, for each flagged scan, a three-orientation thumbnail and the per-kind
artifact-variance bars when the uncertainty model was used. Every referenced file sits next to
the page (relative links), so the folder can be copied or zipped as a whole. Links are
percent-encoded, then HTML-escaped, so a scan id with ``#``, ``?``, ``%``, quotes or markup still
points at its own file and never becomes markup.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from qcflow.errors import QCFlowError
from qcflow.utils.io import atomic_path, atomic_write_text

__all__ = ["write_thumbnail", "write_report"]

_DECISION_COLORS = {"pass": "#2e7d32", "review": "#ef6c00", "fail": "#c62828", "": "#777"}


def write_thumbnail(image: Any, path: str | Path) -> Path:
    """Axial, coronal and sagittal central slices of a ``(1, D, H, W)`` RAS volume as one PNG,
    written atomically (a failed write, e.g. a full disk, raises OSError and leaves no file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    vol = vol.reshape(vol.shape[-3:])
    d, h, w = vol.shape
    views = [vol[:, :, w // 2].T, vol[:, h // 2, :].T, vol[d // 2, :, :].T]  # axial, cor, sag
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.2), dpi=80)
    for ax, view, name in zip(axes, views, ("axial", "coronal", "sagittal"), strict=True):
        ax.imshow(view, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def _link(rel: str) -> str:
    """A relative file path as an attribute value: percent-encoded, then HTML-escaped."""
    return html.escape(quote(str(rel), safe="/"))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.4g}"
    return html.escape(str(v))


def _bars(row: Mapping[str, Any], kinds: list[str]) -> str:
    vals = [float(row.get(f"artifact_variance_{k}", float("nan"))) for k in kinds]
    top = max([v for v in vals if np.isfinite(v)] + [1e-12])
    out = []
    for k, v in zip(kinds, vals, strict=True):
        width = 0 if not np.isfinite(v) else 100 * v / top
        out.append(
            f'<div class="bar"><span>{html.escape(k)}</span>'
            f'<i style="width:{width:.0f}px"></i>{_fmt(v)}</div>'
        )
    return "".join(out)


_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3;cursor:pointer;position:sticky;top:0}
.pass{color:#2e7d32}.review{color:#ef6c00;font-weight:bold}.fail{color:#c62828;font-weight:bold}
.error{color:#777;font-style:italic}
.card{display:inline-block;vertical-align:top;border:1px solid #ddd;margin:4px;padding:6px}
.bar{font-size:11px}.bar span{display:inline-block;width:60px}
.bar i{display:inline-block;height:8px;background:#5c6bc0;margin-right:4px}
"""

_JS = """
function sortTable(n){const t=document.getElementById('scores');const rows=[...t.tBodies[0].rows];
const asc=t.dataset.col!=n||t.dataset.dir!='asc';t.dataset.col=n;t.dataset.dir=asc?'asc':'desc';
rows.sort((a,b)=>{const x=a.cells[n].textContent,y=b.cells[n].textContent;
const fx=parseFloat(x),fy=parseFloat(y);const c=(!isNaN(fx)&&!isNaN(fy))?fx-fy:x.localeCompare(y);
return asc?c:-c});rows.forEach(r=>t.tBodies[0].appendChild(r));}
function filterTable(){const q=document.getElementById('q').value.toLowerCase();
const d=document.getElementById('d').value;
for(const r of document.getElementById('scores').tBodies[0].rows){
const ok=(!q||r.textContent.toLowerCase().includes(q))&&(!d||r.dataset.decision==d);
r.style.display=ok?'':'none';}}
"""


def write_report(
    table: pd.DataFrame,
    out_dir: str | Path,
    thresholds: Mapping[str, Any] | None = None,
    density_plot: str | None = None,
    thumbnails: Mapping[str, str] | None = None,
    title: str = "qcflow scoring report",
) -> Path:
    """Write ``<out_dir>/report.html`` (atomically) and return its path.

    Args:
        table: the scores table (``scores.tsv`` columns).
        out_dir: the run folder; ``density_plot`` and ``thumbnails`` are paths relative to it.
        thresholds: decision thresholds to display.
        density_plot: relative path of the density-contour PNG (optional).
        thumbnails: ``scan_id -> relative PNG path`` for flagged scans.

    Raises:
        QCFlowError: the page cannot be written (disk full...), naming it on one line.
    """
    out_dir = Path(out_dir)
    thumbnails = dict(thumbnails or {})
    has_decision = "qc_decision" in table
    kinds = sorted(
        c.removeprefix("artifact_variance_")
        for c in table.columns
        if c.startswith("artifact_variance_") and c != "artifact_variance_total"
    )
    n_ok = int((table["status"] == "ok").sum()) if len(table) else 0
    counts = table["qc_decision"].value_counts().to_dict() if has_decision else {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_JS}</script>",
        f"</head><body><h1>{html.escape(title)}</h1>",
        f"<p>{len(table)} scans: {n_ok} scored, {len(table) - n_ok} errors",
    ]
    if has_decision:
        parts.append(
            " &mdash; "
            + ", ".join(
                f"<span class='{k}'>{k}: {int(counts.get(k, 0))}</span>"
                for k in ("pass", "review", "fail")
            )
        )
    parts.append("</p>")
    if thresholds:
        parts.append("<h2>Thresholds</h2><ul>")
        parts += [f"<li>{html.escape(str(k))}: {_fmt(v)}</li>" for k, v in thresholds.items()]
        parts.append("</ul>")
    if density_plot:
        parts.append(
            f"<h2>Density of the artifact codes</h2><img src='{_link(density_plot)}' "
            "alt='density contours with every scan' style='max-width:640px'>"
        )
    flagged = table[table["qc_decision"].isin(["review", "fail"])] if has_decision else table[:0]
    if len(flagged):
        parts.append(f"<h2>Flagged scans ({len(flagged)})</h2>")
        for row in flagged.to_dict("records"):
            sid = str(row["scan_id"])
            decision = html.escape(str(row["qc_decision"]))
            parts.append(f"<div class='card'><b class='{decision}'>{html.escape(sid)}")
            parts.append(f" &mdash; {decision}</b><br>")
            if sid in thumbnails:
                parts.append(f"<img src='{_link(thumbnails[sid])}' alt='{html.escape(sid)}'>")
            if kinds:
                parts.append(_bars(row, kinds))
            parts.append("</div>")
    columns = [c for c in table.columns if c not in ("file_sha1", "model_id")]
    parts.append("<h2>All scans</h2><p><input id='q' placeholder='filter' oninput='filterTable()'>")
    if has_decision:
        parts.append(
            "<select id='d' onchange='filterTable()'><option value=''>all</option>"
            + "".join(f"<option>{k}</option>" for k in ("pass", "review", "fail"))
            + "</select>"
        )
    else:
        parts.append("<select id='d' hidden><option value=''></option></select>")
    parts.append("</p><table id='scores'><thead><tr>")
    parts += [f"<th onclick='sortTable({i})'>{html.escape(c)}</th>" for i, c in enumerate(columns)]
    parts.append("</tr></thead><tbody>")
    for row in table.to_dict("records"):
        decision = str(row.get("qc_decision") or "") if row.get("status") == "ok" else "error"
        decision = html.escape("" if decision == "nan" else decision)
        parts.append(f"<tr data-decision='{decision}' class='{decision}'>")
        parts += [f"<td>{_fmt(row[c])}</td>" for c in columns]
        parts.append("</tr>")
    parts.append("</tbody></table></body></html>")
    path = out_dir / "report.html"
    try:
        atomic_write_text(path, "".join(parts))
    except OSError as exc:
        reason = (exc.strerror or str(exc) or type(exc).__name__).splitlines()[0]
        raise QCFlowError(f"{path}: cannot write the report ({reason})") from exc
    return path
