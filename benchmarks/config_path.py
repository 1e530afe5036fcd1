"""Follow the pipeline's config through the code: which modules receive it, in call order, and how often the path
climbs back up to a higher module (a module stands above those it imports, directly or not; lazy imports count).

    .venv/bin/python benchmarks/config_path.py [--list]

Runs `signtrap run` on a tiny SynthSigns config (train, the zero-poison reference, finetune and its probe, strip,
an ONNX Runtime export, bench, report) under a profiler hook that records every Python call that is handed the run's
config or one of its sections (any object of a class defined in `signtrap.config`, or a defence's settings) as an
argument (a config's own methods, where it is `self`, are the config answering a question, not travelling). The
path is the sequence of the modules of those calls with repeats merged; a *climb* is a step from module A to a
module B that imports A (B is above A); the distinct climbs are the module pairs, however often each is taken. The import graph is tests/test_structure.py's. A measurement of this
repository's own, not the issue filer's structure tool: its figures are comparable with each other, not with theirs.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def structure():
    spec = importlib.util.spec_from_file_location("test_structure", ROOT / "tests" / "test_structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def above(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """module -> every module that imports it, directly or through others."""
    importers: dict[str, set[str]] = {m: set() for m in graph}
    for m, deps in graph.items():
        for d in deps:
            importers.setdefault(d, set()).add(m)
    out = {}
    for m in graph:
        seen, todo = set(), [m]
        while todo:
            for up in importers.get(todo.pop(), ()):
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        out[m] = seen
    return out


def is_setting(value) -> bool:
    cls = type(value)
    return dataclasses.is_dataclass(value) and not isinstance(value, type) and cls.__module__.startswith("signtrap") and (
        cls.__module__ == "signtrap.config" or cls.__name__.endswith(("Config", "Settings")))


def trace(overrides: list[str], whole: bool = False) -> list[tuple[str, str]]:
    """(module, function) of every call handed a config object (`whole`: the whole RunConfig only), in call order."""
    import signtrap
    from signtrap.config import RunConfig

    calls: list[tuple[str, str]] = []
    wanted = (lambda v: isinstance(v, RunConfig)) if whole else is_setting

    def hook(frame, event, arg):
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("signtrap"):
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        local = frame.f_locals
        if any(wanted(local.get(n)) for n in names if n != "self"):  # a config's own methods: it answers, it does not travel
            calls.append((module, code.co_name))

    cfg = signtrap.load_config(None, overrides)
    sys.setprofile(hook)
    try:
        summary = signtrap.run(cfg)
    finally:
        sys.setprofile(None)
    if not summary["ok"]:
        raise SystemExit("config_path: the traced pipeline did not finish: " + "; ".join(
            f"{s['name']}: {s['reason']}" for s in summary["stages"] if s["status"] in ("failed", "blocked")))
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the whole path, one module per line")
    parser.add_argument("--whole", action="store_true",
                        help="follow only the whole config (RunConfig), not its sections or a plugin's settings")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="signtrap-config-path-"))
    overrides = [f"runs_dir={base / 'runs'}", f"data.cache_dir={base / 'cache'}", "name=path", "device=cpu", "data.source=synth",
                 "data.synth_per_class=30", "data.synth_test_per_class=6", "aug.enabled=false", "model.name=signnet_small",
                 "train.epochs=1", "attack.poison_count=20", "train.threads=1", "defend.methods=[finetune,strip]",
                 "defend.finetune.epochs=1", "defend.finetune.grid=[1e-3]", "defend.strip.overlays=4", "defend.strip.eval_samples=64",
                 "defend.probe.k=2", "defend.probe.steps=5", "defend.clean_fraction=0.3", "export.runtimes=[onnxruntime]",
                 "export.calib_images=16", "export.bench_runs=2", "export.bench_warmup=1", "export.bench_batch=4"]
    import signtrap.machine.progress as progress

    progress.QUIET = True
    try:
        calls = trace(overrides, args.whole)
    finally:
        shutil.rmtree(base, ignore_errors=True)  # the traced run's folder: this script's own
    graph = structure().import_graph()
    higher = above(graph)
    path = [m for i, (m, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != m]
    climbs = [(a, b) for a, b in zip(path, path[1:]) if b in higher.get(a, set())]
    if args.list:
        for a, b in zip(path, path[1:] + [""]):
            print(f"{a}{'   <- climbs to ' + b if (a, b) in climbs else ''}")
    print(f"{len(calls)} calls handed the config, in {len(set(m for m, _ in calls))} modules; the path has {len(path)} "
          f"module steps and climbs back up {len(climbs)} times")
    distinct = sorted(set(climbs))
    print(f"{len(distinct)} distinct climbs: " + "; ".join(f"{a} -> {b}" for a, b in distinct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
