"""`signtrap bench EXPORT_DIR`: the persistence matrix (runtime x precision / quantizer variant) of an export.

Every artefact row comes from the same code as the edge script written into the export
(signtrap.deploy.edge_bench plus each runtime plugin's edge section), so `signtrap bench` and
`python edge_bench.py` report identical accuracy and ASR. A PyTorch eager row on the source checkpoint is the
reference. Writes bench.json, bench.md and bench.png (the matrix as a chart).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from signtrap.runs import checkpoint
from signtrap.deploy import edge_bench as eb
from signtrap.deploy import runtimes as registry
from signtrap.errors import IntegrityError, SigntrapError
from signtrap.fileio import atomic_path, record_written, refuse_foreign, verify_sha256
from signtrap.machine.progress import say
from signtrap.machine import cores
from signtrap.machine.environment import cpu_threads, package_versions

# the old `--providers` names of ONNX Runtime's execution providers, mapped to runtime names
PROVIDER_RUNTIMES = {"cpu": "onnxruntime", "cuda": "onnxruntime-cuda", "tensorrt": "onnxruntime-tensorrt"}


def _signtrap_error(exc: eb.BenchError) -> SigntrapError:
    """The edge module's one-line errors become the CLI's (exit status 2)."""
    text = str(exc)
    return IntegrityError(text) if "SHA-256" in text else SigntrapError(text)


def torch_row(manifest: dict, bundle: dict, settings: dict) -> dict:
    """PyTorch eager on the source checkpoint (verified against the hash recorded at export)."""
    src = manifest.get("source", {})
    path = Path(src.get("checkpoint", ""))
    row = {"runtime": "pytorch", "runtime_version": torch.__version__, "artefact": "pytorch:fp32", "variant": "fp32",
           "precision": "fp32", "quantizer": None, "provider": "eager-cpu", "files": [str(path)], "threads": settings["threads"]}
    if not path.is_file():
        row["error"] = f"source checkpoint {path} not found on this machine"
        return row
    try:
        verify_sha256(path, src["checkpoint_sha256"])
    except IntegrityError:
        row["error"] = f"source checkpoint {path} changed since the export (SHA-256 mismatch); no PyTorch reference"
        return row
    row["file_bytes"] = path.stat().st_size
    try:
        model = checkpoint.build_model(checkpoint.load(path), "cpu")
    except SigntrapError as exc:  # e.g. the model code changed since the export: the artefact rows still stand
        row["error"] = f"source checkpoint {path} does not load with this signtrap ({str(exc)[:160]})"
        return row
    before = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        with torch.inference_mode():
            def run(x):
                return model(torch.from_numpy(x)).numpy()

            row.update(eb.measure(run, bundle, manifest["attack"], settings))
    finally:
        torch.set_num_threads(before)
    return row


def bench_export(export_dir: Path, threads: int = 0, runtimes: list[str] | None = None, runs: int = 200,
                 warmup: int = 20, batch: int = 64, variants: list[str] | None = None, with_torch: bool = True,
                 providers: list[str] | None = None) -> dict:
    """Benchmark every artefact of an export whose runtime can run here (or the named `runtimes`).

    `providers` is the old spelling (cpu, cuda, tensorrt) of ONNX Runtime's runtimes. Raises SigntrapError
    after writing the outputs when no artefact row could be measured.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise SigntrapError(f"{export_dir}: not an export folder (run `signtrap export RUN` first)")
    for name in ("bench.json", "bench.md", "bench.png"):  # the write rule, checked before the benchmark
        refuse_foreign(export_dir / name)
    registry.discover()  # fills edge_bench.EDGE_RUNTIMES with every plugin's device side
    requested = list(runtimes or []) + [_provider_runtime(p) for p in providers or ()]
    cores.check_threads(threads, "--threads")  # above the cores this process may use, or negative: one line
    # every runtime's threads (ONNX Runtime intra-op, OpenVINO streams, ncnn, XNNPACK, torch) are the cores claimed
    with cpu_threads(threads, key="--threads") as claimed:
        try:
            manifest = eb.verify_export(str(export_dir))  # before loading anything
            eb.check_variants(manifest, variants)
            settings = eb.settings_from(claimed, runs, warmup, batch)
            chosen = eb.select_runtimes(requested)
            bundle = eb.load_bundle(str(export_dir), manifest)
            rows, skipped = eb.bench_artefacts(str(export_dir), manifest, bundle, settings, chosen, variants, say, bool(requested))
        except eb.BenchError as exc:
            raise _signtrap_error(exc) from None
        artefact_rows = list(rows)
        if with_torch:
            say("benchmarking PyTorch eager (reference)")
            rows.insert(0, torch_row(manifest, bundle, settings))
    result = eb.report(str(export_dir), manifest, settings, rows, skipped, "signtrap bench", chosen)
    result["environment"]["versions"].update(package_versions())
    eb.write_outputs(result, str(export_dir / "bench.json"), str(export_dir / "bench.md"))
    record_written(export_dir, "bench.json", "bench.md")
    plot(result, export_dir / "bench.png")
    for warning in result["audit_warnings"]:
        say(f"WARNING {warning}")
    if eb.failed_everything(artefact_rows):
        reasons = [f"{r['artefact']}: {r['error']}" for r in artefact_rows] + [f"{s['runtime']}: {s['reason']}" for s in skipped]
        raise SigntrapError(f"{export_dir}: no artefact could be benchmarked ({'; '.join(reasons)[:600]}); "
                            f"see {export_dir / 'bench.json'}")
    return result


def _provider_runtime(name: str) -> str:
    key = name.strip().lower().replace("executionprovider", "")
    if key not in PROVIDER_RUNTIMES:
        raise SigntrapError(f"unknown execution provider '{name}'; choose from: {', '.join(PROVIDER_RUNTIMES)}")
    return PROVIDER_RUNTIMES[key]


def plot(result: dict, path: Path) -> None:
    """The persistence matrix: runtime (rows; optional quantizer variants get a row of their own) x precision,
    coloured by ASR, each cell with ASR, clean accuracy and batch-1 p50 latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    columns = [p for p in ("fp32", "fp16", "int8") if any(r["precision"] == p for r in rows)]
    labels = []
    for r in sorted(rows, key=lambda r: (r["runtime"] != "pytorch", r["runtime"], r["variant"] != r["precision"], r["variant"])):
        label = r["runtime"] if r["variant"] == r["precision"] else f"{r['runtime']} {r['variant']}"
        if label not in labels:
            labels.append(label)
    grid = np.full((max(1, len(labels)), max(1, len(columns))), np.nan)
    fig, ax = plt.subplots(figsize=(3.2 + 1.6 * len(columns), 1.3 + 0.5 * len(labels)), dpi=120)
    for r in rows:
        label = r["runtime"] if r["variant"] == r["precision"] else f"{r['runtime']} {r['variant']}"
        i, j = labels.index(label), columns.index(r["precision"])
        asr = r["asr"]["rate"]
        grid[i, j] = np.nan if asr is None else 100 * asr
        text = (f"ASR {eb._pct(r['asr'])}  acc {eb._pct(r['clean_acc'])}\n{r['latency_ms']['p50']:.2f} ms"
                + ("  AUDIT!" if (r.get("audit") or {}).get("warning") else ""))
        ax.text(j, i, text, ha="center", va="center", fontsize=6.5)
    image = ax.imshow(grid, cmap="Reds", vmin=0, vmax=160, aspect="auto")  # 100% stays light enough to read
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, ticks=[0, 25, 50, 75, 100])
    bar.ax.set_ylim(0, 100)
    bar.set_label("ASR %", fontsize=7)
    defence = result["export"].get("defence")
    ax.set_title(f"{result['export'].get('name')}{f' (defence {defence})' if defence else ''}: does the backdoor "
                 "survive deployment?\nASR %, clean accuracy %, batch-1 p50 latency", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
