"""Defences, one file each, registered by name when their module is imported.

A defence module declares its settings dataclass, its algorithm, a one-line summary for the comparison
table and its block of the HTML report, in one place:

    @dataclass
    class AdvPGDSettings(TrainSettings):
        eps_px: float = 4.0
        def check(self) -> None: ...

    @register_defence("adv-pgd", settings=AdvPGDSettings, kind="repair")
    def adv_pgd(model, clean, settings, ctx) -> DefenceResult: ...

    @adv_pgd.summary          # optional: lines under the comparison table
    def _(report: dict) -> list[str]: ...

    @adv_pgd.report_block     # optional: blocks of the report's defence section
    def _(report: dict, folder: Path) -> list: ...

The registry (`signtrap.plugins.DEFENCES`) imports every module of this package on first use, so a new
defence is one new file; a defence registered anywhere else (a test, a notebook) is accepted by
`signtrap defend`, the pipeline and the `defend:` config section alike. Its name is its one spelling in
YAML (`defend: {adv-pgd: {eps_px: 8}}`), on the command line (`defend.adv-pgd.eps_px=8`), in errors and
in reports.

Kinds: `repair` returns a repaired model; `detect` flags classes or inputs (and may repair when it
finds something, as Neural Cleanse's unlearning does); `filter` rejects inputs at run time (STRIP).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from signtrap.defences.common import CleanData, DefenceContext, DefenceResult
from signtrap.errors import ConfigError
from signtrap.plugins import DEFENCES

KINDS = ("repair", "detect", "filter")


@dataclass
class Defence:
    """A registered defence: its name, settings class, algorithm and presentation."""

    name: str
    fn: Callable[..., DefenceResult]
    settings: type
    kind: str = "repair"
    module: str = ""
    summarize: Callable[[dict], list[str]] | None = None
    report: Callable[[dict, Path], list] | None = None
    detects: Callable[[dict, int], dict | None] | None = None  # (report details, attack target) -> detection outcome
    doc: str = field(default="", repr=False)

    def __call__(self, model: nn.Module, clean: CleanData, settings: Any, ctx: DefenceContext) -> DefenceResult:
        return self.fn(model, clean, settings, ctx)

    def summary(self, fn: Callable[[dict], list[str]]) -> Callable[[dict], list[str]]:
        """Decorator: lines printed under the comparison table for this defence's report."""
        self.summarize = fn
        return fn

    def report_block(self, fn: Callable[[dict, Path], list]) -> Callable[[dict, Path], list]:
        """Decorator: blocks (signtrap.reporting.blocks) of the report's section for this defence."""
        self.report = fn
        return fn

    def detection(self, fn: Callable[[dict, int], dict | None]) -> Callable[[dict, int], dict | None]:
        """Decorator: what this detector saw, from its report's details (the report's detection table lists every
        defence that declares one): `{"flagged": [...], "statistic", "max", "target_value", "top_ranked"}` for a
        class detector (`flag_outcome`), `{"detection", "frr", ...}` for an input filter; None when it did not measure."""
        self.detects = fn
        return fn

    def default_settings(self) -> Any:
        return self.settings()

    @property
    def config_key(self) -> str:
        return f"defend.{self.name}"


def register_defence(name: str, *, settings: type, kind: str = "repair") -> Callable[[Callable], Defence]:
    if kind not in KINDS:
        raise ValueError(f"defence kind '{kind}' is not one of {', '.join(KINDS)}")

    def wrap(fn: Callable) -> Defence:
        spec = Defence(name, fn, settings, kind, fn.__module__, doc=(fn.__doc__ or "").strip())
        DEFENCES.register(name, spec)
        return spec

    return wrap


def get_defence(name: str) -> Defence:
    return DEFENCES.get(name)


def list_defences() -> list[str]:
    """Registered names, sorted (independent of import order)."""
    return DEFENCES.names()


def defend(model: nn.Module, clean: CleanData, method: str, settings: Any = None,
           context: DefenceContext | None = None) -> DefenceResult:
    """Run defence `method` on a copy of `model` (the original is never changed)."""
    spec = get_defence(method)
    settings = spec.default_settings() if settings is None else settings
    if not isinstance(settings, spec.settings):
        raise ConfigError(f"defence {method}: settings must be a {spec.settings.__name__}, got {type(settings).__name__}")
    settings.check(spec.config_key)
    context = context or DefenceContext(device=next(model.parameters()).device)
    return spec(copy.deepcopy(model), clean, settings, context)


__all__ = ["CleanData", "Defence", "DefenceContext", "DefenceResult", "defend", "get_defence", "list_defences",
           "register_defence"]
