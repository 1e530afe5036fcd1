"""The attack's headline figures on real GTSRB: the backdoored run against the same config with zero poison.

    python benchmarks/attack_bench.py [--config configs/badnets_stop_to_100.yaml] [--root ../shared/gtsrb] [key=value ...]

Prints clean accuracy, ASR, clean stop recall and false-trigger rate (test and validation, with counts),
the poisoned fraction, the clean-accuracy gap to the zero-poison run, and the training time of each.
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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from signtrap.config import load_config
    from signtrap.metrics import fmt_rate
    from signtrap.train import train

    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="signtrap-attack-"))
    common = [f"data.root={args.root}", f"runs_dir={runs_dir}", *args.overrides]
    results = {}
    for label, extra in (("backdoored", ["name=backdoored"]), ("zero poison", ["name=zero_poison", "attack.kind=none"])):
        cfg = load_config(args.config, [*common, *extra])
        start = time.perf_counter()
        run = train(cfg, overwrite=True)
        seconds = time.perf_counter() - start
        metrics = json.loads((run / "metrics.json").read_text())
        manifest = json.loads((run / "manifest.json").read_text())
        results[label] = (metrics, manifest, seconds)

    print(f"\nconfig {args.config} {' '.join(args.overrides)}")
    for label, (metrics, manifest, seconds) in results.items():
        print(f"\n{label}: {manifest['poisoned']} poisoned ({100 * manifest['poisoned_fraction']:.2f}% of "
              f"{manifest['train_rows']} training images), {manifest.get('cover', 0)} cover; trained in {seconds:.0f} s")
        for split in ("test", "val"):
            m = metrics[split]
            print(f"  {split:<5} clean acc {fmt_rate(m['clean_acc'])} | ASR {fmt_rate(m['asr'])} | "
                  f"stop recall {fmt_rate(m['stop_recall'])} | false-trigger {fmt_rate(m['false_trigger'])}")
    gap = {s: 100 * (results["zero poison"][0][s]["clean_acc"]["rate"] - results["backdoored"][0][s]["clean_acc"]["rate"])
           for s in ("test", "val")}
    print(f"\nclean-accuracy cost of the backdoor (zero poison minus backdoored): test {gap['test']:+.2f} points, "
          f"val {gap['val']:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
