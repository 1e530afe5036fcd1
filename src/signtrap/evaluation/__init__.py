"""Evaluation: the backdoor metrics with counts and Wilson intervals (`metrics`) and `signtrap eval` (`evaluate`).
Imports nothing at package level."""
