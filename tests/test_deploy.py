"""signtrap export / signtrap bench / the edge script on the tiny backdoored run, with ONNX Runtime only
(every runtime of the zoo is exercised in test_runtimes.py)."""
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
from signtrap.deploy.exporter import export_run
from signtrap.errors import ConfigError, SigntrapError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--runs", "5", "--warmup", "1", "--batch", "8", "--threads", "1"]
METRIC_KEYS = ("clean_acc", "asr", "false_trigger", "stop_recall", "target_recall", "flip_vs_fp32", "audit")
ORT = {"runtimes": ["onnxruntime"], "calib_images": 128}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert export_run(tiny_run, out=out, overrides=ORT, threads=1) == out
    return out


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(exported, dst, ignore=shutil.ignore_patterns("bench.*"))
    return dst


def no_torch_env(tmp_path: Path, block: tuple[str, ...] = ("torch", "signtrap")) -> dict:
    """An environment where `import torch` (and `import signtrap`) raise ImportError."""
    blocker = tmp_path / "blocker"
    for name in block:
        (blocker / name).mkdir(parents=True, exist_ok=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(blocker)
    return env


def run_edge(folder: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(folder / "edge_bench.py"), *args], env=env, cwd=folder.parent,
                          capture_output=True, text=True, timeout=300)


def rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "model.json").read_text())
    change(manifest)
    (folder / "model.json").write_text(json.dumps(manifest))


def test_export_writes_valid_self_contained_folder(exported):
    import onnx
    import onnxruntime as ort

    from signtrap.deploy.runtimes import assemble_edge_script

    names = {p.name for p in exported.iterdir() if p.name != ".signtrap-written.json"}  # the write rule's record
    assert (exported / ".signtrap-written.json").is_file()
    assert names == {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx", "eval.npz", "model.json", "edge_bench.py"}
    for variant in ("fp32", "fp16", "int8"):
        onnx.checker.check_model(str(exported / f"model.{variant}.onnx"), full_check=True)
    manifest = json.loads((exported / "model.json").read_text())
    assert set(manifest["files"]) == names - {"model.json"}
    for name, entry in manifest["files"].items():
        assert edge_bench.sha256_file(exported / name) == entry["sha256"] and entry["bytes"] == (exported / name).stat().st_size
    assert [a["id"] for a in manifest["artefacts"]] == ["onnxruntime:fp32", "onnxruntime:fp16", "onnxruntime:int8"]
    fp32 = manifest["artefacts"][0]
    assert fp32["gate"]["passed"] and fp32["gate"]["kind"] == "parity" and fp32["gate"]["disagreements_beyond_ties"] == 0
    assert manifest["parity"] == fp32["gate"] and manifest["onnx"]["exporter"] in ("dynamo", "torchscript")
    assert manifest["calibration"]["images"] == 128 and manifest["calibration"]["triggered"] == 0
    assert set(manifest["agreement_vs_fp32"]) == {a["id"] for a in manifest["artefacts"]}
    assert manifest["input_size"] == 32 and manifest["attack"]["source"] == 14 and manifest["attack"]["target"] == 7
    assert len(manifest["source"]["checkpoint_sha256"]) == 64 and manifest["trigger"]
    with np.load(exported / "eval.npz", allow_pickle=False) as npz:
        assert npz["images"].dtype == np.uint8 and npz["triggered"].shape == npz["images"].shape
        assert npz["images"].shape[1:] == (32, 32, 3) and len(npz["labels"]) == len(npz["images"])
        assert len(npz["reference_clean"]) == len(npz["labels"]) == len(npz["reference_triggered"])
        images = npz["images"][:3]
    # dynamic batch, FP32 inputs and outputs for every variant
    for variant in ("fp32", "fp16", "int8"):
        sess = ort.InferenceSession(str(exported / f"model.{variant}.onnx"), providers=["CPUExecutionProvider"])
        assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
        for n in (1, 3):
            assert sess.run(None, {"images": edge_bench.to_input(images[:n])})[0].shape == (n, 43)
    assert (exported / "edge_bench.py").read_text() == assemble_edge_script()


def test_reference_predictions_are_pytorch_fp32(exported, tiny_run):
    from signtrap.runs.checkpoint import verified_load
    from signtrap.experiment import predict

    model, _ = verified_load(tiny_run)
    with np.load(exported / "eval.npz", allow_pickle=False) as npz:
        assert np.array_equal(predict(model, npz["images"]), npz["reference_clean"])
        assert np.array_equal(predict(model, npz["triggered"]), npz["reference_triggered"])


def test_gate_kinds():
    from signtrap.deploy.config import ExportConfig
    from signtrap.deploy.exporter import gate

    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (200, 43)).astype(np.float32)
    cfg = ExportConfig()
    assert gate("x:fp32", "fp32", ref + 1e-4, ref, 100, cfg)["passed"]
    with pytest.raises(SigntrapError, match=r"x:fp32: parity gate failed.*nothing was written"):
        gate("x:fp32", "fp32", ref + 0.01, ref, 100, cfg)
    nan = ref.copy()
    nan[5, 5] = np.nan
    with pytest.raises(SigntrapError, match="non-finite"):
        gate("x:fp32", "fp32", nan, ref, 100, cfg)
    # a near-tie may flip in FP32 without failing parity; a clear disagreement may not
    tie = ref.copy()
    top = np.argsort(tie[0])[-2:]
    tie[0, top[0]] = tie[0, top[1]] - 1e-4
    flipped = tie.copy()
    flipped[0, top[0]] += 2e-4
    assert gate("x:fp32", "fp32", flipped, tie, 100, cfg)["disagreements"] == 1
    # quantized artefacts: agreement on the clean images (the first 100) only
    noisy = ref.copy()
    noisy[100:] = rng.normal(0, 3, (100, 43))  # triggered half disagrees: left to the bench audit
    result = gate("x:int8", "int8", noisy, ref, 100, cfg)
    assert result["passed"] and result["top1_agreement_clean"] == 1.0 and result["top1_agreement"] < 0.9
    with pytest.raises(SigntrapError, match=r"x:int8: gate failed: INT8 artefact agrees .* on 0\.00%"):
        gate("x:int8", "int8", -ref, ref, 100, cfg)


@pytest.fixture
def defended_run(tiny_run, tmp_path, monkeypatch) -> Path:
    """runs/NAME with a defence-finetune output (the trained checkpoint stands in for the defended one), cwd = tmp_path."""
    run = tmp_path / "runs" / tiny_run.name
    (run / "defence-finetune").mkdir(parents=True)
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    for name in ("model.pt", "checksums.json"):
        shutil.copy(tiny_run / name, run / "defence-finetune" / name)
    monkeypatch.chdir(tmp_path)
    return run


def test_failed_gate_writes_nothing_for_a_defence_export(defended_run, tmp_path):
    """A defence's checkpoint exports through runs/NAME/defence-METHOD; a failed gate leaves no folder."""
    run = defended_run
    with pytest.raises(SigntrapError, match="parity gate failed"):
        export_run(run, defence="finetune", overrides={**ORT, "parity_atol": 1e-12, "parity_rtol": 0.0}, threads=1)
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").iterdir())


def test_defence_export_benches_as_defended(defended_run, tiny_run):
    out = export_run(defended_run, defence="finetune", overrides={**ORT, "quantizers": []}, threads=1)
    assert out == Path("export") / f"{tiny_run.name}-defence-finetune"
    assert main(["--quiet", "bench", str(out), *FAST]) == 0
    bench = json.loads((out / "bench.json").read_text())
    assert bench["export"]["defence"] == "finetune" and "(defence finetune)" in (out / "bench.md").read_text()
    assert {r["artefact"] for r in bench["rows"]} == {"pytorch:fp32", "onnxruntime:fp32", "onnxruntime:fp16", "onnxruntime:int8"}


def test_exporter_falls_back_to_torchscript(tiny_run, tmp_path, monkeypatch):
    import onnxruntime as ort
    import torch

    from signtrap.runs.checkpoint import verified_load
    from signtrap.deploy.onnx_graph import export_fp32

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


def test_bench_cli_and_edge_script_without_torch_agree(export_copy, tmp_path):
    assert main(["--quiet", "bench", str(export_copy), *FAST]) == 0
    bench = json.loads((export_copy / "bench.json").read_text())
    assert (export_copy / "bench.md").read_text().startswith("# Benchmark") and (export_copy / "bench.png").stat().st_size > 1000
    assert bench["schema"] == edge_bench.SCHEMA and bench["settings"]["threads"] == 1
    assert bench["environment"]["versions"]["onnxruntime"] and bench["environment"]["cpu"]
    rows = {r["artefact"]: r for r in bench["rows"]}
    assert set(rows) == {"pytorch:fp32", "onnxruntime:fp32", "onnxruntime:fp16", "onnxruntime:int8"}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["latency_ms"]["p50"] > 0 and r["throughput"]["batch"] == 8 and r["file_bytes"] > 0
    # the parity gate's promise: PyTorch and ONNX Runtime FP32 make the same predictions
    assert rows["pytorch:fp32"]["flip_vs_fp32"]["all"] == 0.0 == rows["onnxruntime:fp32"]["flip_vs_fp32"]["all"]
    assert rows["onnxruntime:fp32"]["asr"] == rows["pytorch:fp32"]["asr"]
    assert rows["onnxruntime:fp32"]["audit"]["clean"]["flips"] == 0
    # GPU providers: skipped here with a stated reason, never an error row
    skipped = {s["runtime"]: s["reason"] for s in bench["skipped"]}
    assert set(skipped) == {"onnxruntime-cuda", "onnxruntime-tensorrt"}
    assert "CUDAExecutionProvider is not available" in skipped["onnxruntime-cuda"] and "onnxruntime-gpu" in skipped["onnxruntime-cuda"]

    env = no_torch_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr
    out = tmp_path / "edge.json"
    proc = run_edge(export_copy, env, "--out", str(out), "--quiet", *FAST)
    assert proc.returncode == 0, proc.stderr
    edge = json.loads(out.read_text())
    assert edge["schema"] == bench["schema"] and set(edge) == set(bench)
    assert set(edge["settings"]) == set(bench["settings"]) and edge["skipped"] == bench["skipped"]
    assert set(edge["rows"][0]) == set(rows["onnxruntime:fp32"])
    for r in edge["rows"]:
        twin = rows[r["artefact"]]
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


def test_unlisted_swapped_variant_refused(export_copy, tmp_path, capsys):
    """Issue 11: a variant dropped from the file table and swapped for another file is never loaded unverified."""
    shutil.copy(export_copy / "model.fp32.onnx", export_copy / "model.int8.onnx")  # the swap
    rewrite_manifest(export_copy, lambda m: m["files"].pop("model.int8.onnx"))
    assert main(["bench", str(export_copy), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.int8.onnx: not listed in model.json's file table" in err
    proc = run_edge(export_copy, no_torch_env(tmp_path), *FAST)
    assert proc.returncode == 2 and "not listed in model.json's file table" in proc.stderr


@pytest.mark.parametrize("name", ["../model.fp32.onnx", "/etc/passwd", "sub/model.onnx", "..", "", "link.onnx"])
def test_artefact_file_names_must_be_plain_files_inside_the_folder(export_copy, tmp_path, capsys, name):
    outside = tmp_path / "outside.onnx"
    shutil.copy(export_copy / "model.fp32.onnx", outside)
    if name == "link.onnx":
        (export_copy / name).symlink_to(outside)

    def point(m):
        m["artefacts"][2]["files"] = [name]
        m["files"][name] = {"sha256": edge_bench.sha256_file(outside), "bytes": outside.stat().st_size}

    rewrite_manifest(export_copy, point)
    assert main(["bench", str(export_copy), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("not a plain file name" in err) if name != "link.onnx" else ("symbolic link" in err)
    proc = run_edge(export_copy, no_torch_env(tmp_path), *FAST)
    assert proc.returncode == 2 and ("not a plain file name" in proc.stderr or "symbolic link" in proc.stderr)


def test_bundle_size_mismatch_refused(export_copy, tmp_path, capsys):
    with np.load(export_copy / "eval.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["images"] = np.ascontiguousarray(arrays["images"][:, :16, :16])
    arrays["triggered"] = np.ascontiguousarray(arrays["triggered"][:, :16, :16])
    np.savez_compressed(export_copy / "eval.npz", **arrays)
    rewrite_manifest(export_copy, lambda m: m["files"]["eval.npz"].update(sha256=edge_bench.sha256_file(export_copy / "eval.npz")))
    assert main(["bench", str(export_copy), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16x16 but the model takes 32x32" in err
    proc = run_edge(export_copy, no_torch_env(tmp_path), *FAST)
    assert proc.returncode == 2 and "16x16 but the model takes 32x32" in proc.stderr


@pytest.mark.parametrize("flag,value,message", [("--threads", "100000", "--threads 100000 is outside 1.."),
                                                ("--threads", "-3", "--threads -3 is outside 1.."),
                                                ("--batch", "100000", "--batch 100000 is outside 1..4096"),
                                                ("--runs", "0", "--runs 0 is outside 1..")])
def test_bench_settings_have_bounds(exported, tmp_path, capsys, flag, value, message):
    args = [a for a in FAST]
    args[args.index(flag) + 1] = value
    assert main(["bench", str(exported), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    proc = run_edge(exported, no_torch_env(tmp_path), *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_every_row_failed_is_a_failure(export_copy, tmp_path, monkeypatch, capsys):
    from signtrap.deploy.bench import bench_export

    def broken(self, paths, artefact, threads):
        raise RuntimeError("simulated runtime crash")

    monkeypatch.setattr(type(edge_bench.EDGE_RUNTIMES["onnxruntime"]), "load", broken)
    with pytest.raises(SigntrapError, match="no artefact could be benchmarked.*simulated runtime crash"):
        bench_export(export_copy, threads=1, runs=5, warmup=1, batch=8)
    bench = json.loads((export_copy / "bench.json").read_text())  # written for diagnosis
    assert all("simulated" in r["error"] for r in bench["rows"] if r["runtime"] == "onnxruntime")
    monkeypatch.undo()
    # the edge script on a device without any runtime: nothing measurable, non-zero exit
    env = no_torch_env(tmp_path, ("torch", "signtrap", "onnxruntime", "openvino", "ai_edge_litert", "executorch", "ncnn"))
    proc = run_edge(export_copy, env, *FAST)
    assert proc.returncode == 1 and "nothing could be benchmarked" in proc.stderr and "pip install onnxruntime" in proc.stderr


def test_unknown_or_unavailable_runtime_refused(exported, tmp_path, capsys):
    assert main(["bench", str(exported), "--providers", "cuda", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runtime 'onnxruntime-cuda' cannot run here" in err
    assert main(["bench", str(exported), "--providers", "gpu-please", *FAST]) == 2
    assert "unknown execution provider 'gpu-please'" in capsys.readouterr().err
    proc = run_edge(exported, no_torch_env(tmp_path), "--runtimes", "onnxruntime-tensorrt", *FAST)
    assert proc.returncode == 2 and "TensorrtExecutionProvider is not available" in proc.stderr
    proc = run_edge(exported, no_torch_env(tmp_path), "--runtimes", "tflite-please", *FAST)
    assert proc.returncode == 2 and "unknown runtime 'tflite-please'" in proc.stderr
    proc = run_edge(exported, no_torch_env(tmp_path), "--runtimes", "openvino", *FAST)
    assert proc.returncode == 2 and "this export has no openvino artefacts" in proc.stderr


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


def test_old_export_format_refused(export_copy, capsys):
    rewrite_manifest(export_copy, lambda m: m.update(format="signtrap.export/1"))
    assert main(["bench", str(export_copy), *FAST]) == 2
    assert "export it again" in capsys.readouterr().err


def test_edge_metrics_match_signtrap_metrics():
    from signtrap.evaluation.metrics import backdoor_metrics

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


def test_audit_flags_flips_that_concentrate_on_one_class():
    labels = np.arange(100) % 10
    ref_clean, ref_trig = labels.copy(), labels.copy()
    clean = labels.copy()
    clean[:3] = (labels[:3] + 1) % 10  # 3 scattered clean flips
    trig = labels.copy()
    trig[10:30] = 7  # a sleeper: 20 triggered images now read as class 7 ...
    trig[30:33] = 2  # ... and a few scattered flips
    out = edge_bench.audit(labels, clean, trig, ref_clean, ref_trig)
    assert out["clean"]["flips"] == 3 and out["triggered"]["flips"] == 18 + 2  # images of class 7 (and 2) did not flip
    assert out["concentration"]["class"] == 7 and out["concentration"]["flips"] == 18
    assert out["warning"] and "go to class 7" in out["warning"]
    top = out["triggered"]["table"][0]
    assert top["pred"] == 7 and top["count"] == 2 and set(top) == {"true", "fp32", "pred", "count"}
    # flips spread over classes (ordinary quantization noise): no warning
    spread = labels.copy()
    spread[10:30] = (labels[10:30] + 3) % 10
    assert edge_bench.audit(labels, clean, spread, ref_clean, ref_trig)["warning"] is None
    assert edge_bench.audit(labels, labels, labels, ref_clean, ref_trig)["concentration"] is None


def test_edge_script_is_python38_numpy_only_and_assembled_from_the_plugins():
    from signtrap.deploy import runtimes

    script = runtimes.assemble_edge_script()
    tree = ast.parse(script, feature_version=(3, 8))
    top_level = set()
    for node in tree.body:  # runtime packages are imported inside the runtime classes' methods only
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
        elif isinstance(node, ast.Try):
            top_level |= {a.name.split(".")[0] for n in node.body if isinstance(n, ast.Import) for a in n.names}
    for node in ast.walk(tree):
        assert not isinstance(node, (ast.Match, ast.NamedExpr)), "keep the edge script plain Python 3.8"
        assert not (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "signtrap" for a in node.names))
    # torch only where a runtime's own Python bindings need it (ExecuTorch links libtorch)
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        imports_torch = any(isinstance(n, ast.Import) and any(a.name == "torch" for a in n.names) for n in ast.walk(cls))
        assert not imports_torch or cls.name == "ExecuTorchEdge", cls.name
    assert top_level - set(sys.stdlib_module_names) - {"__future__"} == {"numpy"}
    for name, section in runtimes.edge_sections().items():
        assert script.count(section) == 1, name
    assert (REPO / "export" / "edge_bench.py").read_text() == script, (
        "export/edge_bench.py is stale: python -m signtrap.deploy.runtimes > export/edge_bench.py")


def test_edge_sections_use_only_the_core_and_their_own_names():
    """An edge section is pasted into the core script: every global name it reads must exist there."""
    import builtins

    from signtrap.deploy import runtimes

    core = set(vars(edge_bench)) | set(dir(builtins))
    defined = set()
    for section in runtimes.edge_sections().values():
        tree = ast.parse(section)
        defined |= {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    for name, section in runtimes.edge_sections().items():
        tree = ast.parse(section)
        local = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        local |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
        local |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        local |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.ExceptHandler)) and n.name}
        loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert loaded - local - core - defined == set(), name
        # ... and inside signtrap the plugin module itself must provide the same names
        module = vars(sys.modules[name])
        assert {n for n in loaded - local if n in core and n not in dir(builtins)} - set(module) == set(), name


def test_export_config_checks():
    from signtrap.config import load_config

    cfg = load_config(None, ["export.calib_method=entropy", "export.per_channel=true", "export.calibration=mixed",
                             "export.runtimes=[onnxruntime,openvino]", "export.quantizers=[all]"])
    assert cfg.export.calib_method == "entropy" and cfg.export.per_channel and cfg.export.runtimes == ["onnxruntime", "openvino"]
    for bad in ("export.calib_method=kl", "export.calibration=dirty", "export.opset=9", "export.parity_atol=0",
                "export.exporter=tflite", "export.calib_trigger_fraction=1.5", "export.min_agreement=2",
                "export.bench_batch=100000"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_unknown_runtime_or_quantizer_refused_before_anything_runs(tiny_run, tmp_path):
    with pytest.raises(SigntrapError, match=r"unknown runtime 'openvnio' \(did you mean 'openvino'\?\)"):
        export_run(tiny_run, out=tmp_path / "x", overrides={"runtimes": ["openvnio"]})
    with pytest.raises(SigntrapError, match="unknown quantizer variant 'int8-kl'.*int8-perchannel"):
        export_run(tiny_run, out=tmp_path / "x", overrides={"runtimes": ["onnxruntime"], "quantizers": ["int8-kl"]})
    assert not (tmp_path / "x").exists()


def test_optional_quantizer_variants(tiny_run, tmp_path):
    out = export_run(tiny_run, out=tmp_path / "q", threads=1,
                     overrides={**ORT, "quantizers": ["onnxruntime:int8-perchannel", "int8-entropy"]})
    manifest = json.loads((out / "model.json").read_text())
    arts = {a["id"]: a for a in manifest["artefacts"]}
    assert set(arts) == {"onnxruntime:fp32", "onnxruntime:fp16", "onnxruntime:int8", "onnxruntime:int8-perchannel",
                         "onnxruntime:int8-entropy"}
    assert arts["onnxruntime:int8-perchannel"]["files"] == ["model.int8-perchannel.onnx"]
    assert arts["onnxruntime:int8-perchannel"]["conversion"]["per_channel"] is True
    assert arts["onnxruntime:int8-entropy"]["conversion"]["calibration_method"] == "entropy"
    assert arts["onnxruntime:int8"]["conversion"]["per_channel"] is False
    assert (out / "model.int8-perchannel.onnx").read_bytes() != (out / "model.int8.onnx").read_bytes()


def test_artefacts_of_an_unknown_runtime_are_listed_as_skipped(export_copy, tmp_path):
    """An export made by a newer signtrap may hold artefacts this edge script has no runner for."""
    shutil.copy(export_copy / "model.fp32.onnx", export_copy / "model.future.fp32.bin")

    def add(m):
        m["artefacts"].append({"id": "future:fp32", "runtime": "future", "variant": "fp32", "precision": "fp32",
                               "files": ["model.future.fp32.bin"]})
        m["files"]["model.future.fp32.bin"] = {"sha256": edge_bench.sha256_file(export_copy / "model.future.fp32.bin")}

    rewrite_manifest(export_copy, add)
    out = tmp_path / "edge.json"
    proc = run_edge(export_copy, no_torch_env(tmp_path), "--out", str(out), "--quiet", *FAST)
    assert proc.returncode == 0, proc.stderr
    skipped = {s["runtime"]: s for s in json.loads(out.read_text())["skipped"]}
    assert skipped["future"]["artefacts"] == ["future:fp32"] and "no runner for runtime 'future'" in skipped["future"]["reason"]


def test_a_failed_int8_gate_rejects_that_artefact_only(tiny_run, tmp_path):
    """An INT8 artefact below export.min_agreement is left out and listed; strict fails the whole export."""
    out = tmp_path / "export" / "lenient"
    export_run(tiny_run, out=out, overrides={**ORT, "min_agreement": 1.0, "quantizers": []}, threads=1)
    manifest = json.loads((out / "model.json").read_text())
    ids = [a["id"] for a in manifest["artefacts"]]
    rejected = {r["id"]: r["reason"] for r in manifest["rejected"]}
    agreement = manifest["agreement_vs_fp32"]
    assert "onnxruntime:fp32" in ids and set(ids).isdisjoint(rejected)
    # the tiny model's INT8 does not agree with FP32 on every clean image (else this test proves nothing)
    assert "onnxruntime:int8" in rejected and "gate failed" in rejected["onnxruntime:int8"], (ids, agreement)
    assert not (out / "model.int8.onnx").exists() and "model.int8.onnx" not in manifest["files"]
    strict = tmp_path / "export" / "strict"
    first = next(r for r in manifest["rejected"])["id"]  # strict stops at the first artefact below the gate (FP16 may be one)
    with pytest.raises(SigntrapError, match=f"{first}: gate failed"):
        export_run(tiny_run, out=strict, overrides={**ORT, "min_agreement": 1.0, "strict": True}, threads=1)
    assert not strict.exists()
