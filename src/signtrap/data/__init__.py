"""The data layer: real GTSRB from any layout, a uint8 cache, and the built-in SynthSigns."""
from signtrap.classes import CLASS_NAMES, NUM_CLASSES, SPEED_LIMIT_100, STOP
from signtrap.data.cache import SignData, load, prepare
from signtrap.data.splits import Splits, track_split

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "SPEED_LIMIT_100", "STOP", "SignData", "Splits", "load", "prepare", "track_split"]
