"""The data layer: the uint8 cache every dataset plugin (signtrap.datasets) decodes into, splits, and the readers
and generators behind the built-in datasets (GTSRB archives, SynthSigns)."""
