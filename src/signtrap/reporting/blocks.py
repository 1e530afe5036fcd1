"""The building blocks of a report section, and the formatting helpers every section uses.

Sections (and each defence's own report block, see `signtrap.defences`) are lists of these blocks;
`signtrap.reporting.render` turns them into HTML and Markdown.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signtrap.probing.reactivation import probe_segment
from signtrap.reporting import figures as fig
from signtrap.runs import layout


@dataclass
class P:
    text: str


@dataclass
class Note:
    """Something absent or wrong, shown prominently."""

    text: str


@dataclass
class H:
    text: str


@dataclass
class Img:
    name: str  # file stem in report_files/
    png: bytes
    caption: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    highlight: list[int] = field(default_factory=list)  # row indices to emphasise


@dataclass
class Pre:
    text: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)



def persistence_curve(folder: Path) -> list[dict]:
    """A defence folder's persistence curve (persistence.csv), with its re-activation probe (probe.json), when
    there is one, appended as the final segment (epochs continue; column `segment`)."""
    rows = read_csv(folder / "persistence.csv")
    try:
        probe = json.loads((folder / layout.PROBE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return rows
    curve = ((probe.get("curves") or {}).get("model") or []) if isinstance(probe, dict) else []
    return probe_segment(rows, curve) if rows and curve else rows


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v) if v not in ("", None) else None
                except ValueError:
                    parsed[k] = v
            out.append(parsed)
    return out


def pct(entry: Any, digits: int = 1) -> str:
    rate = fig._rate(entry)
    return "n/a" if rate is None else f"{100 * rate:.{digits}f}%"


def pct_ci(entry: Any) -> str:
    if not isinstance(entry, dict) or entry.get("rate") is None:
        return "n/a"
    text = f"{100 * entry['rate']:.1f}%"
    ci = entry.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    if "k" in entry and "n" in entry:
        text += f" ({entry['k']}/{entry['n']})"
    return text


def safe(into: "Section | list", what: str, fn, *args, **kwargs) -> Any:
    """Run one figure/table builder; on failure `into` (a section or a list of blocks) gets a note instead of
    the whole report failing."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # a report must render whatever else it can
        getattr(into, "blocks", into).append(Note(f"{what} could not be built: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        return None


def num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"
