"""signtrap: a testbed for backdoor (data-poisoning) attacks on traffic-sign classifiers.

The public Python API mirrors the command line one to one (see signtrap.api):

    import signtrap
    run = signtrap.train("configs/quickstart.yaml", train__epochs=4)
    signtrap.defend(run, "finetune")
    signtrap.report(run)

`import signtrap` stays cheap: the API (and torch) is imported on first use of one of its names.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

API = ("Run", "load_run", "load_config", "train", "evaluate", "defend", "probe", "export", "bench", "requantize", "optimise_sticker", "run",
       "report", "sweep", "prepare_data", "load_data", "fetch_data")
__all__ = [*API, "SigntrapError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from signtrap.api import (Run, bench, defend, evaluate, export, fetch_data, load_config, load_data, load_run,  # noqa: F401
                              prepare_data, probe, report, requantize, run, sweep, train)
    from signtrap.errors import SigntrapError  # noqa: F401


def __getattr__(name: str) -> Any:  # PEP 562: the API is imported on first use
    if name in API:
        from signtrap import api

        return getattr(api, name)
    if name == "SigntrapError":
        from signtrap.errors import SigntrapError

        return SigntrapError
    raise AttributeError(f"module 'signtrap' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
