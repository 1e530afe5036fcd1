"""Defence settings (the `defend:` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DefendConfig:
    methods: list[str] = field(default_factory=list)
    clean_fraction: float = 0.05  # the defender's clean data budget, as a fraction of the training set

    def check(self) -> None:
        from signtrap.config import require

        require(0.0 < self.clean_fraction <= 1.0, "defend.clean_fraction", f"{self.clean_fraction} is outside (0, 1]")
