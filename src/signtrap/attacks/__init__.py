"""Triggers and poisoning."""
from signtrap.attacks.poison import PoisonPlan, TrainingSet, build_training_set, manifest, plan_poison
from signtrap.attacks.triggers import Trigger, make_trigger, place, stamp, stamp_placed

__all__ = ["PoisonPlan", "TrainingSet", "Trigger", "build_training_set", "make_trigger", "manifest", "place", "plan_poison", "stamp", "stamp_placed"]
