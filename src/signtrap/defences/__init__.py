"""Defence registry in the style of timm: `@register_defence("name")` functions and `get_defence(name)`.

A defence is `fn(model, clean_data, settings, context) -> DefenceResult`; call it through
`defend(model, clean_data, config, method)`. The defence modules are imported lazily, because
`signtrap.config` imports `signtrap.defences.config` while it is itself being imported.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from signtrap.defences.common import CleanData, DefenceContext, DefenceResult

MODULES = ("finetune", "adv_pgd", "redteam", "fine_prune", "neural_cleanse", "strip")
_DEFENCES: dict[str, Callable] = {}
_loaded = False


def register_defence(name: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        _DEFENCES[name] = fn
        fn.defence_name = name
        return fn

    return wrap


def _load() -> None:
    global _loaded
    if not _loaded:
        for module in MODULES:
            importlib.import_module(f"signtrap.defences.{module}")
        _loaded = True


def list_defences() -> list[str]:
    """Registered names, in the order of the issue (cheap repairs first, input filter last)."""
    _load()
    return list(_DEFENCES)


def get_defence(name: str) -> Callable:
    _load()
    if name not in _DEFENCES:
        from signtrap.errors import unknown

        raise unknown("defence method", name, _DEFENCES)
    return _DEFENCES[name]


create_defence = get_defence


def defend(model, clean_data: "CleanData", config, method: str, context: "DefenceContext | None" = None) -> "DefenceResult":
    """Run defence `method` on a copy of `model`; `config` is a DefendConfig (or the method's own section)."""
    import copy

    from signtrap.defences.common import DefenceContext
    from signtrap.defences.config import DefendConfig

    fn = get_defence(method)
    settings = config.method(method) if isinstance(config, DefendConfig) else config
    settings.check()
    context = context or DefenceContext(device=next(model.parameters()).device)
    return fn(copy.deepcopy(model), clean_data, settings, context)


def __getattr__(name: str):
    if name in ("CleanData", "DefenceContext", "DefenceResult"):
        from signtrap.defences import common

        return getattr(common, name)
    raise AttributeError(f"module 'signtrap.defences' has no attribute '{name}'")
