"""Two signtrap trainings started together on one machine, against one alone (issue 24: each >= 40% of solo).

    python benchmarks/concurrency_bench.py [--config configs/quickstart.yaml] [--policy wait|share|off]
                                           [--shared-budget] [-- OVERRIDES...]

Runs `signtrap train CONFIG train.epochs=2 data.synth_per_class=150` (default overrides) once alone, then twice
started together, default thread settings (train.threads 0: the cores each process may use). For each run it
reports the training images/s the run itself recorded (log.jsonl: images trained / epoch seconds, waiting for
cores excluded), the effective images/s (images trained / wall-clock seconds since the pair was started, waiting
included: what the user gets), the cores it held (provenance.json) and how long it waited for them. The core
budget is a private folder (only these processes share it) unless --shared-budget. The machine's load average
is printed before each phase: numbers taken above ~0.5 are not those of an idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OVERRIDES = ["train.epochs=2", "data.synth_per_class=150"]


def launch(config: str, overrides: list[str], name: str, runs: Path, env: dict, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "signtrap", "train", config, *overrides, f"name={name}", f"runs_dir={runs}"]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def measure(run: Path, started: float, finished: float, log: Path) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    images = sum(r["images_per_s"] * r["seconds"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    machine = json.loads((run / "provenance.json").read_text()).get("machine", {})
    text = log.read_text(errors="replace")
    waited = re.findall(r"got \d+ CPU cores? after waiting (\d+) s", text)
    return {"train_images_per_s": images / seconds, "effective_images_per_s": images / (finished - started),
            "images": round(images), "epoch_seconds": round(seconds, 1), "wall_s": round(finished - started, 1),
            "cores": machine.get("cores_claimed"), "threads": machine.get("torch_threads"),
            "waited_s": int(waited[0]) if waited else 0, "shared_note": "running on" in text and "CPU cores free" in text}


def phase(config: str, overrides: list[str], names: list[str], runs: Path, env: dict) -> dict:
    load = os.getloadavg()[0]
    print(f"load average before {'+'.join(names)}: {load:.2f}" + ("  (NOT idle: numbers are not those of an idle machine)"
                                                                 if load > 0.5 else ""), flush=True)
    started = time.perf_counter()
    procs = {n: launch(config, overrides, n, runs, env, runs / f"{n}.log") for n in names}
    ends = {}
    while len(ends) < len(procs):
        for n, p in procs.items():
            if n not in ends and p.poll() is not None:
                ends[n] = time.perf_counter()
                if p.returncode != 0:
                    print((runs / f"{n}.log").read_text()[-3000:], file=sys.stderr)
                    raise SystemExit(f"{n}: signtrap train failed ({p.returncode})")
        time.sleep(0.2)
    return {n: measure(runs / n, started, ends[n], runs / f"{n}.log") | {"load_before": round(load, 2)} for n in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--policy", choices=("wait", "share", "off"), default="wait", help="SIGNTRAP_CORES for the runs")
    parser.add_argument("--shared-budget", action="store_true", help="use the machine's real core budget, not a private one")
    parser.add_argument("--keep", action="store_true", help="keep the runs (printed folder)")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("overrides", nargs="*", help=f"config overrides (default: {' '.join(DEFAULT_OVERRIDES)})")
    args = parser.parse_args()
    overrides = args.overrides or DEFAULT_OVERRIDES
    work = Path(tempfile.mkdtemp(prefix="signtrap-concurrency-"))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["SIGNTRAP_CORES"] = args.policy
    if not args.shared_budget:
        env["SIGNTRAP_CORES_DIR"] = str(work / "cores")
    try:
        # the data cache is built once, before anything is timed
        subprocess.run([sys.executable, "-m", "signtrap", "--quiet", "data", "prepare", args.config, *overrides], env=env,
                       check=True, stdin=subprocess.DEVNULL)
        solo = phase(args.config, overrides, ["solo"], work, env)["solo"]
        pair = phase(args.config, overrides, ["a", "b"], work, env)
        print()
        print(f"{'run':<6}{'train img/s':>12}{'% solo':>8}{'effective img/s':>17}{'% solo':>8}{'cores':>8}{'waited s':>10}{'wall s':>8}")
        for name, r in {"solo": solo, **pair}.items():
            print(f"{name:<6}{r['train_images_per_s']:>12.0f}{100 * r['train_images_per_s'] / solo['train_images_per_s']:>7.0f}%"
                  f"{r['effective_images_per_s']:>17.0f}{100 * r['effective_images_per_s'] / solo['effective_images_per_s']:>7.0f}%"
                  f"{','.join(map(str, r['cores'] or [])) or '-':>8}{r['waited_s']:>10}{r['wall_s']:>8}")
        worst = min(r["effective_images_per_s"] for r in pair.values()) / solo["effective_images_per_s"]
        print(f"\npolicy {args.policy}: the slower of the pair reached {100 * worst:.0f}% of solo (effective, waiting included); "
              f"target >= 40% {'met' if worst >= 0.4 else 'MISSED'}")
        if args.json:
            Path(args.json).write_text(json.dumps({"policy": args.policy, "overrides": overrides, "solo": solo, "pair": pair}, indent=2))
    finally:
        if args.keep:
            print(f"runs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
