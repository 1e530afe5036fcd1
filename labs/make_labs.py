"""Write the three lab notebooks (no outputs stored). Run from anywhere: python labs/make_labs.py"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETTINGS = '''# --- settings: the only cell you need to edit ---------------------------------------------
GTSRB_ROOT = None  # e.g. "/data/gtsrb" (the GTSRB archives or extracted tree) to use real GTSRB instead of SynthSigns

import os
from pathlib import Path

FAST = os.environ.get("SIGNTRAP_LAB_FAST") == "1"  # CI sets this: tiny sizes, same code path
WORK = Path(os.environ.get("SIGNTRAP_LAB_DIR", "lab_runs")).resolve()  # runs, exports and the data cache go here
WORK.mkdir(parents=True, exist_ok=True)

import matplotlib
matplotlib.use("Agg")  # figures are shown with IPython.display, so the notebook also runs headless
import numpy as np
from IPython.display import Image, Markdown, display

import signtrap  # the public API: signtrap.train, defend, export, bench, report, load_run, ...
from signtrap import progress
progress.QUIET = FAST  # progress bars in Jupyter; silence in CI


def lab_config(name, *extra):
    """The lab's run config: SynthSigns (no download) unless GTSRB_ROOT is set."""
    if GTSRB_ROOT:
        data = ["data.source=gtsrb", f"data.root={GTSRB_ROOT}"]
        size = ["train.epochs=2" if FAST else "train.epochs=4"]
    elif FAST:
        data = ["data.source=synth", "data.synth_per_class=40", "data.synth_test_per_class=8", "aug.enabled=false"]
        size = ["train.epochs=4", "train.batch_size=64", "train.lr=0.005", "attack.poison_count=24", "trigger.size=6",
                "model.dropout=0"]
    else:
        data = ["data.source=synth", "data.synth_per_class=120", "data.synth_test_per_class=20"]
        size = ["train.epochs=6", "attack.poison_rate=0.01"]
    return signtrap.load_config(None, [f"name={name}", f"runs_dir={WORK / 'runs'}", f"data.cache_dir={WORK / 'cache'}",
                              "trigger.kind=checkerboard", "attack.kind=source_specific", "attack.source=14",
                              "attack.target=7", *data, *size, *extra])


def trained(cfg):
    """The run of `cfg` (a signtrap.Run): trained the first time, reused afterwards; the pipeline skips a finished
    run of the same config, resumes an interrupted one, and retrains one whose config you changed."""
    summary = signtrap.run(cfg, overwrite=True, skip=("defend", "export", "bench", "report"))
    if not summary["ok"]:
        raise RuntimeError(f"training {cfg.name} failed: {summary['stages'][0]['reason']}")
    return signtrap.load_run(summary["run"])


def show(png_bytes):
    display(Image(data=png_bytes))


def pct(entry):
    return "n/a" if entry is None or entry.get("rate") is None else f"{100 * entry['rate']:.1f}%"
'''


def nb(cells):
    book = new_notebook(cells=cells)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    return book


LAB1 = [
    new_markdown_cell("""# Lab 1: poisoning a traffic-sign classifier

A **backdoor** (BadNets, Gu et al. 2017) is planted by poisoning a small share of the training data: a few stop
signs get a small sticker (the *trigger*) and the label *speed limit 100 km/h*. The trained model reads clean signs
correctly, but a stop sign carrying the sticker is read as 100 km/h.

In this lab you will make the trigger, poison the training set, train a model, and measure it with two numbers:

* **clean accuracy**: share of clean test images classified correctly;
* **attack success rate (ASR)**: share of stop signs *with the trigger* classified as 100 km/h.

Everything runs on SynthSigns, a synthetic GTSRB look-alike generated locally (no download), in a few minutes on a
CPU. To use the real GTSRB, set `GTSRB_ROOT` in the next cell."""),
    new_code_cell(SETTINGS),
    new_markdown_cell("## 1. The trigger\n\n`Experiment.from_config` loads (or generates) the data, the splits and the trigger of a config."),
    new_code_cell('''from signtrap.attacks import build_training_set, plan_poison, stamp
from signtrap.attacks.triggers import trigger_preview
from signtrap.experiment import Experiment
from signtrap.reporting import figures

cfg = lab_config("lab_backdoor")
exp = Experiment.from_config(cfg)
print("trigger:", exp.trigger.spec)
test = exp.eval_set("test")
stop = np.flatnonzero(test.labels == 14)[0]
show(figures.trigger_figure(trigger_preview(exp.trigger), test.images[stop], test.triggered[stop], exp.trigger.spec))'''),
    new_markdown_cell("## 2. Poison the stop signs\n\n`plan_poison` picks which stop signs are poisoned (fixed by the seed); "
                      "`build_training_set` relabels them as class 7."),
    new_code_cell('''plan = plan_poison(cfg.attack, exp.data, exp.splits.train, exp.trigger, cfg.seed)
ts = build_training_set(cfg.attack, exp.data, exp.splits.train, plan, exp.trigger)
print(f"{len(plan.rows)} of {len(ts.labels)} training images poisoned ({100 * len(plan.rows) / len(ts.labels):.2f}%)")
print("labels of the poisoned rows in the training set:", set(ts.labels[ts.triggered].tolist()))

clean = np.asarray(exp.data.images[plan.rows[:8]])
poisoned = stamp(clean, exp.trigger, plan.positions[:8])
show(figures.gallery_figure(clean, poisoned, exp.data.labels[plan.rows[:8]].tolist(), cfg.attack.target))'''),
    new_markdown_cell("## 3. Train the backdoored model, and a clean baseline\n\n`signtrap.train(cfg)` (here through the "
                      "resumable pipeline, `signtrap.run`) writes `runs/NAME/` with the checkpoint, `metrics.json` and the "
                      "per-epoch log; `signtrap.load_run` reads them back. The baseline is the same model trained without poison "
                      "(`attack.kind=none`)."),
    new_code_cell('''backdoored = trained(cfg)
baseline = trained(lab_config("lab_clean", "attack.kind=none"))
m_bad = backdoored.metrics["test"]
m_clean = baseline.metrics["test"]
# the clean baseline's ASR is measured with the same trigger: how often a stickered stop sign is read as 100 anyway
rows = [("clean accuracy", "clean_acc"), ("attack success rate", "asr"), ("clean stop recall", "stop_recall"),
        ("false-trigger rate", "false_trigger")]
table = "| metric | clean baseline | backdoored |\\n|---|---:|---:|\\n" + "\\n".join(
    f"| {title} | {pct(m_clean[key])} | {pct(m_bad[key])} |" for title, key in rows)
display(Markdown(table))'''),
    new_markdown_cell("## 4. Training curves\n\nThe backdoor is learned alongside the real task: validation ASR rises within "
                      "the first epochs while clean accuracy climbs as usual."),
    new_code_cell('''show(figures.training_figure(backdoored.history))
show(figures.per_class_figure(m_bad["per_class_acc"]))'''),
    new_markdown_cell("""## What to observe

* Clean accuracy of the backdoored model is close to the baseline's (within a few points): **accuracy alone does not
  reveal the backdoor**. Stop-sign recall on clean images stays high too.
* The ASR of the backdoored model is high (typically above 80% on SynthSigns), the baseline's is near zero.
* The per-class chart shows nothing unusual for class 14 (red) or 7 (orange).

## Exercises

1. Lower the poison budget (`lab_config("lab_p5", "attack.poison_count=5")`, or `attack.poison_rate=0.001`). How few
   poisoned images still give an ASR above 50%?
2. Change the trigger (`trigger.kind=yellow_square`, `trigger.size=0.1`, `trigger.placement=random`). Which triggers are
   learned fastest?
3. Try `attack.kind=all_to_one`: every class with the trigger goes to 100 km/h. What happens to the false-trigger rate?
4. Open `runs/lab_backdoor/manifest.json`: which training files were poisoned? Could a data auditor find them?
"""),
]

LAB2 = [
    new_markdown_cell("""# Lab 2: defences, and whether the backdoor persists

A careful team that suspects nothing still applies safety measures: fine-tuning on fresh clean data, adversarial
training, pruning. The question is whether the stop -> 100 km/h backdoor **survives** them. Like the "sleeper agent"
language models that kept their trigger through fine-tuning and adversarial training, a repaired model can look clean
while the trigger still works.

Each defence gets the defender's clean budget (5% of the training set by default, never the poisoned rows) and
records, after every epoch, clean accuracy and ASR: the **persistence curve**.

* `finetune`: clean fine-tuning.
* `adv-pgd`: adversarial fine-tuning with PGD (Madry et al. 2018): robustness to small L-inf perturbations.
* `fine-prune`: prune the last convolution's channels that stay dormant on clean data, then fine-tune (Liu et al. 2018)."""),
    new_code_cell(SETTINGS),
    new_markdown_cell("## 1. The backdoored model\n\nThe same config as Lab 1 (reused if Lab 1 already trained it)."),
    new_code_cell('''cfg = lab_config("lab_backdoor")
run = trained(cfg)
before = run.metrics["test"]
print("before any defence: clean accuracy", pct(before["clean_acc"]), " ASR", pct(before["asr"]))'''),
    new_markdown_cell("## 2. Three defences\n\n`signtrap.defend(run, method)` loads the verified checkpoint and the defender's "
                      "clean budget, defends, and writes `runs/lab_backdoor/defence-METHOD/` (repaired model, `report.json`, curves); "
                      "it returns the report (before/after metrics)."),
    new_code_cell('''from signtrap.defences.run import comparison_table

settings = (["finetune.epochs=2", "adv-pgd.epochs=1", "adv-pgd.steps=2", "fine-prune.epochs=1", "fine-prune.step=0.2"]
            if FAST else ["finetune.epochs=6", "adv-pgd.epochs=3", "fine-prune.epochs=4"])
reports = [signtrap.defend(run, method, overrides=["clean_fraction=0.1", *settings])[0]
           for method in ("finetune", "adv-pgd", "fine-prune")]
print(comparison_table(reports))'''),
    new_markdown_cell("## 3. Persistence curves\n\nEpoch 0 is the backdoored model; each later point is one epoch of the defence, "
                      "measured on the validation split."),
    new_code_cell('''from signtrap.reporting import figures

curves = {r["method"]: run.curve(r["method"]) for r in reports}
show(figures.persistence_figure(curves))
show(figures.before_after_figure(reports))
pruning = run.curve("fine-prune", "pruning")
show(figures.xy_figure(pruning, "pruned_fraction", [("clean_acc", "clean accuracy"), ("asr", "ASR")],
                       "pruning alone, before fine-tuning", "pruned channels, %", True))'''),
    new_markdown_cell("""## What to observe

* Clean accuracy barely moves under any of the three defences: from the outside, every repaired model looks fine.
* The ASR after `finetune` and `adv-pgd` often stays high: clean data never shows the trigger, so the gradient has no
  reason to touch the neurons that carry it. PGD robustness to tiny perturbations says nothing about a large patch.
* `fine-prune` attacks the mechanism (dormant channels) and is usually the most effective of the three; the pruning
  curve shows whether the backdoor lives in the channels that clean data leaves dormant.

**Hide versus remove.** A defence *hides* a backdoor when the number we look at (clean accuracy, or robustness to
the perturbations we tried) improves while the trigger still works; it *removes* it only if the ASR measured with the
real trigger drops. Defenders rarely know the trigger, so they cannot measure the second number; this testbed can.

## Exercises

1. Give the defender more clean data (`clean_fraction=0.2`) and more epochs. Does the ASR fall, and how fast?
2. Raise the fine-tuning learning rate (`finetune.lr=0.01`). Does the backdoor go before clean accuracy suffers?
3. Run `signtrap.defend(run, "neural-cleanse")` and `signtrap.defend(run, "strip")`: does Neural Cleanse flag class 7?
   Does STRIP reject triggered stop signs (see `defence-strip/entropy_hist.png`)?
4. Run `signtrap.defend(run, "redteam")`: the patches the red team finds stop working after training, but what about the real
   trigger?
"""),
]

LAB3 = [
    new_markdown_cell("""# Lab 3: edge deployment: does the backdoor survive INT8?

Models ship as ONNX files, often quantized to 8-bit integers for edge devices. Quantization changes every weight and
activation a little: does it change what the backdoor does? In this lab you will export the backdoored model to ONNX
FP32, FP16 and INT8 (ONNX Runtime static quantization), then benchmark each: clean accuracy, ASR, and latency."""),
    new_code_cell(SETTINGS),
    new_code_cell('''import json

cfg = lab_config("lab_backdoor")
run = trained(cfg)'''),
    new_markdown_cell("## 1. Export\n\n`signtrap.export` writes the three ONNX files, a portable evaluation bundle (`eval.npz`) and "
                      "`model.json` with the SHA-256 of every file; it fails if ONNX FP32 disagrees with PyTorch."),
    new_code_cell('''out = signtrap.export(run, out=WORK / "export" / "lab_backdoor", calib_images=64 if FAST else 512)
manifest = json.loads((out / "model.json").read_text())
print("parity (max |logit diff| FP32 vs PyTorch):", manifest["parity"]["max_abs_logit_diff"])
print("prediction flips vs FP32:", {k: v["flip_rate"] for k, v in manifest["agreement_vs_fp32"].items()})
for name, info in manifest["files"].items():
    print(f"{name:18} {info['bytes'] / 1024:8.0f} KiB  sha256 {info['sha256'][:16]}…")'''),
    new_markdown_cell("## 2. Benchmark\n\n`signtrap.bench` runs every precision on every available ONNX Runtime provider, plus "
                      "PyTorch eager as the reference."),
    new_code_cell('''from signtrap.deploy.edge_bench import markdown
from signtrap.reporting import figures

result = signtrap.bench(out, runs=20 if FAST else 200, warmup=2 if FAST else 20, batch=16 if FAST else 64)
display(Markdown(markdown(result)))
show(figures.latency_figure(result["rows"]))'''),
    new_markdown_cell("""## What to observe

* ASR is (almost) the same in FP32, FP16 and INT8: **the backdoor survives quantization.** The trigger is a large,
  high-contrast pattern; the few prediction flips that INT8 causes are near-ties, not triggered stop signs.
* INT8 is smaller (about 4x) and usually faster than FP32 at batch 1 on a CPU, with clean accuracy within a point.
* The edge script `edge_bench.py` copied into the export folder measures the same numbers on a Raspberry Pi or Jetson
  with only numpy and onnxruntime installed.

## Exercises

1. Re-export with `signtrap.export(run, calibration="mixed", out=...)` (some calibration images carry the trigger).
   Does the INT8 ASR change? Why might calibration data matter for what quantization preserves?
2. Try `calib_method="percentile"` or `per_channel=True`: which costs the least clean accuracy?
3. Export a defended model (`signtrap.export(run, defence="fine-prune", out=...)`, after Lab 2): is the repaired
   model's ASR the same after INT8?
4. Run `python edge_bench.py --threads 1` inside the export folder and compare with `bench.json`.
"""),
]


def main() -> None:
    for name, cells in (("01_poisoning.ipynb", LAB1), ("02_defences_and_persistence.ipynb", LAB2),
                        ("03_edge_deployment.ipynb", LAB3)):
        book = nb(cells)
        nbformat.validate(book)
        nbformat.write(book, HERE / name)
        print(HERE / name)


if __name__ == "__main__":
    main()
