"""Training: the one hooked loop every training goes through (`loop`: attack training, defences, the probe, the
reference), `trainer` (a run from config to checkpoint and metrics), augmentation and multi-process data parallel.
Imports nothing at package level."""
