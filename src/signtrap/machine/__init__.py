"""The machine signtrap runs on: the CPU cores this process may use and the core budget that concurrent
signtrap processes share (`cores`), the device, threads, precision and package versions a run records
(`environment`), progress output (`progress`) and a sweep's runs dying with the sweep (`lifeline`).
The package itself imports only `cores` (no torch)."""
from signtrap.machine.cores import Claim, allowance, allowed_cpus, check_threads, claim, claimed, holders

__all__ = ["Claim", "allowance", "allowed_cpus", "check_threads", "claim", "claimed", "holders"]
