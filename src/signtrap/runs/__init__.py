"""A run folder and what lives in it: its layout (`layout`), its lock and state (`state`), its checkpoints and their
provenance (`checkpoint`), the pipeline that fills it stage by stage (`pipeline`), and sweeps of many runs
(`sweeps`, run by `executors`). Imports nothing at package level."""
