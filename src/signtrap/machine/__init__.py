"""The machine signtrap runs on: the CPU cores this process may use and the core budget that concurrent
signtrap processes share (`signtrap.machine.cores`). Imports no torch."""
from signtrap.machine.cores import Claim, allowance, allowed_cpus, check_threads, claim, claimed, holders

__all__ = ["Claim", "allowance", "allowed_cpus", "check_threads", "claim", "claimed", "holders"]
