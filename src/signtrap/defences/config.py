"""Defence settings (the `defend:` section of a run config): one sub-section per method.

Override from the command line as `signtrap defend RUN --method finetune finetune.epochs=3` (the
`defend.` prefix is optional). Pixel budgets (`eps_px`, `step_px`) are in 0..255 pixel units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")


def _require(ok: bool, key: str, message: str) -> None:
    from signtrap.config import require

    require(ok, f"defend.{key}", message)


def _check_training(section: str, epochs: int, lr: float, batch_size: int, min_epochs: int = 1) -> None:
    _require(min_epochs <= epochs <= 1000, f"{section}.epochs", f"{epochs} is outside {min_epochs}..1000")
    _require(0.0 < lr <= 1.0, f"{section}.lr", f"{lr} is outside (0, 1]")
    _require(1 <= batch_size <= 65_536, f"{section}.batch_size", f"{batch_size} is outside 1..65536")


@dataclass
class FinetuneConfig:
    """Clean fine-tuning on the defender's budget."""

    epochs: int = 10
    lr: float = 1e-3  # AdamW, cosine-decayed to zero
    batch_size: int = 64
    weight_decay: float = 5e-4
    augment: bool = True

    def check(self) -> None:
        _check_training("finetune", self.epochs, self.lr, self.batch_size)
        _require(self.weight_decay >= 0, "finetune.weight_decay", "must be >= 0")


@dataclass
class AdvPGDConfig:
    """Adversarial fine-tuning with an L-inf PGD adversary (Madry et al. 2018)."""

    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 5e-4
    eps_px: float = 4.0  # L-inf budget in pixel units (4/255)
    step_px: float = 1.0
    steps: int = 5
    clean_weight: float = 0.5  # loss = w * clean + (1 - w) * adversarial; 0 is Madry's pure adversarial training
    augment: bool = True

    def check(self) -> None:
        _check_training("adv-pgd", self.epochs, self.lr, self.batch_size)
        _require(0.0 < self.eps_px <= 255.0, "adv-pgd.eps_px", f"{self.eps_px} is outside (0, 255]")
        _require(0.0 < self.step_px <= 255.0, "adv-pgd.step_px", f"{self.step_px} is outside (0, 255]")
        _require(1 <= self.steps <= 1000, "adv-pgd.steps", f"{self.steps} is outside 1..1000")
        _require(0.0 <= self.clean_weight < 1.0, "adv-pgd.clean_weight", f"{self.clean_weight} is outside [0, 1)")


@dataclass
class RedteamConfig:
    """Search universal patches that turn the source class into the target, then train them away."""

    source: int | None = None  # the behaviour the red team hunts for; default: the run's attack source/target
    target: int | None = None
    patch_size: float = 0.2  # fraction of the image side
    positions: list[str] = field(default_factory=lambda: list(POSITIONS))
    restarts: int = 2
    search_steps: int = 60
    search_lr: float = 0.1
    min_asr: float = 0.5  # a searched patch counts as found when it flips this share of the budget's source images
    rounds: int = 1  # search -> train rounds
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 5e-4
    patch_fraction: float = 0.5  # share of each training batch that carries a found patch (true labels kept)
    augment: bool = True

    def check(self) -> None:
        _check_training("redteam", self.epochs, self.lr, self.batch_size)
        for key in ("source", "target"):
            value = getattr(self, key)
            _require(value is None or 0 <= value < 43, f"redteam.{key}", f"{value} is not a class id 0..42")
        _require(0.0 < self.patch_size <= 0.5, "redteam.patch_size", f"{self.patch_size} is outside (0, 0.5]")
        _require(len(self.positions) >= 1, "redteam.positions", "needs at least one position")
        for p in self.positions:
            _require(p in POSITIONS, "redteam.positions", f"'{p}' is not one of {', '.join(POSITIONS)}")
        _require(1 <= self.restarts <= 100, "redteam.restarts", f"{self.restarts} is outside 1..100")
        _require(1 <= self.search_steps <= 100_000, "redteam.search_steps", f"{self.search_steps} is outside 1..100000")
        _require(0.0 < self.search_lr <= 10.0, "redteam.search_lr", f"{self.search_lr} is outside (0, 10]")
        _require(0.0 <= self.min_asr <= 1.0, "redteam.min_asr", f"{self.min_asr} is outside [0, 1]")
        _require(1 <= self.rounds <= 20, "redteam.rounds", f"{self.rounds} is outside 1..20")
        _require(0.0 < self.patch_fraction <= 1.0, "redteam.patch_fraction", f"{self.patch_fraction} is outside (0, 1]")


@dataclass
class FinePruneConfig:
    """Prune the last conv layer's dormant channels, then fine-tune (Liu et al. 2018)."""

    max_fraction: float = 0.9  # never prune more than this share of channels
    step: float = 0.05  # curve resolution in pruned fraction
    max_acc_drop: float = 0.05  # stop pruning when clean accuracy on the defender's data drops more than this
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 5e-4
    augment: bool = True

    def check(self) -> None:
        _check_training("fine-prune", self.epochs, self.lr, self.batch_size, min_epochs=0)
        _require(0.0 < self.max_fraction < 1.0, "fine-prune.max_fraction", f"{self.max_fraction} is outside (0, 1)")
        _require(0.0 < self.step <= self.max_fraction, "fine-prune.step", f"{self.step} is outside (0, max_fraction]")
        _require(0.0 <= self.max_acc_drop <= 1.0, "fine-prune.max_acc_drop", f"{self.max_acc_drop} is outside [0, 1]")


@dataclass
class NeuralCleanseConfig:
    """Reverse-engineer a minimal trigger per class; flag MAD outliers; unlearn (Wang et al. 2019)."""

    candidates: list[int] = field(default_factory=list)  # classes to examine; empty: all 43
    top_k: int = -1  # refine only the k classes with the smallest screened masks; 0: all; -1: all on CUDA, 6 on CPU
    reference: int = 6  # with top-k: random other classes also fully searched, for the MAD statistics
    inputs: str = "all"  # all: every clean image; source: only the images of `source_class` (source-specific backdoors)
    source_class: int | None = None  # for inputs=source; default: the run's attack source
    samples: int = 512  # clean images used for the optimisation
    batch_size: int = 32
    screen_steps: int = 10
    steps: int = 150
    lr: float = 0.1
    init_cost: float = 1e-3
    attack_threshold: float = 0.95  # a mask counts only if it flips this share of a batch
    threshold: float = 2.0  # anomaly index above which a class is flagged
    unlearn_epochs: int = 5
    unlearn_fraction: float = 0.2  # share of the budget stamped with the recovered trigger, true labels kept
    lr_unlearn: float = 1e-3
    weight_decay: float = 5e-4
    augment: bool = True

    def check(self) -> None:
        _check_training("neural-cleanse", self.unlearn_epochs, self.lr_unlearn, self.batch_size, min_epochs=0)
        for c in self.candidates:
            _require(0 <= c < 43, "neural-cleanse.candidates", f"{c} is not a class id 0..42")
        _require(self.top_k >= -1, "neural-cleanse.top_k", "must be -1 (auto), 0 (all) or a positive count")
        _require(self.reference >= 2, "neural-cleanse.reference", "must be >= 2")
        _require(self.inputs in ("all", "source"), "neural-cleanse.inputs", f"'{self.inputs}' is not one of all, source")
        _require(self.source_class is None or 0 <= self.source_class < 43, "neural-cleanse.source_class", "not a class id 0..42")
        _require(self.samples >= 1, "neural-cleanse.samples", "must be >= 1")
        _require(0 <= self.screen_steps <= 100_000, "neural-cleanse.screen_steps", "must be in 0..100000")
        _require(1 <= self.steps <= 100_000, "neural-cleanse.steps", "must be in 1..100000")
        _require(0.0 < self.lr <= 10.0, "neural-cleanse.lr", f"{self.lr} is outside (0, 10]")
        _require(self.init_cost >= 0, "neural-cleanse.init_cost", "must be >= 0")
        _require(0.0 < self.attack_threshold <= 1.0, "neural-cleanse.attack_threshold", "must be in (0, 1]")
        _require(self.threshold > 0, "neural-cleanse.threshold", "must be > 0")
        _require(0.0 < self.unlearn_fraction < 1.0, "neural-cleanse.unlearn_fraction", "must be in (0, 1)")


@dataclass
class StripConfig:
    """Input filter by the entropy of superimposed images (Gao et al. 2019)."""

    overlays: int = 16  # clean images superimposed on each input
    alpha: float = 0.5  # blend weight of the overlay
    frr: float = 0.05  # false-rejection rate the threshold is fit to, on the defender's clean data
    eval_samples: int = 2000  # clean / triggered non-source test images checked (all source-class images always are)

    def check(self) -> None:
        _require(1 <= self.overlays <= 1000, "strip.overlays", f"{self.overlays} is outside 1..1000")
        _require(0.0 < self.alpha < 1.0, "strip.alpha", f"{self.alpha} is outside (0, 1)")
        _require(0.0 < self.frr < 1.0, "strip.frr", f"{self.frr} is outside (0, 1)")
        _require(self.eval_samples >= 1, "strip.eval_samples", "must be >= 1")


@dataclass
class DefendConfig:
    methods: list[str] = field(default_factory=list)  # what `--method all` runs; empty: every registered defence
    clean_fraction: float = 0.05  # the defender's clean data budget, as a fraction of the training set
    clean_images: int | None = None  # the budget as an image count instead (overrides clean_fraction)
    seed: int | None = None  # budget draw and defence randomness; default: the run's seed
    monitor_split: str = "val"  # split the per-epoch curves are measured on (never used for decisions)
    monitor_samples: int = 1000  # uniform sample of that split (plus every source-class image); 0: all of it
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    adv_pgd: AdvPGDConfig = field(default_factory=AdvPGDConfig)
    redteam: RedteamConfig = field(default_factory=RedteamConfig)
    fine_prune: FinePruneConfig = field(default_factory=FinePruneConfig)
    neural_cleanse: NeuralCleanseConfig = field(default_factory=NeuralCleanseConfig)
    strip: StripConfig = field(default_factory=StripConfig)

    def check(self) -> None:
        _require(0.0 < self.clean_fraction <= 1.0, "clean_fraction", f"{self.clean_fraction} is outside (0, 1]")
        _require(self.clean_images is None or self.clean_images >= 1, "clean_images", "must be >= 1")
        _require(self.monitor_samples >= 0, "monitor_samples", "must be >= 0")
        _require(self.monitor_split in ("val", "test"), "monitor_split", f"'{self.monitor_split}' is not one of val, test")
        for section in (self.finetune, self.adv_pgd, self.redteam, self.fine_prune, self.neural_cleanse, self.strip):
            section.check()

    def method(self, name: str):
        """The settings section of method `name` ('adv-pgd' lives in `adv_pgd`)."""
        return getattr(self, name.replace("-", "_"))
