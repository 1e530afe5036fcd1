"""Deprecated shim: GTSRB's label space lives in its dataset plugin (signtrap.datasets.gtsrb.LABELS); a run's classes
are `Experiment.classes` / `SignData.classes`. Kept only until the last importers move; import nothing new from here."""
from signtrap.datasets.gtsrb import LABELS, SPEED_LIMIT_100, STOP

NUM_CLASSES = LABELS.num_classes
CLASS_NAMES = LABELS.names

__all__ = ["CLASS_NAMES", "NUM_CLASSES", "SPEED_LIMIT_100", "STOP"]
