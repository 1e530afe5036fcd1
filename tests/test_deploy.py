"""signtrap export / signtrap bench / the edge script, on the tiny backdoored run."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from signtrap.cli import main
from signtrap.deploy import edge_bench
from signtrap.errors import ConfigError, SigntrapError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--runs", "5", "--warmup", "1", "--batch", "8", "--threads", "1"]
METRIC_KEYS = ("clean_acc", "asr", "false_trigger", "stop_recall", "target_recall", "flip_vs_fp32")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["--quiet", "export", str(tiny_run), "--out", str(out), "--threads", "1"]) == 0
    return out


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(exported, dst, ignore=shutil.ignore_patterns("bench.*"))
    return dst


def no_torch_env(tmp_path: Path) -> dict:
    """An environment where `import torch` (and `import signtrap`) raise ImportError."""
    blocker = tmp_path / "blocker"
    for name in ("torch", "signtrap"):
        (blocker / name).mkdir(parents=True, exist_ok=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(blocker)
    return env


def run_edge(folder: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(folder / "edge_bench.py"), *args], env=env, cwd=folder.parent,
                          capture_output=True, text=True, timeout=120)


def test_export_writes_valid_self_contained_folder(exported):
    import onnx
    import onnxruntime as ort

    names = {p.name for p in exported.iterdir()}
    assert {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx", "eval.npz", "model.json", "edge_bench.py"} <= names
    for variant in ("fp32", "fp16", "int8"):
        onnx.checker.check_model(str(exported / f"model.{variant}.onnx"), full_check=True)
    manifest = json.loads((exported / "model.json").read_text())
    for name, entry in manifest["files"].items():
        assert edge_bench.sha256_file(exported / name) == entry["sha256"]
    assert manifest["export"]["exporter"] in ("dynamo", "torchscript")
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_logit_diff"] <= manifest["parity"]["atol"]
    assert set(manifest["agreement_vs_fp32"]) == {"fp16", "int8"}
    assert manifest["input_size"] == 32 and manifest["attack"]["source"] == 14 and manifest["attack"]["target"] == 7
    assert len(manifest["source"]["checkpoint_sha256"]) == 64 and manifest["trigger"]
    with np.load(exported / "eval.npz", allow_pickle=False) as npz:
        assert npz["images"].dtype == np.uint8 and npz["triggered"].shape == npz["images"].shape
        assert npz["images"].shape[1:] == (32, 32, 3) and len(npz["labels"]) == len(npz["images"])
        images = npz["images"][:3]
    # dynamic batch, FP32 inputs and outputs for every variant
    for variant in ("fp32", "fp16", "int8"):
        sess = ort.InferenceSession(str(exported / f"model.{variant}.onnx"), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
        for n in (1, 3):
            assert sess.run(None, {"images": edge_bench.to_input(images[:n])})[0].shape == (n, 43)
    assert (exported / "edge_bench.py").read_bytes() == Path(edge_bench.__file__).read_bytes()


def test_parity_gate_passes_and_fails_on_altered_graph(exported, tiny_run, tmp_path):
    import onnx
    from onnx import numpy_helper

    from signtrap.checkpoint import verified_load
    from signtrap.deploy.exporter import parity_gate

    model, _ = verified_load(tiny_run)
    with np.load(exported / "eval.npz", allow_pickle=False) as npz:
        images = np.concatenate([npz["images"][:64], npz["triggered"][:64]])
    ok = parity_gate(exported / "model.fp32.onnx", model, images, threads=1)
    assert ok["passed"] and ok["top1_agreement"] == 1.0

    graph = onnx.load(str(exported / "model.fp32.onnx"))
    init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight tensor
    w = numpy_helper.to_array(init).copy()
    w.flat[: w.size // 10] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(graph, str(tmp_path / "altered.onnx"))
    with pytest.raises(SigntrapError, match="parity gate failed"):
        parity_gate(tmp_path / "altered.onnx", model, images, threads=1)


def test_failed_parity_writes_nothing_for_a_defence_export(tiny_run, tmp_path, monkeypatch):
    """A defence's checkpoint exports through runs/NAME/defence-METHOD; a failed gate leaves no folder."""
    from signtrap.deploy.exporter import export_run

    run = tmp_path / "runs" / tiny_run.name
    (run / "defence-finetune").mkdir(parents=True)
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    for name in ("model.pt", "checksums.json"):
        shutil.copy(tiny_run / name, run / "defence-finetune" / name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SigntrapError, match="parity gate failed"):
        export_run(run, defence="finetune", overrides={"parity_atol": 1e-12}, threads=1)
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").iterdir())


def test_exporter_falls_back_to_torchscript(tiny_run, tmp_path, monkeypatch):
    import onnxruntime as ort
    import torch

    from signtrap.checkpoint import verified_load
    from signtrap.deploy.exporter import export_fp32

    real = torch.onnx.export

    def no_dynamo(*args, **kwargs):
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated torch.export failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    model, _ = verified_load(tiny_run)
    info = export_fp32(model, tmp_path / "m.onnx", 32)
    assert info["exporter"] == "torchscript" and "simulated" in info["fallback_reason"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"images": np.zeros((5, 3, 32, 32), np.float32)})[0].shape == (5, 43)


def test_bench_cli_and_edge_script_without_torch_agree(export_copy, tmp_path, capsys):
    assert main(["--quiet", "bench", str(export_copy), *FAST]) == 0
    bench = json.loads((export_copy / "bench.json").read_text())
    assert (export_copy / "bench.md").read_text().startswith("# Benchmark") and (export_copy / "bench.png").stat().st_size > 1000
    assert bench["schema"] == edge_bench.SCHEMA and bench["settings"]["threads"] == 1
    assert bench["environment"]["onnxruntime"] and bench["environment"]["cpu"]
    rows = {(r["runtime"], r["variant"]): r for r in bench["rows"]}
    assert set(rows) == {("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8")}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["latency_ms"]["p50"] > 0 and r["throughput"]["batch"] == 8 and r["file_bytes"] > 0
    # PyTorch and ONNX Runtime FP32 agree (the parity gate's promise), flips reported for the others
    assert rows[("pytorch", "fp32")]["flip_vs_fp32"]["all"] == 0.0
    assert rows[("onnxruntime", "fp32")]["asr"] == rows[("pytorch", "fp32")]["asr"]
    assert rows[("onnxruntime", "int8")]["flip_vs_fp32"]["all"] is not None

    env = no_torch_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    out = tmp_path / "edge.json"
    proc = run_edge(export_copy, env, "--out", str(out), "--quiet", *FAST)
    assert proc.returncode == 0, proc.stderr
    edge = json.loads(out.read_text())
    assert edge["schema"] == bench["schema"] and set(edge) == set(bench)
    assert set(edge["environment"]) == set(bench["environment"]) and set(edge["settings"]) == set(bench["settings"])
    assert set(edge["rows"][0]) == set(rows[("onnxruntime", "fp32")])
    for r in edge["rows"]:
        twin = rows[("onnxruntime", r["variant"])]
        assert {k: r[k] for k in METRIC_KEYS} == {k: twin[k] for k in METRIC_KEYS}
    assert (tmp_path / "edge.md").is_file()


def test_tampered_or_missing_file_refused_by_bench_and_edge(export_copy, tmp_path, capsys):
    target = export_copy / "model.int8.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert main(["bench", str(export_copy), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SHA-256 mismatch" in err and "model.int8.onnx" in err
    assert not (export_copy / "bench.json").exists()
    proc = run_edge(export_copy, no_torch_env(tmp_path), *FAST)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "SHA-256 mismatch" in proc.stderr

    (export_copy / "eval.npz").unlink()
    assert main(["bench", str(export_copy), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.npz: missing" in err


def test_bundle_size_mismatch_refused(export_copy, tmp_path, capsys):
    with np.load(export_copy / "eval.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["images"] = np.ascontiguousarray(arrays["images"][:, :16, :16])
    arrays["triggered"] = np.ascontiguousarray(arrays["triggered"][:, :16, :16])
    np.savez_compressed(export_copy / "eval.npz", **arrays)
    manifest = json.loads((export_copy / "model.json").read_text())
    manifest["files"]["eval.npz"]["sha256"] = edge_bench.sha256_file(export_copy / "eval.npz")  # hashes pass
    (export_copy / "model.json").write_text(json.dumps(manifest))
    assert main(["bench", str(export_copy), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16x16 but the model takes 32x32" in err
    proc = run_edge(export_copy, no_torch_env(tmp_path), *FAST)
    assert proc.returncode == 2 and "16x16 but the model takes 32x32" in proc.stderr


def test_unknown_or_unavailable_provider_refused(exported, tmp_path, capsys):
    import onnxruntime as ort

    missing = next(s for s, full in edge_bench.PROVIDERS if full not in ort.get_available_providers())
    assert main(["bench", str(exported), "--providers", f"cpu,{missing}", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not available here" in err
    assert main(["bench", str(exported), "--providers", "gpu-please", *FAST]) == 2
    assert "unknown execution provider 'gpu-please'" in capsys.readouterr().err
    proc = run_edge(exported, no_torch_env(tmp_path), "--providers", missing, *FAST)
    assert proc.returncode == 2 and "is not available here" in proc.stderr


def test_defence_export_naming_and_missing_defence(tiny_run, capsys):
    from signtrap.config import load_config
    from signtrap.deploy.exporter import default_out

    cfg = load_config(None, ["name=gt1"])
    assert default_out(cfg, None) == Path("export/gt1")
    assert default_out(cfg, "fine-prune") == Path("export/gt1-defence-fine-prune")
    assert main(["export", str(tiny_run), "--defence", "no-such-method"]) == 2
    assert "no such defence output" in capsys.readouterr().err


def test_not_an_export_folder(tmp_path, capsys):
    assert main(["bench", str(tmp_path), *FAST]) == 2
    assert "model.json: not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2


def test_edge_metrics_match_signtrap_metrics():
    from signtrap.metrics import backdoor_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 43, 500)
    labels[:40] = 14
    clean, trig = rng.integers(0, 43, 500), np.where(rng.random(500) < 0.5, 7, rng.integers(0, 43, 500))
    for all_to_one in (False, True):
        ours = edge_bench.backdoor_metrics(labels, clean, trig, 14, 7, all_to_one)
        ref = backdoor_metrics(labels, clean, trig, 14, 7, all_to_one, details=False)
        assert set(ours) == set(ref)
        for key in ref:
            ci = ref[key]["ci95"]
            assert ours[key] == {**ref[key], "ci95": list(ci) if ci else None}


def test_edge_script_is_python38_numpy_onnxruntime_only():
    source = Path(edge_bench.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        assert not isinstance(node, (ast.Match, ast.NamedExpr)), "keep the edge script plain Python 3.8"
    assert imported - set(sys.stdlib_module_names) - {"__future__"} == {"numpy", "onnxruntime"}
    repo_copy = REPO / "export" / "edge_bench.py"
    assert repo_copy.read_bytes() == source.encode(), "export/edge_bench.py must be the package's edge_bench module"


def test_export_config_checks():
    from signtrap.config import load_config

    cfg = load_config(None, ["export.calib_method=entropy", "export.per_channel=true", "export.calibration=mixed"])
    assert cfg.export.calib_method == "entropy" and cfg.export.per_channel
    for bad in ("export.calib_method=kl", "export.calibration=dirty", "export.opset=9", "export.parity_atol=0",
                "export.exporter=tflite", "export.calib_trigger_fraction=1.5"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])
