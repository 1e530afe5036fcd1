"""Poisoning: which rows carry the trigger and which label, and the attacks that change training (triggers: signtrap.triggers)."""
from signtrap.attacks.poison import PoisonPlan, TrainingSet, build_training_set, manifest, plan_poison

__all__ = ["PoisonPlan", "TrainingSet", "build_training_set", "manifest", "plan_poison"]
