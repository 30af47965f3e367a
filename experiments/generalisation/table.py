"""Markdown tables of the generalisation benchmark from ``results/metrics_<tag>.json``.

Usage::

    python experiments/generalisation/table.py [--results DIR] [--groups NAME=TAG,TAG ...]

``--groups`` averages tags (e.g. seeds of one setting): ``default=wgz_d8,wgz_d8_s1,wgz_d8_s2``.
Prints the validation table (one row per tag and per group), the held-out table (per cohort),
detection per kind at moderate-to-severe strength, and the IQM baselines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def _a(m: dict, cohort: str) -> dict | None:
    c = m["cohorts"].get(cohort)
    return c["method_a"] if c else None


def rows(results: dict, tags: list[str], cohort: str) -> list[str]:
    out = []
    for tag in tags:
        a = _a(results[tag], cohort) if tag in results else None
        if a is None:
            continue
        out.append(
            f"| {tag} | {_fmt(a['sensitivity_tau05'], True)} | {_fmt(a['specificity_tau05'], True)}"
            f" | {_fmt(a['sensitivity_tau03'], True)} | {_fmt(a['specificity_tau03'], True)}"
            f" | {_fmt(a['auroc'])} | {_fmt(a['min_kind_detection'], True)} |"
        )
    return out


def group_row(results: dict, name: str, tags: list[str], cohort: str) -> str | None:
    found = [_a(results[t], cohort) for t in tags if t in results and _a(results[t], cohort)]
    if not found:
        return None
    keys = ("sensitivity_tau05", "specificity_tau05", "sensitivity_tau03", "specificity_tau03")
    vals = [np.mean([a[k] for a in found]) for k in keys]
    auroc = np.mean([a["auroc"] for a in found])
    mk = np.mean([a["min_kind_detection"] for a in found])
    cells = " | ".join(_fmt(v, True) for v in vals)
    return f"| **{name}** (mean of {len(found)}) | {cells} | {_fmt(auroc)} | {_fmt(mk, True)} |"


HEADER = (
    "| setting | sens. τ=5 % | spec. τ=5 % | sens. τ=3 % | spec. τ=3 % | AUROC "
    "| worst kind (sev. 2–3) |\n| --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--groups", nargs="*", default=[])
    p.add_argument("--cohorts", nargs="*", default=None)
    args = p.parse_args()
    results = {}
    for f in sorted(args.results.glob("metrics_*.json")):
        m = json.loads(f.read_text())
        results[m["tag"]] = m
    groups = dict(g.split("=", 1) for g in args.groups)
    groups = {k: v.split(",") for k, v in groups.items()}
    cohorts = args.cohorts or sorted({c for m in results.values() for c in m["cohorts"]})
    for cohort in cohorts:
        print(f"\n### {cohort}\n\n{HEADER}")
        for line in rows(results, list(results), cohort):
            print(line)
        for name, tags in groups.items():
            line = group_row(results, name, tags, cohort)
            if line:
                print(line)
        for tag, m in results.items():
            c = m["cohorts"].get(cohort)
            if not c:
                continue
            kinds = c["method_a"]["detection_tau05"]["per_kind_moderate"]
            print(f"\n{tag} per kind (sev. 2–3, τ = 5 %): "
                  + ", ".join(f"{k} {100 * v:.0f} %" for k, v in kinds.items()))  # fmt: skip
            b = c["baselines"]
            print(f"{tag} IQM AUROC: " + ", ".join(f"{k} {v['auroc']:.2f}" for k, v in b.items()))
            if c.get("method_b"):
                mb = c["method_b"]
                rho = _fmt(mb.get("spearman_dice"))
                print(f"{tag} method B: AUROC {_fmt(mb['auroc'])}, rho(Dice) {rho}")


if __name__ == "__main__":
    main()
