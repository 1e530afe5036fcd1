"""The runtime zoo on the tiny backdoored run: every registered runtime converts once (module-scoped export),
passes its gate, refuses tampered files, and its edge-script rows reproduce `signtrap bench` exactly.

A runtime whose package is missing is skipped here with the command to install it, except under CI
(`CI` set), where every CPU runtime must run: `make test` installs them all (`.[dev,runtimes]`).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from signtrap.deploy import edge_bench, exporter, runtimes
from signtrap.deploy.bench import bench_export
from signtrap.deploy.exporter import export_run
from signtrap.errors import SigntrapError
from test_deploy import METRIC_KEYS, no_torch_env, run_edge

FAST = dict(threads=1, runs=5, warmup=1, batch=8)
EDGE_FAST = ["--runs", "5", "--warmup", "1", "--batch", "8", "--threads", "1"]
EXPORTING = sorted(name for name, rt in runtimes.discover().items() if rt.exports)
CALIB = 128
# optional quantizer variants exported by the module's zoo too (cheap ones; the rest are exercised by benchmarks/)
OPTIONAL = [q for q in ("ncnn:int8-winograd", "ncnn:int8-aciq", "openvino:int8-accurate") if q.split(":")[0] in EXPORTING]


def require(name: str) -> None:
    reason = runtimes.get(name).missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"runtime {name} must run in CI: {reason}")
        pytest.skip(f"runtime {name}: {reason}")


def torch_free(name: str) -> bool:
    """ExecuTorch's Python runtime links libtorch, so its edge rows need torch on the device."""
    return name != "executorch"


@pytest.fixture(scope="module")
def signnet_run(tmp_path_factory) -> Path:
    """The tiny run's config on the full-width signnet: the runtimes' INT8 gates are a property of the default
    model (the quarter-width tiny model agrees with its LiteRT INT8 artefact on 72% of clean images, under the
    80% gate)."""
    from conftest import tiny_overrides
    from signtrap.config import load_config
    from signtrap.training.trainer import train

    return train(load_config(None, tiny_overrides(tmp_path_factory.mktemp("signnet"), "tiny", "model.name=signnet", "train.threads=1")))


@pytest.fixture(scope="module")
def zoo(signnet_run, tmp_path_factory) -> Path:
    """One export with every runtime installed here (each converts once for the whole module)."""
    out = tmp_path_factory.mktemp("zoo") / "tiny"
    export_run(signnet_run, out=out, overrides={"calib_images": CALIB, "quantizers": OPTIONAL}, threads=1)
    return out


@pytest.fixture(scope="module")
def zoo_bench(zoo, tmp_path_factory) -> dict:
    copy_dir = tmp_path_factory.mktemp("zoo-bench") / "tiny"
    shutil.copytree(zoo, copy_dir)
    return bench_export(copy_dir, **FAST)


@pytest.fixture(scope="module")
def zoo_edge(zoo, tmp_path_factory) -> dict:
    """The edge script's rows: torch and signtrap blocked; ExecuTorch with only signtrap blocked."""
    tmp = tmp_path_factory.mktemp("zoo-edge")
    rows = {}
    free = [n for n in EXPORTING if torch_free(n) and runtimes.get(n).missing() is None]
    runs = [(tmp / "no-torch", ("torch", "signtrap"), free),
            (tmp / "torch", ("signtrap",), [n for n in EXPORTING if not torch_free(n) and runtimes.get(n).missing() is None])]
    for folder, block, names in runs:
        if not names:
            continue
        out = folder / "edge.json"
        proc = run_edge(zoo, no_torch_env(folder, block), "--runtimes", ",".join(names), "--out", str(out), "--quiet", *EDGE_FAST)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(out.read_text())
        rows.update({r["artefact"]: r for r in result["rows"]})
    return rows


def artefacts(folder: Path, name: str) -> list[dict]:
    manifest = json.loads((folder / "model.json").read_text())
    return [a for a in manifest["artefacts"] if a["runtime"] == name]


def test_every_plugin_module_registers_and_has_one_edge_section():
    import pkgutil

    registry = runtimes.discover()
    package = {f"{runtimes.__name__}.{m.name}" for m in pkgutil.iter_modules(runtimes.__path__) if not m.name.startswith("_")}
    assert set(runtimes.edge_sections()) == {rt.module for rt in registry.values()} == package
    assert {"onnxruntime", "openvino", "onnxruntime-cuda", "onnxruntime-tensorrt"} <= set(registry)
    for name, rt in registry.items():
        assert rt.edge.name == name and edge_bench.EDGE_RUNTIMES[name].__class__ is rt.edge
        assert rt.extra and (rt.exports == (rt.edge.artefacts_of is None))
        if rt.exports:
            precisions = [v.precision for v in rt.variants(exporter.ExportConfig()) if v.default]
            assert precisions[0] == "fp32" and "int8" in precisions, name
            names = [v.name for v in rt.variants(exporter.ExportConfig())]
            assert len(names) == len(set(names)), name


@pytest.mark.parametrize("name", EXPORTING)
def test_export_passes_the_gate(zoo, name):
    require(name)
    arts = artefacts(zoo, name)
    rt = runtimes.get(name)
    expected = [v.name for v in rt.variants(exporter.ExportConfig()) if v.default or f"{name}:{v.name}" in OPTIONAL]
    assert [a["variant"] for a in arts] == expected
    manifest = json.loads((zoo / "model.json").read_text())
    for a in arts:
        assert a["id"] == f"{name}:{a['variant']}" and a["gate"]["passed"], a["id"]
        for f in a["files"]:
            assert manifest["files"][f]["sha256"] == edge_bench.sha256_file(zoo / f)
        if a["precision"] == "fp32":  # 100% top-1 agreement with PyTorch on clean and triggered images, modulo ties
            assert a["gate"]["kind"] == "parity" and a["gate"]["disagreements_beyond_ties"] == 0
            assert a["gate"]["disagreements"] <= 1 and a["agreement"]["flip_rate"] <= 1 / a["gate"]["images"]
        else:
            assert a["gate"]["kind"] == "agreement" and a["gate"]["top1_agreement_clean"] >= 0.8
    assert manifest["runtimes"][name]["artefacts"] == [a["id"] for a in arts]


@pytest.mark.parametrize("name", EXPORTING)
def test_altered_artefact_fails_the_gate_and_leaves_nothing(tiny_run, tmp_path, monkeypatch, name):
    """The converter gets a model with one weight tensor nudged; the gate compares with the real model."""
    require(name)
    rt = runtimes.get(name)
    real_context = exporter.ExportContext

    def altered(**kwargs):
        model = copy.deepcopy(kwargs["model"])
        with torch.no_grad():
            weight = max((p for p in model.parameters() if p.dim() > 1), key=lambda p: p.numel())
            weight.view(-1)[: weight.numel() // 10] += 0.05
        kwargs["model"] = model
        return real_context(**kwargs)

    monkeypatch.setattr(exporter, "ExportContext", altered)
    real_variants = type(rt).variants
    monkeypatch.setattr(type(rt), "variants", lambda self, ecfg: [v for v in real_variants(self, ecfg) if v.precision == "fp32"])
    out = tmp_path / "export" / "altered"
    with pytest.raises(SigntrapError, match=rf"{name}:fp32: parity gate failed.*nothing was written"):
        export_run(tiny_run, out=out, overrides={"runtimes": [name], "calib_images": 16}, threads=1)
    assert not out.exists() and not list((tmp_path / "export").iterdir())


@pytest.mark.parametrize("name", EXPORTING)
def test_tampered_file_refused_by_bench_and_edge(zoo, tmp_path, name):
    require(name)
    folder = tmp_path / "tampered"
    shutil.copytree(zoo, folder)
    art = artefacts(folder, name)[-1]
    target = folder / art["files"][-1]  # the weights, for runtimes with a graph file and a weights file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(SigntrapError, match=f"{target.name}: SHA-256 mismatch"):
        bench_export(folder, runtimes=[name], **FAST)
    assert not (folder / "bench.json").exists()
    proc = run_edge(folder, no_torch_env(tmp_path, ("torch", "signtrap") if torch_free(name) else ("signtrap",)),
                    "--runtimes", name, *EDGE_FAST)
    assert proc.returncode == 2 and f"{target.name}: SHA-256 mismatch" in proc.stderr


@pytest.mark.parametrize("name", EXPORTING)
def test_edge_script_reproduces_bench(zoo, zoo_bench, zoo_edge, name):
    require(name)
    bench_rows = {r["artefact"]: r for r in zoo_bench["rows"]}
    ids = [a["id"] for a in artefacts(zoo, name)]
    for art_id in ids:
        assert "error" not in bench_rows[art_id], bench_rows[art_id].get("error")
        assert {k: zoo_edge[art_id][k] for k in METRIC_KEYS} == {k: bench_rows[art_id][k] for k in METRIC_KEYS}, art_id
        assert zoo_edge[art_id]["runtime"] == name and zoo_edge[art_id]["file_bytes"] == bench_rows[art_id]["file_bytes"]
    fp32 = bench_rows[f"{name}:fp32"]
    torch_row = bench_rows["pytorch:fp32"]
    assert fp32["asr"] == torch_row["asr"] and fp32["clean_acc"]["k"] == torch_row["clean_acc"]["k"]


def test_executorch_edge_rows_need_torch(zoo, tmp_path):
    if "executorch" not in EXPORTING:
        pytest.skip("no executorch plugin")
    require("executorch")
    proc = run_edge(zoo, no_torch_env(tmp_path), "--runtimes", "executorch", *EDGE_FAST)
    assert proc.returncode == 2 and "executorch" in proc.stderr and "torch" in proc.stderr


@pytest.mark.parametrize("name", EXPORTING)
def test_missing_package_is_reported_with_its_extra(tiny_run, tmp_path, monkeypatch, name):
    rt = runtimes.get(name)
    absent = rt.packages[-1]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == absent else real_find_spec(mod, *a))
    expected = f"{absent} is not installed: pip install 'signtrap[{rt.extra}]'"
    with pytest.raises(SigntrapError, match=rf"runtime '{name}' cannot export here: {expected}".replace("[", r"\[")):
        export_run(tiny_run, out=tmp_path / "x", overrides={"runtimes": [name]})
    chosen, skipped = exporter.plan(exporter.ExportConfig())
    assert skipped[name] == expected and name not in [r.name for r, _ in chosen]
    # device side: the module cannot be imported -> skipped, with what to install on the device
    edge = edge_bench.EDGE_RUNTIMES[name]
    for module in edge.modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    reason = edge.missing()
    assert reason and edge.modules[0] in reason and edge.install in reason
    assert not (tmp_path / "x").exists()


def test_bench_lists_runtimes_missing_on_the_device(zoo, tmp_path, monkeypatch):
    name = next((n for n in EXPORTING if n != "onnxruntime" and runtimes.get(n).missing() is None), None)
    if name is None:
        pytest.skip("needs a second installed runtime")
    folder = tmp_path / "copy"
    shutil.copytree(zoo, folder)
    edge = edge_bench.EDGE_RUNTIMES[name]
    monkeypatch.setitem(sys.modules, edge.modules[0], None)
    result = bench_export(folder, variants=["fp32"], **FAST)
    skipped = {s["runtime"]: s for s in result["skipped"]}
    assert name in skipped and edge.install in skipped[name]["reason"] and skipped[name]["artefacts"] == [f"{name}:fp32"]
    assert f"Skipped {name}" in (folder / "bench.md").read_text()
    with pytest.raises(SigntrapError, match=f"runtime '{name}' cannot run here"):
        bench_export(folder, runtimes=[name], **FAST)


def test_persistence_matrix_covers_runtime_by_variant(zoo, zoo_bench):
    manifest = json.loads((zoo / "model.json").read_text())
    rows = {r["artefact"] for r in zoo_bench["rows"] if "error" not in r}
    assert {a["id"] for a in manifest["artefacts"]} | {"pytorch:fp32"} == rows
    for r in zoo_bench["rows"]:
        assert r["threads"] == 1 and r["latency_ms"]["runs"] == 5 and set(r["latency_ms"]) >= {"p50", "p90", "p99"}
        assert r["audit"]["triggered"]["images"] == r["audit"]["clean"]["images"] > 0
        assert r["flip_vs_fp32"]["reference"].startswith("PyTorch FP32")
    assert np.isfinite([r["throughput"]["images_per_s"] for r in zoo_bench["rows"]]).all()


def test_ncnn_quantizer_pieces(zoo, tmp_path):
    """The ncnn2table/ncnn2int8 scheme: the .param/.bin reader/writer round-trips, KL matches ncnn's loop, INT8 files."""
    require("ncnn")
    from signtrap.deploy.runtimes.ncnn_pnnx import NcnnNet, kl_threshold

    net = NcnnNet.read(zoo / "model.ncnn.fp32.param", zoo / "model.ncnn.fp32.bin")
    net.write(tmp_path / "m.param", tmp_path / "m.bin")
    assert (tmp_path / "m.bin").read_bytes() == (zoo / "model.ncnn.fp32.bin").read_bytes()
    tokens = [sorted(line.split()) for line in (zoo / "model.ncnn.fp32.param").read_text().splitlines()]
    assert [sorted(line.split()) for line in (tmp_path / "m.param").read_text().splitlines()] == tokens

    param = (zoo / "model.ncnn.int8.param").read_text()  # int8_scale_term, INT8 weights and the scale tables
    convs = [line for line in param.splitlines() if line.startswith(("Convolution", "InnerProduct"))]
    assert convs and all(" 8=2" in line or " 8=102" in line for line in convs), param
    assert (zoo / "model.ncnn.int8.bin").stat().st_size < 0.3 * (zoo / "model.ncnn.fp32.bin").stat().st_size

    rng = np.random.default_rng(0)
    for values in (np.abs(rng.normal(0, 1, 20_000)), np.abs(rng.standard_cauchy(20_000)), rng.uniform(0, 3, 20_000)):
        # ncnn uses 2048 bins -> 128 levels; the written-out loop is checked at 256 -> 24 (fractional bin edges)
        assert kl_threshold(values, 256, 24) == pytest.approx(reference_kl_threshold(values, 256, 24), rel=1e-9)
    heavy = np.abs(rng.standard_cauchy(50_000))
    assert kl_threshold(heavy) < 0.2 * heavy.max()  # outliers are clipped
    uniform = rng.uniform(0, 3, 50_000)
    assert kl_threshold(uniform) > 0.9 * uniform.max()


def reference_kl_threshold(abs_values: np.ndarray, bins: int = 2048, target: int = 128) -> float:
    """ncnn2table's KL loop written out bin by bin (float64), to check the vectorised one."""
    absmax = float(abs_values.max())
    hist = np.zeros(bins)
    for v in abs_values[abs_values != 0]:
        hist[min(int(v / absmax * bins), bins - 1)] += 1
    hist /= hist.sum()
    eps, best, best_t = 1e-4, np.inf, target
    for t in range(target, bins):
        clip = [eps + hist[j] for j in range(t)]
        clip[t - 1] += hist[t:].sum()
        npb = t / target
        quant = [0.0] * target
        for k in range(target):
            start, end = k * npb, (k + 1) * npb
            for j in range(int(np.floor(start)), min(int(np.ceil(end)), t)):
                quant[k] += max(0.0, min(end, j + 1) - max(start, j)) * hist[j]
            quant[k] /= npb
        expand = [eps] * t
        for k in range(target):
            start, end = k * npb, (k + 1) * npb
            for j in range(int(np.floor(start)), min(int(np.ceil(end)), t)):
                expand[j] += max(0.0, min(end, j + 1) - max(start, j)) * quant[k]
        kl = sum(p * np.log(p / q) for p, q in zip(clip, expand))
        if kl < best:
            best, best_t = kl, t
    return (best_t + 0.5) * absmax / bins
