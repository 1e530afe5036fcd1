"""Removed or only hidden? The re-activation probe (`reactivation`: the probe set, the zero-poison reference, the
verdict) and `signtrap probe` on a defended model (`probe`). Imports nothing at package level."""
