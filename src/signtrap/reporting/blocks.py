"""The blocks a report section is made of, shared by the collector (build) and the renderers (render)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
