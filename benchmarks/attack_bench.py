"""The attack's headline figures on real GTSRB: the backdoored run against the same config with zero poison.

    python benchmarks/attack_bench.py [--config configs/badnets_stop_to_100.yaml] [--root ../shared/gtsrb]
                                      [--seeds 0,1,2] [--runs-dir DIR] [key=value ...]

Prints clean accuracy, ASR, clean stop recall and false-trigger rate (test and validation, with counts),
the poisoned fraction, the clean-accuracy gap to the zero-poison run, and the training time of each. With
several seeds it prints every pair and the mean gap: on the 1,000-image test sample one seed's gap moves by
several tenths of a point from seed to seed. A --runs-dir that already holds a finished run reuses it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/badnets_stop_to_100.yaml")
    parser.add_argument("--root", default=os.environ.get("SIGNTRAP_GTSRB", "../shared/gtsrb"))
    parser.add_argument("--runs-dir", default=None, help="where to train (default: a temporary folder)")
    parser.add_argument("--seeds", type=seed_list, default=[0],
                        help="comma-separated, e.g. 0,1,2: one backdoored and one zero-poison run per seed")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from signtrap.config import load_config
    from signtrap.evaluation.metrics import fmt_rate

    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="signtrap-attack-"))
    common = [f"data.root={args.root}", f"runs_dir={runs_dir}", *args.overrides]
    results: dict[str, list] = {"backdoored": [], "zero poison": []}
    for seed in args.seeds:
        for label, extra in (("backdoored", []), ("zero poison", ["attack.kind=none"])):
            name = f"{label.replace(' ', '_')}-seed{seed}"
            cfg = load_config(args.config, [*common, f"name={name}", f"seed={seed}", *extra])
            results[label].append(trained(cfg))

    print(f"\nconfig {args.config} {' '.join(args.overrides)}; seeds {','.join(map(str, args.seeds))}")
    for label, rows in results.items():
        for seed, (metrics, manifest, seconds) in zip(args.seeds, rows):
            print(f"\n{label}, seed {seed}: {manifest['poisoned']} poisoned ({100 * manifest['poisoned_fraction']:.2f}% of "
                  f"{manifest['train_rows']} training images), {manifest.get('cover', 0)} cover; "
                  + ("reused a finished run" if seconds is None else f"trained in {seconds:.0f} s"))
            for split in ("test", "val"):
                m = metrics[split]
                print(f"  {split:<5} clean acc {fmt_rate(m['clean_acc'])} | ASR {fmt_rate(m['asr'])} | "
                      f"stop recall {fmt_rate(m['stop_recall'])} | false-trigger {fmt_rate(m['false_trigger'])}")
    print("\nclean-accuracy cost of the backdoor (zero poison minus backdoored, points):")
    for split in ("test", "val"):
        gaps = [100 * (z[0][split]["clean_acc"]["rate"] - b[0][split]["clean_acc"]["rate"])
                for b, z in zip(results["backdoored"], results["zero poison"])]
        pooled = {label: sum(r[0][split]["clean_acc"]["k"] for r in rows) / sum(r[0][split]["clean_acc"]["n"] for r in rows)
                  for label, rows in results.items()}
        print(f"  {split:<5} per seed {' '.join(f'{g:+.2f}' for g in gaps)}; mean {sum(gaps) / len(gaps):+.2f} "
              f"(pooled clean acc: backdoored {100 * pooled['backdoored']:.2f}%, zero poison {100 * pooled['zero poison']:.2f}%)")
    return 0


def seed_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def trained(cfg) -> tuple[dict, dict, float | None]:
    """Train the run, or reuse it when --runs-dir already holds it finished with the same config."""
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    run = cfg.run_dir
    done = (run / "metrics.json").is_file() and (run / "config.yaml").is_file() and load_config(run / "config.yaml") == cfg
    start = time.perf_counter()
    if not done:
        train(cfg, overwrite=True)
    seconds = None if done else time.perf_counter() - start
    return json.loads((run / "metrics.json").read_text()), json.loads((run / "manifest.json").read_text()), seconds


if __name__ == "__main__":
    sys.exit(main())
