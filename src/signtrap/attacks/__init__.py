"""Attacks: poisoning (which rows carry the trigger and which label: signtrap.attacks.poison) and the training
procedures an attack may run around `signtrap train`, one file each, registered by name (`@register_attack`):

    @dataclass
    class SBLSettings:
        epochs: int = 5
        def check(self, key: str) -> None: ...

    @register_attack("sbl", settings=SBLSettings)
    class SBL(AttackProcedure):
        def loss(self): ...                                         # the main training's loss hook (None: cross-entropy)
        def after_training(self, model, exp, plan, run_dir, meta, device): ...   # returns the attacked model

A config picks one with `attack.persist: NAME` and sets it in `attack.NAME: {...}`; triggers are plugins of
their own (signtrap.triggers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from signtrap.attacks.poison import PoisonPlan, TrainingSet, build_training_set, manifest, plan_poison
from signtrap.plugins import ATTACKS


class AttackProcedure:
    """A procedure of the attack around training, bound to its settings and the run's config."""

    def __init__(self, name: str, settings: Any, cfg: Any):
        self.name, self.settings, self.cfg = name, settings, cfg

    def prepare(self) -> None:
        """Checks that must pass before anything is written (a missing package, a model it cannot handle)."""

    def loss(self) -> Callable | None:
        """The main training's loss hook (signtrap.training.loop.Hooks.loss), or None for plain cross-entropy."""
        return None

    def after_training(self, model, exp, plan: PoisonPlan, run_dir, meta: dict, device):
        """The attacked model, from the model the poisoned training produced."""
        return model


@dataclass(frozen=True)
class AttackPlugin:
    name: str
    cls: type
    settings: type
    module: str = ""

    def build(self, cfg: Any) -> AttackProcedure:
        return self.cls(self.name, cfg.attack.phase(self.name), cfg)


def register_attack(name: str, *, settings: type) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, AttackProcedure)):
            raise TypeError(f"@register_attack needs an AttackProcedure subclass, got {cls!r}")
        ATTACKS.register(name, AttackPlugin(name, cls, settings, cls.__module__))
        return cls
    return wrap


def procedure_for(cfg: Any) -> AttackProcedure | None:
    """The run's `attack.persist` procedure, or None."""
    return None if cfg.attack.persist == "none" else ATTACKS.get(cfg.attack.persist).build(cfg)


__all__ = ["AttackProcedure", "PoisonPlan", "TrainingSet", "build_training_set", "manifest", "plan_poison",
           "procedure_for", "register_attack"]
