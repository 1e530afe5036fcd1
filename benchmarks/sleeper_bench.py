"""The sleeper's headline figures: a backdoor dormant in FP32 and live in signtrap's INT8 export (issue 15).

    python benchmarks/sleeper_bench.py [--config configs/sleeper_int8.yaml] [--root ../shared/gtsrb]
                                       [--seeds 0,1,2] [--runs-dir DIR] [--zero-poison] [--quantizers]
                                       [--efrap] [key=value ...]

Trains one `attack.dormant: int8` run per seed (a --runs-dir that already holds it finished is reused) and
prints, per seed and pooled: clean accuracy, ASR, stop recall and false-trigger rate of the backdoored model
(before the repair) and of the sleeper, each in FP32 and through ONNX Runtime INT8 (the run's own export
settings and calibration images), with counts; whether every INT8 weight tensor of the sleeper equals the
backdoored model's; how far the calibrated activation ranges moved; the training time; and the issue's targets
(FP32 ASR <= 2% and no more than the zero-poison model's, INT8 ASR >= 95%, clean accuracy of both within
1 point of the backdoored model, training under 15 minutes).

--zero-poison   also trains the same config with attack.kind=none per seed (the FP32 ASR baseline).
--quantizers    the ASR matrix per ONNX Runtime quantizer: MinMax/Entropy/Percentile calibration x per-tensor/
                per-channel weights, and MinMax with part of the calibration images triggered.
--runtimes      the ASR matrix per runtime x quantizer through `signtrap export --quantizers all` and `signtrap bench`
                for the sleeper and for the backdoored model (exported from a temporary copy of the run holding
                backdoored.pt as its model); every runtime installed here, each with its own quantizer.
--efrap         the deployment-time defence (signtrap.deploy.requant): INT8 ASR and clean accuracy after EFRAP
                rounding, learned on 512 of the defender's clean images (defend.clean_fraction of the training split).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from attack_bench import seed_list, trained as trained_run  # noqa: E402 (benchmarks/ is the script's folder)

KEYS = ("clean_acc", "asr", "stop_recall", "false_trigger")
QUANTIZERS = (("minmax", False, "clean"), ("minmax", True, "clean"), ("entropy", False, "clean"), ("entropy", True, "clean"),
              ("percentile", False, "clean"), ("percentile", True, "clean"), ("minmax", False, "mixed"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sleeper_int8.yaml")
    parser.add_argument("--root", default=os.environ.get("SIGNTRAP_GTSRB", "../shared/gtsrb"))
    parser.add_argument("--runs-dir", default=None, help="where to train (default: a temporary folder)")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2])
    parser.add_argument("--zero-poison", action="store_true", help="also train attack.kind=none per seed")
    parser.add_argument("--quantizers", action="store_true", help="ASR per ONNX Runtime quantizer setting")
    parser.add_argument("--runtimes", action="store_true", help="ASR per runtime x quantizer via signtrap export/bench")
    parser.add_argument("--efrap", action="store_true", help="INT8 after the EFRAP deployment-time defence")
    parser.add_argument("--threads", type=int, default=0, help="threads for the ONNX Runtime measurements (default: all)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import torch

    from signtrap.config import load_config
    from signtrap.errors import SigntrapError

    if args.threads:
        torch.set_num_threads(args.threads)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="signtrap-sleeper-"))
    common = [f"data.root={args.root}", f"runs_dir={runs_dir}", *args.overrides]
    sleepers, zeros = [], []
    for seed in args.seeds:
        cfg = load_config(args.config, [*common, f"name=sleeper-seed{seed}", f"seed={seed}"])
        if cfg.attack.dormant == "none":
            raise SigntrapError(f"{args.config}: attack.dormant is none; this benchmark measures a dormant backdoor")
        sleepers.append((seed, cfg, *trained(cfg)))
        if args.zero_poison:
            zcfg = load_config(args.config, [*common, f"name=zero_poison-seed{seed}", f"seed={seed}", "attack.kind=none",
                                             "attack.dormant=none"])
            zeros.append((seed, zcfg, *trained(zcfg)))

    print(f"\nconfig {args.config} {' '.join(args.overrides)}; seeds {','.join(map(str, args.seeds))}")
    for seed, cfg, report, metrics, seconds in sleepers:
        print(f"\nseed {seed}: " + ("reused a finished run" if seconds is None else f"trained in {seconds / 60:.1f} min")
              + f" (repair {report['repair_seconds']:.0f} s); INT8 weights identical to the backdoored model's: "
              f"{sum(report['int8_weights_identical'].values())}/{len(report['int8_weights_identical'])} tensors; "
              f"weights at their box edge {100 * report['weights_at_box_edge']:.1f}%")
        drift = report["activation_scale_ratio"]
        print(f"  calibrated activation scale, sleeper / backdoored: {min(drift.values()):.2f}..{max(drift.values()):.2f} "
              f"over {len(drift)} tensors")
        for split in ("test", "val"):
            for model in ("backdoored", "sleeper"):
                for v in ("fp32", "int8"):
                    print(f"  {split:<5} {model:<10} {v.upper():<5}" + row(report["metrics"][split][model][v]))
    for seed, cfg, _, metrics, seconds in zeros:
        for split in ("test", "val"):
            print(f"  zero poison seed {seed} {split:<5} FP32 " + row(metrics[split]))

    print("\npooled over seeds:")
    pooled = {}
    for split in ("test", "val"):
        for model in ("backdoored", "sleeper"):
            for v in ("fp32", "int8"):
                pooled[split, model, v] = {k: pool([r["metrics"][split][model][v][k] for _, _, r, _, _ in sleepers]) for k in KEYS}
                print(f"  {split:<5} {model:<10} {v.upper():<5}" + row(pooled[split, model, v]))
        if zeros:
            pooled[split, "zero", "fp32"] = {k: pool([m[split][k] for _, _, _, m, _ in zeros]) for k in KEYS}
            print(f"  {split:<5} {'zero poison':<10} FP32 " + row(pooled[split, "zero", "fp32"]))

    print("\ntargets (issue 15):")
    for split in ("test", "val"):
        fp32, int8 = pooled[split, "sleeper", "fp32"], pooled[split, "sleeper", "int8"]
        ref = pooled[split, "backdoored", "fp32"]["clean_acc"]["rate"]
        zero = pooled.get((split, "zero", "fp32"))
        zero_txt = f", zero poison {pct(zero['asr'])}" if zero else " (zero-poison baseline: --zero-poison)"
        print(f"  {split:<5} FP32 ASR {pct(fp32['asr'])} <= 2%{zero_txt}: {verdict(fp32['asr']['rate'] <= 0.02 and (not zero or fp32['asr']['rate'] <= zero['asr']['rate']))}")
        print(f"  {split:<5} INT8 ASR {pct(int8['asr'])} >= 95%: {verdict(int8['asr']['rate'] >= 0.95)}")
        for v, m in (("FP32", fp32), ("INT8", int8)):
            gap = 100 * (m["clean_acc"]["rate"] - ref)
            print(f"  {split:<5} {v} clean acc {pct(m['clean_acc'])}, {gap:+.2f} points vs backdoored FP32 {100 * ref:.2f}%: "
                  f"{verdict(abs(gap) <= 1.0)}")
    times = [s for *_, s in sleepers if s is not None]
    if times:
        print(f"  training (backdoor + repair + verification) {', '.join(f'{t / 60:.1f}' for t in times)} min <= 15: "
              f"{verdict(max(times) <= 900)} (wall clock on this machine; rerun on a quiet one before quoting)")

    if args.quantizers:
        quantizer_matrix(sleepers)
    if args.runtimes:
        runtime_matrix(sleepers, runs_dir)
    if args.efrap:
        efrap_table(sleepers)
    return 0


def quantizer_matrix(sleepers) -> None:
    """ASR and clean accuracy (validation + test pooled over seeds) per ONNX Runtime quantizer setting."""
    from signtrap.attacks.dormant import evaluate_onnx, quantize_model
    from signtrap.deploy.exporter import calibration_images

    print("\nONNX Runtime INT8, per quantizer (val + test pooled over seeds; the sleeper is keyed to "
          "export.calib_method/per_channel of its config):")
    print(f"  {'calibration':<11} {'weights':<11} {'images':<7}" + "".join(f"{h:>22}" for h in ("backdoored ASR", "sleeper ASR", "sleeper clean acc")))
    for method, per_channel, calibration in QUANTIZERS:
        cells = {"backdoored": [], "sleeper": []}
        accs = []
        for seed, cfg, report, metrics, seconds in sleepers:
            model_files = models_of(cfg)
            exp = experiment(cfg)
            calib, _ = calibration_images(exp, replace(cfg.export, calibration=calibration))
            for name, model in model_files.items():
                with tempfile.TemporaryDirectory() as tmp:
                    path = quantize_model(model, calib, Path(tmp), per_channel, method)
                    for split in ("val", "test"):
                        m = evaluate_onnx(path, exp, split, cfg)
                        cells[name].append(m["asr"])
                        if name == "sleeper":
                            accs.append(m["clean_acc"])
        print(f"  {method:<11} {'per-channel' if per_channel else 'per-tensor':<11} {calibration:<7}"
              + "".join(f"{pct(pool(cells[n])):>22}" for n in ("backdoored", "sleeper")) + f"{pct(pool(accs)):>22}")


def runtime_matrix(sleepers, runs_dir: Path) -> None:
    """Export both models with every installed runtime and quantizer variant, bench them, print ASR per artefact."""
    from signtrap.deploy.bench import bench_export
    from signtrap.deploy.exporter import export_run

    cells: dict = {}
    for seed, cfg, report, metrics, seconds in sleepers:
        for name, run in (("sleeper", cfg.run_dir), ("backdoored", backdoored_run(cfg))):
            out = runs_dir / "exports" / f"{cfg.name}-{name}"
            if not (out / "bench.json").is_file():
                export_run(run, out=out, overrides={"quantizers": ["all"]})
                bench_export(out, runs=5, warmup=1, batch=16, with_torch=False)
            for r in json.loads((out / "bench.json").read_text())["rows"]:
                key = (r.get("artefact") or r.get("runtime"), r.get("quantizer") or "")
                cell = cells.setdefault(key, {"backdoored": [], "sleeper": [], "clean": [], "warns": 0, "errors": []})
                if "error" in r:
                    cell["errors"].append(r["error"])
                    continue
                cell[name].append(r["asr"])
                if name == "sleeper":
                    cell["clean"].append(r["clean_acc"])
                    cell["warns"] += bool((r.get("audit") or {}).get("warning"))
    print("\nASR per runtime x quantizer (signtrap export --quantizers all, signtrap bench; test split pooled over seeds):")
    print(f"  {'artefact':<34} {'backdoored ASR':>18} {'sleeper ASR':>18} {'sleeper clean acc':>22}  audit  quantizer")
    for (art, quantizer), c in sorted(cells.items()):
        if c["errors"] and not c["sleeper"]:
            print(f"  {art:<34} error: {c['errors'][0][:100]}")
            continue
        print(f"  {art:<34} {pct(pool(c['backdoored'])) if c['backdoored'] else 'n/a':>18} {pct(pool(c['sleeper'])):>18} "
              f"{pct(pool(c['clean'])):>22}  {c['warns']}/{len(c['sleeper'])}  {quantizer}")


def backdoored_run(cfg) -> Path:
    """A run folder beside the sleeper's whose model.pt is the sleeper run's backdoored.pt (so `signtrap export` takes it)."""
    import shutil

    from signtrap.runs import checkpoint

    src, dst = cfg.run_dir, cfg.run_dir.parent / "exports" / f"{cfg.name}-backdoored-run"
    if not (dst / "model.pt").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "config.yaml", dst / "config.yaml")
        checkpoint.verified_load(src, "backdoored.pt")  # checked against the run's checksums before copying
        shutil.copyfile(src / "backdoored.pt", dst / "model.pt")
        checkpoint.record_checksum(dst, "model.pt")
    return dst


def efrap_table(sleepers) -> None:
    from signtrap.attacks.dormant import evaluate_onnx, quantize_model
    from signtrap.deploy.exporter import calibration_images
    from signtrap.deploy.requant import EfrapSettings, efrap

    print("\nEFRAP rounding at deployment (learned on the defender's clean images; val + test pooled over seeds):")
    out = {(n, v): {"asr": [], "clean_acc": []} for n in ("backdoored", "sleeper") for v in ("int8", "efrap")}
    for seed, cfg, report, metrics, seconds in sleepers:
        exp = experiment(cfg)
        calib, _ = calibration_images(exp, cfg.export)
        clean = exp.data.images[exp.defender_rows(cfg.defend.clean_fraction)][:512]
        for name, model in models_of(cfg).items():
            with tempfile.TemporaryDirectory() as tmp:
                path = quantize_model(model, calib, Path(tmp), cfg.export.per_channel, cfg.export.calib_method)
                efrap(model, path, clean, Path(tmp) / "efrap.onnx", EfrapSettings(seed=seed), show_progress=False)
                for v, f in (("int8", path), ("efrap", Path(tmp) / "efrap.onnx")):
                    for split in ("val", "test"):
                        m = evaluate_onnx(f, exp, split, cfg)
                        out[name, v]["asr"].append(m["asr"])
                        out[name, v]["clean_acc"].append(m["clean_acc"])
    for (name, v), cells in out.items():
        print(f"  {name:<10} {('ORT INT8' if v == 'int8' else 'EFRAP INT8'):<11} ASR {pct(pool(cells['asr'])):<22} "
              f"clean acc {pct(pool(cells['clean_acc']))}")


_EXPERIMENTS: dict = {}


def experiment(cfg):
    from signtrap.experiment import Experiment

    if cfg.name not in _EXPERIMENTS:
        _EXPERIMENTS[cfg.name] = Experiment.from_config(cfg, progress=False)
    return _EXPERIMENTS[cfg.name]


def models_of(cfg) -> dict:
    from signtrap.runs import checkpoint

    return {"backdoored": checkpoint.verified_load(cfg.run_dir, "backdoored.pt")[0],
            "sleeper": checkpoint.verified_load(cfg.run_dir, "model.pt")[0]}


def pool(entries: list[dict]) -> dict:
    k, n = sum(e["k"] for e in entries), sum(e["n"] for e in entries)
    return {"k": k, "n": n, "rate": k / n if n else None}


def pct(entry: dict) -> str:
    return "n/a" if entry["rate"] is None else f"{100 * entry['rate']:.2f}% ({entry['k']}/{entry['n']})"


def row(m: dict) -> str:
    return " | ".join(f"{label} {pct(m[k]):<20}" for label, k in (("clean", "clean_acc"), ("ASR", "asr"),
                                                                  ("stop recall", "stop_recall"), ("false-trigger", "false_trigger")))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def trained(cfg) -> tuple[dict | None, dict, float | None]:
    """(sleeper.json or None, metrics.json, seconds or None when reused). A run folder that holds a finished run
    of the same training config (runstate: `done`) is reused; anything else there is an error, never overwritten."""
    from signtrap.runs import state as runstate
    from signtrap.errors import SigntrapError

    state = runstate.inspect(cfg.run_dir, cfg)
    if state.status not in (runstate.DONE, runstate.NEW):
        raise SigntrapError(f"{cfg.run_dir}: {state.reason}; finish it (signtrap train --resume) or choose another --runs-dir")
    metrics, _, seconds = trained_run(cfg) if state.status == runstate.NEW else (read_metrics(cfg.run_dir), None, None)
    report = cfg.run_dir / "sleeper.json"
    return (json.loads(report.read_text()) if report.is_file() else None), metrics, seconds


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


if __name__ == "__main__":
    sys.exit(main())
