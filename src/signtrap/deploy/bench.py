"""`signtrap bench EXPORT_DIR`: the edge script's measurements plus a PyTorch eager reference row, a table and a plot.

All ONNX Runtime figures come from `signtrap.deploy.edge_bench` (the file copied into every export as
edge_bench.py), so `signtrap bench` and the edge script report identical accuracy and ASR for a variant.
"""
from __future__ import annotations

from pathlib import Path

import torch

from signtrap.deploy import edge_bench as eb
from signtrap.errors import IntegrityError, SigntrapError
from signtrap.progress import say


def _signtrap_error(exc: eb.BenchError) -> SigntrapError:
    """The edge module's one-line errors become the CLI's (exit status 2)."""
    text = str(exc)
    return IntegrityError(text) if "SHA-256" in text else SigntrapError(text)


def torch_row(manifest: dict, bundle: dict, settings: dict, reference) -> dict:
    """PyTorch eager on the source checkpoint (verified against the hash recorded at export)."""
    from signtrap import checkpoint
    from signtrap.fileio import verify_sha256

    src = manifest.get("source", {})
    path = Path(src.get("checkpoint", ""))
    row = {"runtime": "pytorch", "runtime_version": torch.__version__, "variant": "fp32", "provider": "eager-cpu",
           "file": str(path), "threads": settings["threads"]}
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
    except SigntrapError as exc:  # e.g. the model code changed since the export: the ONNX rows still stand
        row["error"] = f"source checkpoint {path} does not load with this signtrap ({str(exc)[:160]})"
        return row
    before = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        with torch.inference_mode():
            def run(x):
                return model(torch.from_numpy(x)).numpy()

            measured, _ = eb.measure(run, bundle, manifest["attack"], settings, reference)
    finally:
        torch.set_num_threads(before)
    row.update(measured)
    return row


def bench_export(export_dir: Path, threads: int = 0, providers: list[str] | None = None, runs: int = 200,
                 warmup: int = 20, batch: int = 64, variants: list[str] | None = None, with_torch: bool = True) -> dict:
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise SigntrapError(f"{export_dir}: not an export folder (run `signtrap export RUN` first)")
    try:
        manifest = eb.verify_export(str(export_dir))  # before loading anything
        for v in variants or ():
            if v not in eb.VARIANTS:
                raise eb.BenchError(f"unknown variant '{v}'; choose from: {', '.join(eb.VARIANTS)}")
        settings = eb.settings_from(threads, runs, warmup, batch)
        chosen = eb.resolve_providers(providers)
        bundle = eb.load_bundle(str(export_dir), manifest)
        rows, references = eb.bench_onnx(str(export_dir), manifest, bundle, settings, chosen, variants, say)
    except eb.BenchError as exc:
        raise _signtrap_error(exc) from None
    if with_torch:
        say("benchmarking PyTorch eager (reference)")
        rows.insert(0, torch_row(manifest, bundle, settings, references.get("CPUExecutionProvider")))
    result = eb.report(str(export_dir), manifest, settings, rows, "signtrap bench")
    from signtrap.provenance import package_versions

    result["environment"]["versions"].update(package_versions())
    eb.write_outputs(result, str(export_dir / "bench.json"), str(export_dir / "bench.md"))
    plot(result, export_dir / "bench.png")
    return result


def plot(result: dict, path: Path) -> None:
    """Batch-1 p50 latency against ASR, one point per runtime/variant/provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from signtrap.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    markers = {"fp32": "o", "fp16": "s", "int8": "^"}
    for r in result["rows"]:
        if "error" in r or r["asr"]["rate"] is None:
            continue
        label = f"{r['runtime']} {r['variant']} {r['provider'].replace('ExecutionProvider', '')}"
        ax.scatter(r["latency_ms"]["p50"], 100 * r["asr"]["rate"], marker=markers.get(r["variant"], "o"), s=60, label=label)
        lo, hi = r["latency_ms"]["p50"], r["latency_ms"]["p90"]
        ax.plot([lo, hi], [100 * r["asr"]["rate"]] * 2, lw=1, alpha=0.5, color="grey")
    ax.set_xlabel("batch-1 latency, ms (p50; line to p90)")
    ax.set_ylabel("attack success rate, %")
    ax.set_ylim(-5, 105)
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"{result['export'].get('name')}: does the backdoor survive deployment?", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
