"""The one source of the labs: writes every student notebook (labs/NN_*.ipynb) and its solutions copy
(labs/solutions/NN_*.ipynb), without outputs. Run from anywhere after editing: python labs/make_labs.py

A lab is a list of cells. `Code(student, solution)` is an exercise cell: the student copy holds the first text,
the solutions copy the second; every other cell is the same in both. Cells carry tags the tests read:
`exercise` (the student edits it), `check` (prints "Exercise N: correct" or "Exercise N: not yet"; in the
solutions copy "not yet" raises), `observe` (conclusions computed from the numbers just produced), `settings`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Running time of each solutions copy top to bottom with ONE CPU thread (OMP_NUM_THREADS=1; a 2-core laptop is no
# slower), measured as the kernel's CPU time (tests/test_labs.py prints it; `make lab-check` shows it). Fast =
# SIGNTRAP_LAB_FAST=1, labs 2-4 reusing lab 1's models. Full size, every lab run end to end (solutions copy,
# nbclient, one thread, at most two such jobs on this project's 2-core box): lab 1 312 s; lab 2 373 s and lab 3 26 s reusing
# lab 1's model; lab 4 1,172 s in a fresh work dir (of which ~200 s trains lab 1's two models and ~100 s the two
# detection models); lab 5 215 s (fresh work dir, its sleeper included).
TIMES = {
    "01": "full size about 6 min (six small models), fast size about 1 min",
    "02": "full size about 6 min (plus 1 min if lab 1 has not trained its model yet), fast size under 1 min",
    "03": "full size about 1 min (plus 1 min if lab 1 has not trained its model yet), fast size under 1 min",
    "04": "full size about 20 min before its PAM section, which adds one defence and its probe (not re-timed), fast size about 2 min",
    "05": "full size about 4 min on SynthSigns (real GTSRB much longer), fast size about 1.5 min",
    "06": "full size about 6 min (three small models, two physical evaluations), fast size about 2 min",
}
TIMES_NOTE = "on a 2-core laptop CPU (measured as one-thread CPU time)"


@dataclass
class Code:
    student: str
    solution: str | None = None  # None: the same in both copies
    tags: tuple[str, ...] = ()


@dataclass
class Md:
    text: str
    tags: tuple[str, ...] = ()


def exercise(student: str, solution: str) -> Code:
    return Code(student, solution, ("exercise",))


def check(text: str) -> Code:
    return Code(text, None, ("check",))


def observe(text: str) -> list:
    return [Md("### What to observe"), Code(text, None, ("observe",))]


SETUP = '''# --- settings: the only cell you need to edit -------------------------------------------------------------------
GTSRB_ROOT = None  # e.g. "/data/gtsrb" (the GTSRB archives or extracted tree) to use real GTSRB instead of SynthSigns
FAST = None        # True: tiny sizes (what CI runs, about a minute); None: the environment decides (SIGNTRAP_LAB_FAST=1)

import contextlib
import io
import os
import time
from pathlib import Path

FAST = os.environ.get("SIGNTRAP_LAB_FAST") == "1" if FAST is None else FAST
WORK = Path(os.environ.get("SIGNTRAP_LAB_DIR", "{work}")).resolve()  # runs, exports and the data cache go here
WORK.mkdir(parents=True, exist_ok=True)
SOLUTIONS = {solutions}  # the solutions copy: a check that is not passed stops the notebook

import matplotlib
matplotlib.use("Agg")  # figures are shown as PNG images, so the notebook runs the same headless
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, Markdown, display

import signtrap  # the public API: signtrap.train, run, defend, export, bench, report, load_run, ...

torch.manual_seed(0)
SOURCE, TARGET = 14, 7  # stop sign -> speed limit 100 km/h


def lab_config(name, *extra):
    """The lab's run config: SynthSigns (generated locally, no download) unless GTSRB_ROOT is set."""
    if GTSRB_ROOT:
        data = ["data.source=gtsrb", f"data.root={{GTSRB_ROOT}}"]
        size = ["train.epochs=2" if FAST else "train.epochs=6"]
    elif FAST:
        data = ["data.source=synth", "data.synth_per_class=40", "data.synth_test_per_class=8", "aug.enabled=false"]
        size = ["train.epochs=4", "train.batch_size=64", "train.lr=0.005", "attack.poison_count=24", "trigger.size=6",
                "model.name=signnet_small", "model.dropout=0"]  # signnet at a quarter of its computation
    else:
        data = ["data.source=synth", "data.synth_per_class=120", "data.synth_test_per_class=20"]
        size = ["train.epochs=6", "attack.poison_count=50"]
    return signtrap.load_config(None, [f"name={{name}}", f"runs_dir={{WORK / 'runs'}}", f"data.cache_dir={{WORK / 'cache'}}",
                                       "trigger.kind=checkerboard", "attack.kind=source_specific", f"attack.source={{SOURCE}}",
                                       f"attack.target={{TARGET}}", *data, *size, *extra])


def quietly(fn, *args, **kwargs):
    """Call a signtrap function with its log (progress bars, stage lines) kept aside: shown only if it fails."""
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            return fn(*args, **kwargs)
    except Exception:
        print(log.getvalue()[-4000:])
        raise


def trained(cfg):
    """The run of `cfg` (a signtrap.Run): trained the first time, reused afterwards (the pipeline skips a finished
    run of the same config, resumes an interrupted one and retrains one whose config you changed)."""
    start = time.perf_counter()
    summary = quietly(signtrap.run, cfg, overwrite=True, skip=("defend", "export", "bench", "report"))
    if not summary["ok"]:
        raise RuntimeError(f"training {{cfg.name}} failed: {{summary['stages'][0]['reason']}}")
    print(f"{{cfg.name}}: ready ({{time.perf_counter() - start:.0f}} s)")
    return signtrap.load_run(summary["run"])


@torch.no_grad()
def predict(model, images, batch=256):
    """Predicted classes of uint8 images (N, 32, 32, 3): the model takes float NCHW in [0, 1]."""
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 255).argmax(1)
           for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def show(fig):
    """Display a matplotlib figure as a PNG (and close it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


def pct(rate):
    return "n/a" if rate is None else f"{{100 * rate:.1f}}%"


def given(value):
    """False while an exercise still holds its placeholder `...` (or None)."""
    return value is not ... and value is not None


def attempt(fn, *args):
    """Call the student's function; an exception becomes the hint instead of stopping the notebook."""
    try:
        return fn(*args), None
    except Exception as exc:  # noqa: BLE001 - any mistake in the exercise is reported, not raised
        return None, f"your code raised {{type(exc).__name__}}: {{exc}}"


def report_check(number, passed, message):
    """Print the verdict of exercise `number`: "correct" with what was confirmed, or "not yet" with a hint."""
    if passed:
        print(f"\\u2714 Exercise {{number}}: correct. {{message}}")
        return
    print(f"\\u2718 Exercise {{number}}: not yet. {{message}}")
    if SOLUTIONS:
        raise AssertionError(f"the solutions copy failed the check of exercise {{number}}: {{message}}")
'''


def setup_cell(solutions: bool) -> str:
    # both copies share labs/lab_runs, so a solution reuses the models its student copy trained (and back)
    return SETUP.format(solutions="True" if solutions else "False", work="../lab_runs" if solutions else "lab_runs")


def header(title: str, number: str, intro: str, goals: list[str]) -> Md:
    goal_lines = "\n".join(f"* {g}" for g in goals)
    return Md(f"""# {title}

{intro}

**Learning goals.** After this lab you can:

{goal_lines}

**How this lab works.** Run the cells top to bottom. Exercise cells are marked **Exercise N**: replace the `...` with
your code or your choice, then run the check cell below it: it says *correct* (and what it confirmed) or *not yet*
(with a hint). The conclusions under **What to observe** are computed from the numbers your run just produced.
A solved copy is in `solutions/`.

**Running time** {TIMES_NOTE}: {TIMES[number]}. Everything runs offline on SynthSigns, a synthetic GTSRB
look-alike generated locally; set `GTSRB_ROOT` in the settings cell to use the real GTSRB. At fast size
(`FAST = True`, what CI runs) the models are tiny and far from accurate: use it to see that everything runs, and
draw your conclusions at full size.""", ("intro",))


# ================================================================ Lab 1

LAB1 = [
    header("Lab 1: poisoning a traffic-sign classifier", "01", """A **backdoor** (BadNets, Gu et al. 2017) is planted by
poisoning a small share of the training data: a few stop signs get a small sticker (the *trigger*) and the label
*speed limit 100 km/h*. The trained model reads clean signs correctly, but a stop sign carrying the sticker is read as
100 km/h.""", [
        "train a backdoored model and a clean baseline with signtrap's Python API, and read their metrics;",
        "compute the **attack success rate (ASR)** yourself from a model's predictions, and say why it counts only "
        "stop signs;",
        "measure how the ASR depends on the **poison budget**, and find the smallest budget that plants the backdoor;",
        "explain why clean accuracy alone does not reveal a backdoor.",
    ]),
    Code(SETUP, tags=("settings",)),
    Md("""## 1. A backdoored model and a clean baseline

`trained(cfg)` runs signtrap's resumable pipeline (`signtrap.run`) for the training stage only, then `signtrap.load_run`
reads the run folder back: `run.metrics` (metrics.json), `run.history` (one row per epoch), `run.model()` (the
checkpoint, hash-verified), `run.experiment()` (data, splits and the trigger). The baseline is the same model trained
without poison (`attack.kind=none`)."""),
    Code('''cfg = lab_config("lab_backdoor")
backdoored = trained(cfg)
baseline = trained(lab_config("lab_clean", "attack.kind=none"))
t = cfg.trigger.settings
size = f"{t.size} px" if isinstance(t.size, int) else f"{t.size:.0%} of the image side"
print(f"{cfg.attack.poison_count} poisoned stop signs; trigger: {cfg.trigger.kind}, {size}, {t.placement}")

m_bad, m_clean = backdoored.metrics["test"], baseline.metrics["test"]
rows = [("clean accuracy", "clean_acc"), ("attack success rate", "asr"), ("clean stop recall", "stop_recall"),
        ("false-trigger rate", "false_trigger")]
display(Markdown("| metric (test split) | clean baseline | backdoored |\\n|---|---:|---:|\\n" + "\\n".join(
    f"| {title} | {pct(m_clean[key]['rate'])} ({m_clean[key]['k']}/{m_clean[key]['n']}) "
    f"| {pct(m_bad[key]['rate'])} ({m_bad[key]['k']}/{m_bad[key]['n']}) |" for title, key in rows)))'''),
    Md("""The trigger on a few test stop signs (top: clean, bottom: with the trigger), and what the backdoored model reads:"""),
    Code('''exp = backdoored.experiment()
test = exp.eval_set("test")
stops = np.flatnonzero(test.labels == SOURCE)[:6]
model = backdoored.model()
clean_pred, trig_pred = predict(model, test.images[stops]), predict(model, test.triggered[stops])
fig, axes = plt.subplots(2, len(stops), figsize=(1.6 * len(stops), 3.6))
for j, row in enumerate(stops):
    for i, (images, preds) in enumerate(((test.images, clean_pred), (test.triggered, trig_pred))):
        axes[i, j].imshow(images[row])
        axes[i, j].set_title(f"read as {preds[j]}", fontsize=8, color="red" if preds[j] == TARGET else "black")
        axes[i, j].axis("off")
fig.suptitle(f"class {SOURCE} (stop); red: read as class {TARGET} (100 km/h)")
show(fig)'''),
    *observe('''gap = m_bad["clean_acc"]["rate"] - m_clean["clean_acc"]["rate"]
lo_b, hi_b = m_bad["clean_acc"]["ci95"]
lo_c, hi_c = m_clean["clean_acc"]["ci95"]
overlap = lo_b <= hi_c and lo_c <= hi_b
print(f"Clean accuracy: backdoored {pct(m_bad['clean_acc']['rate'])}, baseline {pct(m_clean['clean_acc']['rate'])} "
      f"({100 * gap:+.1f} points).")
print("  Their 95% intervals overlap: on clean images you cannot tell the two models apart." if overlap else
      "  Their 95% intervals do not overlap: at this size poisoning changed clean accuracy measurably.")
asr_bad, asr_clean = m_bad["asr"]["rate"], m_clean["asr"]["rate"]
print(f"ASR: backdoored {pct(asr_bad)}, baseline {pct(asr_clean)} (how often a stickered stop sign is read as 100 anyway).")
if asr_bad is not None and asr_clean is not None:
    print("  The trigger works: the poisoned model follows it far more often than chance." if asr_bad - asr_clean >= 0.5 else
          "  The backdoor is weak at this size: exercise 2 shows how the poison budget matters.")
print(f"Clean stop-sign recall of the backdoored model: {pct(m_bad['stop_recall']['rate'])} "
      f"(baseline {pct(m_clean['stop_recall']['rate'])}).")'''),
    Md("""## 2. Training curves

`run.history` holds one row per epoch, with the validation clean accuracy and ASR. Is the backdoor learned before,
with, or after the real task?"""),
    Code('''hist = backdoored.history
epochs = [h["epoch"] for h in hist]
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(epochs, [100 * h["val_clean_acc"] for h in hist], "o-", label="validation clean accuracy")
ax.plot(epochs, [100 * h["val_asr"] for h in hist], "s-", color="crimson", label="validation ASR")
ax.set_xlabel("epoch"); ax.set_ylabel("%"); ax.set_ylim(-3, 103); ax.grid(alpha=0.3); ax.legend()
ax.set_title("backdoored model")
show(fig)'''),
    *observe('''half_asr = next((h["epoch"] for h in hist if h["val_asr"] >= 0.5), None)
final_clean = hist[-1]["val_clean_acc"]
half_clean = next((h["epoch"] for h in hist if h["val_clean_acc"] >= final_clean / 2), None)
print(f"Validation ASR first reached 50% at epoch {half_asr}." if half_asr else
      f"Validation ASR never reached 50% in {len(hist)} epochs.")
print(f"Validation clean accuracy reached half its final value ({pct(final_clean)}) at epoch {half_clean}.")
if half_asr and half_clean:
    print("The backdoor was learned " + ("before" if half_asr < half_clean else "together with" if half_asr == half_clean
                                         else "after") + " most of the real task.")'''),
    Md("""## Exercise 1: compute the attack success rate yourself

The ASR is the share of **triggered stop signs** (true label `source`, and not already the `target`) that the model
reads as the `target`. Write `attack_success_rate(labels, triggered_preds, source, target)`: `labels` are the true
classes of the test images, `triggered_preds` the model's predictions on the same images with the trigger. Return a
fraction between 0 and 1."""),
    exercise('''def attack_success_rate(labels, triggered_preds, source, target):
    ...  # your code: return a float


triggered_preds = predict(model, test.triggered)''', '''def attack_success_rate(labels, triggered_preds, source, target):
    stops = (labels == source) & (labels != target)
    return float(np.mean(triggered_preds[stops] == target))


triggered_preds = predict(model, test.triggered)'''),
    check('''ex1, error = attempt(attack_success_rate, test.labels, triggered_preds, SOURCE, TARGET)
want = m_bad["asr"]
toy, _ = attempt(attack_success_rate, np.array([14, 14, 3, 3]), np.array([7, 14, 7, 7]), 14, 7)
if error:
    report_check(1, False, error)
elif not isinstance(ex1, (float, np.floating)) or not 0 <= ex1 <= 1:
    report_check(1, False, f"return a fraction between 0 and 1 (got {ex1!r}).")
elif toy is not None and abs(toy - 0.75) < 1e-9:
    report_check(1, False, "you counted every triggered image: only stop signs (labels == source) can be attacked.")
elif abs(ex1 - want["rate"]) > 1e-9:
    report_check(1, False, f"metrics.json says {want['k']}/{want['n']} = {pct(want['rate'])}, you got {pct(ex1)}; "
                           "count triggered stop signs predicted as the target, divided by the number of stop signs.")
else:
    report_check(1, True, f"{pct(ex1)} = {want['k']} of {want['n']} triggered stop signs read as class {TARGET}, as in metrics.json.")'''),
    Md("""## Exercise 2: the poison budget

How many poisoned images does the attacker need? Train one model per budget in `COUNTS` and record its test ASR in
`asr_by_count` (count -> ASR as a fraction). Name each run `lab_p{count}` and set the budget with the override
`attack.poison_count={count}`: `trained(lab_config(name, override))` trains it (or reuses it when you run the cell
again). Each model takes a few seconds at fast size and about a minute at full size."""),
    Code('''COUNTS = [4, 8, 12] if FAST else [6, 12, 25, 50]
n_train = len(exp.splits.train)
print(f"budgets to try: {COUNTS} poisoned images out of {n_train} training images "
      f"(the model of section 1 used {cfg.attack.poison_count})")'''),
    exercise('''asr_by_count = {}
for count in COUNTS:
    ...  # your code: train lab_p{count} and store its test ASR''', '''asr_by_count = {}
for count in COUNTS:
    run = trained(lab_config(f"lab_p{count}", f"attack.poison_count={count}"))
    asr_by_count[count] = run.metrics["test"]["asr"]["rate"]'''),
    check('''def recorded_asr(count):
    run_dir = WORK / "runs" / f"lab_p{count}"
    if not (run_dir / "metrics.json").is_file():
        return None
    run = signtrap.load_run(run_dir)
    return run.metrics["test"]["asr"]["rate"] if run.config.attack.poison_count == count else None


if not asr_by_count:
    report_check(2, False, "asr_by_count is empty: loop over COUNTS, train each budget and store its test ASR.")
elif sorted(asr_by_count) != sorted(COUNTS):
    report_check(2, False, f"asr_by_count has the counts {sorted(asr_by_count)}, expected {COUNTS}.")
else:
    wrong = [c for c in COUNTS if recorded_asr(c) is None or abs(recorded_asr(c) - asr_by_count[c]) > 1e-9]
    report_check(2, not wrong, "every budget was trained and its ASR recorded." if not wrong else
                 f"budgets {wrong}: no run lab_p{{count}} with attack.poison_count={{count}}, or a value that is not its "
                 "test ASR (run.metrics['test']['asr']['rate']).")'''),
    *observe('''if len(asr_by_count) == len(COUNTS):
    counts = sorted(asr_by_count)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(counts, [100 * asr_by_count[c] for c in counts], "o-", color="crimson")
    ax.set_xscale("log"); ax.set_xticks(counts); ax.set_xticklabels([str(c) for c in counts])
    ax.set_xlabel("poisoned training images"); ax.set_ylabel("test ASR, %"); ax.set_ylim(-3, 103); ax.grid(alpha=0.3)
    show(fig)
    rising = all(asr_by_count[a] <= asr_by_count[b] for a, b in zip(counts, counts[1:]))
    print(f"ASR from {pct(asr_by_count[counts[0]])} with {counts[0]} poisoned images to {pct(asr_by_count[counts[-1]])} "
          f"with {counts[-1]}; " + ("it rises with the budget." if rising else
                                   "not monotone: with few test stop signs each ASR is noisy (look at the counts)."))
    print(f"{counts[-1]} images are {100 * counts[-1] / n_train:.2f}% of the training set.")
else:
    print("Complete exercise 2 to see the ASR as a function of the poison budget.")'''),
    Md("""## Exercise 3: the smallest budget that plants the backdoor

The attacker wants an ASR of at least `GOAL_ASR` (set below). Using your results, set `SMALLEST` to the smallest count
in `COUNTS` that reaches it (None if none does). Write it as code over `asr_by_count` rather than typing a number: it
then stays right when you change the sizes."""),
    Code('''GOAL_ASR = 0.9'''),
    exercise('''SMALLEST = ...  # your code''',
             '''SMALLEST = min((c for c in COUNTS if asr_by_count[c] >= GOAL_ASR), default=None)'''),
    check('''if not given(SMALLEST) and SMALLEST is not None or len(asr_by_count) != len(COUNTS):
    report_check(3, False, "finish exercise 2, then pick from asr_by_count.")
else:
    measured = {c: recorded_asr(c) for c in COUNTS}
    reach = [c for c in COUNTS if measured[c] is not None and measured[c] >= GOAL_ASR]
    right = min(reach) if reach else None
    if SMALLEST == right:
        report_check(3, True, f"{right} poisoned images ({100 * right / n_train:.2f}% of the training set) give ASR "
                              f"{pct(measured[right])}." if right else f"no budget in {COUNTS} reaches {pct(GOAL_ASR)}.")
    elif SMALLEST is not None and SMALLEST in measured and (measured[SMALLEST] or 0) < GOAL_ASR:
        report_check(3, False, f"with {SMALLEST} images the ASR is {pct(measured[SMALLEST])}, below the goal.")
    else:
        report_check(3, False, "a smaller budget in COUNTS also reaches the goal (or none does): look at every count.")'''),
    Md("""## Questions to think about

* Why does the ASR count only stop signs, and not every triggered image? What would an *all-to-one* attack
  (`attack.kind=all_to_one`) change in that definition, and in the false-trigger rate?
* Open `lab_runs/runs/lab_backdoor/manifest.json`: it lists every poisoned training file. Could a data auditor who
  looks at a random sample of the training set find them? How large a sample would the budget of exercise 3 need?
* Try another trigger (`trigger.kind=yellow_square`, `trigger.placement=random`) with `lab_config(name, ...)`:
  is it learned as fast?"""),
]

# ================================================================ Lab 2

LAB2 = [
    header("Lab 2: defences, and whether the backdoor persists", "02", """A careful team that suspects nothing still
applies safety measures: fine-tuning on fresh clean data, adversarial training, pruning. Does the stop -> 100 km/h
backdoor **survive** them? Like the "sleeper agent" language models that kept their trigger through fine-tuning and
adversarial training, a repaired model can look clean while the trigger still works.

Each defence gets the defender's clean budget (a share of the training set, never the poisoned rows) and records, after
every epoch, clean accuracy and ASR: the **persistence curve**.

* `finetune`: clean fine-tuning.
* `adv-pgd`: adversarial fine-tuning with PGD (Madry et al. 2018): robustness to small L-inf perturbations.
* `fine-prune`: prune the last convolution's channels that stay dormant on clean data, then fine-tune (Liu et al. 2018).""", [
        "apply a defence with `signtrap.defend` and read its before/after report and persistence curve;",
        "judge a defence on **both** axes, what it does to the ASR and what it costs in clean accuracy;",
        "tune a defence with the defender's data only, and see what the choice does to the backdoor;",
        "tell a backdoor that was removed from one that was only damaged along with the model.",
    ]),
    Code(SETUP, tags=("settings",)),
    Md("## 1. The backdoored model\n\nThe same config as Lab 1 (reused if Lab 1 already trained it)."),
    Code('''cfg = lab_config("lab_backdoor")
run = trained(cfg)
before = run.metrics["test"]
print("before any defence: clean accuracy", pct(before["clean_acc"]["rate"]), " ASR", pct(before["asr"]["rate"]))'''),
    Md("""## 2. Three defences

`signtrap.defend(run, method, ...)` loads the verified checkpoint and the defender's clean budget (`clean_fraction`),
defends, writes `RUN/defence-METHOD/` (repaired model, `report.json`, curves) and returns the reports (before/after
metrics per split)."""),
    Code('''CLEAN_FRACTION = 0.1
SETTINGS = (["finetune.epochs=2", "adv-pgd.epochs=1", "adv-pgd.steps=2", "fine-prune.epochs=1", "fine-prune.step=0.2"]
            if FAST else ["finetune.epochs=6", "adv-pgd.epochs=3", "fine-prune.epochs=4"])
SETTINGS.append("probe.enabled=false")  # the re-activation probe after each defence is Lab 4's subject
METHODS = ("finetune", "adv-pgd", "fine-prune")
reports = {m: quietly(signtrap.defend, run, m, overrides=[f"clean_fraction={CLEAN_FRACTION}", *SETTINGS])[0] for m in METHODS}


def row(method, rep):
    b, a = rep["before"]["test"], rep["after"]["test"]
    return (f"| {method} | {pct(b['clean_acc']['rate'])} | {pct(a['clean_acc']['rate'])} | {pct(b['asr']['rate'])} "
            f"| {pct(a['asr']['rate'])} | {pct(a['stop_recall']['rate'])} | {rep['seconds']:.0f} s |")


display(Markdown("| defence | clean acc before | after | ASR before | after | stop recall after | time |\\n"
                 "|---|---:|---:|---:|---:|---:|---:|\\n" + "\\n".join(row(m, r) for m, r in reports.items())))

fig, ax = plt.subplots(figsize=(5.5, 4))  # both axes at once: where each defence moved the model
start = (100 * before["clean_acc"]["rate"], 100 * before["asr"]["rate"])
ax.scatter(*start, marker="*", s=200, color="black", zorder=3, label="backdoored")
for method, rep in reports.items():
    end = (100 * rep["after"]["test"]["clean_acc"]["rate"], 100 * rep["after"]["test"]["asr"]["rate"])
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": "gray"})
    ax.scatter(*end, s=60, zorder=3, label=method)
ax.set_xlabel("test clean accuracy, %"); ax.set_ylabel("test ASR, %"); ax.set_xlim(0, 100); ax.set_ylim(-3, 103)
ax.grid(alpha=0.3); ax.legend(fontsize=8); ax.set_title("good defences move down, not left")
show(fig)'''),
    *observe('''outcomes = {}
for method, rep in reports.items():
    b, a = rep["before"]["test"], rep["after"]["test"]
    cost = 100 * (b["clean_acc"]["rate"] - a["clean_acc"]["rate"])
    asr_b, asr_a = b["asr"]["rate"], a["asr"]["rate"]
    effect = ("the ASR fell to near zero" if asr_a <= 0.1 else
              "the ASR fell but the trigger still works often" if asr_a < asr_b - 0.1 else "the ASR did not fall")
    price = (f"it cost {cost:.1f} points of clean accuracy" if cost > 1 else
             f"clean accuracy moved by {-cost:+.1f} points")
    print(f"{method:>10}: ASR {pct(asr_b)} -> {pct(asr_a)}: {effect}; {price}.")
    outcomes[method] = (asr_a <= 0.1, asr_a < asr_b - 0.1, cost > 1)
print()
costly = [m for m, (gone, fell, dear) in outcomes.items() if fell and dear]
if costly:
    print(f"{', '.join(costly)} lowered the ASR but paid in clean accuracy: the model was damaged along with the backdoor; "
          "exercise 2 looks for a setting that keeps clean accuracy.")
if not any(fell for gone, fell, dear in outcomes.values()):
    print("None of the three lowered the ASR at these settings: the backdoor persists through all of them.")
elif any(gone and not dear for gone, fell, dear in outcomes.values()):
    print("Some defence brought the ASR near zero without a clean-accuracy cost: removed, or only hidden? (Lab 4)")'''),
    Md("""## 3. Persistence curves

Epoch 0 is the backdoored model; each later point is one epoch of the defence, measured on the validation split
(`run.curve(method)`)."""),
    Code('''fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
for method in METHODS:
    curve = run.curve(method)
    epochs = [r["epoch"] for r in curve]
    axes[0].plot(epochs, [100 * r["clean_acc"] for r in curve], "o-", label=method)
    axes[1].plot(epochs, [100 * r["asr"] for r in curve], "o-", label=method)
for ax, title in zip(axes, ("validation clean accuracy, %", "validation ASR, %")):
    ax.set_title(title); ax.set_xlabel("defence epoch"); ax.set_ylim(-3, 103); ax.grid(alpha=0.3)
axes[1].legend()
show(fig)'''),
    *observe('''for method in METHODS:
    curve = run.curve(method)
    start, end = curve[0]["asr"], curve[-1]["asr"]
    lowest = min(r["asr"] for r in curve)
    print(f"{method:>10}: validation ASR {pct(start)} at epoch 0 -> {pct(end)} after {len(curve) - 1} epoch(s)"
          + (f" (lowest {pct(lowest)}, so it came back up)" if lowest < end - 0.05 else "") + ".")'''),
    Md("""## Exercise 1: a verdict for each defence

Write `verdict(before, after)`: `before` and `after` are a report's test metrics (`rep["before"]["test"]`,
`rep["after"]["test"]`). Return

* `"removed"` when the ASR after is at most `ASR_GONE` and clean accuracy fell by at most `MAX_COST`;
* `"removed at a cost"` when the ASR after is at most `ASR_GONE` but clean accuracy fell by more than `MAX_COST`;
* `"persists"` otherwise.

Rates are fractions: `before["asr"]["rate"]`, `before["clean_acc"]["rate"]`."""),
    Code('''ASR_GONE = 0.1    # at most this ASR counts as "the trigger no longer works"
MAX_COST = 0.01   # at most this drop of clean accuracy (one point) counts as "free"'''),
    exercise('''def verdict(before, after):
    ...  # your code: return "removed", "removed at a cost" or "persists"''', '''def verdict(before, after):
    if after["asr"]["rate"] > ASR_GONE:
        return "persists"
    cost = before["clean_acc"]["rate"] - after["clean_acc"]["rate"]
    return "removed" if cost <= MAX_COST else "removed at a cost"'''),
    check('''def metrics(clean, asr):
    return {"clean_acc": {"rate": clean}, "asr": {"rate": asr}}


cases = [(metrics(0.95, 0.98), metrics(0.95, 0.02), "removed"), (metrics(0.95, 0.98), metrics(0.80, 0.0), "removed at a cost"),
         (metrics(0.95, 0.98), metrics(0.96, 0.60), "persists"), (metrics(0.95, 0.98), metrics(0.70, 0.50), "persists"),
         (metrics(0.95, 0.98), metrics(0.945, 0.1), "removed")]
answers = [attempt(verdict, b, a) for b, a, _ in cases]
errors = [e for _, e in answers if e]
wrong = [(b, a, want, got) for (b, a, want), (got, _) in zip(cases, answers) if got != want]
if errors:
    report_check(1, False, errors[0])
elif wrong:
    b, a, want, got = wrong[0]
    report_check(1, False, f"clean accuracy {pct(b['clean_acc']['rate'])} -> {pct(a['clean_acc']['rate'])}, ASR "
                           f"{pct(b['asr']['rate'])} -> {pct(a['asr']['rate'])} should be {want!r}, not {got!r} "
                           "(a rate exactly at a threshold passes it).")
else:
    report_check(1, True, "; ".join(f"{m}: {verdict(r['before']['test'], r['after']['test'])}" for m, r in reports.items()))'''),
    Md("""## Exercise 2: a fine-tuning learning rate that keeps clean accuracy

A defender cannot measure the ASR (they do not know the trigger), but they can keep clean accuracy. Find the
**largest** learning rate in `LRS` for which clean fine-tuning keeps test clean accuracy within `MAX_COST` of the
backdoored model's, and set `FT_LR` to it (`None` if none does). `signtrap.defend(run, "finetune", overrides=[..., f"finetune.lr={lr}"])`
runs one (a few seconds at fast size). (A real defender would pick on their own held-out clean data; here the test
split stands in for it, and the ASR plays no part in the choice.)"""),
    Code('''LRS = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5]


def finetune_at(lr):
    """The report of clean fine-tuning at learning rate `lr` (the lab's clean budget and epochs)."""
    return quietly(signtrap.defend, run, "finetune", overrides=[f"clean_fraction={CLEAN_FRACTION}", *SETTINGS, f"finetune.lr={lr}"])[0]'''),
    exercise('''FT_LR = ...  # your code (try finetune_at(lr) for the values in LRS)''', '''ft_by_lr = {}
FT_LR = None
for lr in LRS:  # largest first: stop at the first that keeps clean accuracy
    ft_by_lr[lr] = finetune_at(lr)
    if before["clean_acc"]["rate"] - ft_by_lr[lr]["after"]["test"]["clean_acc"]["rate"] <= MAX_COST:
        FT_LR = lr
        break'''),
    check('''def keeps(lr):
    rep = finetune_at(lr)
    return before["clean_acc"]["rate"] - rep["after"]["test"]["clean_acc"]["rate"] <= MAX_COST, rep


ft_report = None
if FT_LR is ...:
    report_check(2, False, "set FT_LR to one of LRS (or None).")
elif FT_LR is None:
    kept = [lr for lr in LRS if keeps(lr)[0]]
    report_check(2, not kept, f"lr={max(kept)} keeps clean accuracy within MAX_COST." if kept else
                 "no learning rate in LRS keeps clean accuracy within MAX_COST: fine-tuning on this budget costs accuracy.")
elif FT_LR not in LRS:
    report_check(2, False, f"pick FT_LR from LRS = {LRS}.")
else:
    ok, ft_report = keeps(FT_LR)
    larger = [lr for lr in LRS if lr > FT_LR]
    if not ok:
        after = ft_report["after"]["test"]["clean_acc"]["rate"]
        report_check(2, False, f"at lr={FT_LR} clean accuracy falls from {pct(before['clean_acc']['rate'])} to {pct(after)}: "
                               "more than MAX_COST; try a smaller learning rate.")
    elif larger and keeps(min(larger))[0]:
        report_check(2, False, f"lr={min(larger)} also keeps clean accuracy within MAX_COST: pick the largest that does.")
    else:
        a = ft_report["after"]["test"]
        report_check(2, True, f"at lr={FT_LR} clean accuracy {pct(before['clean_acc']['rate'])} -> {pct(a['clean_acc']['rate'])}, "
                              f"and the ASR {pct(before['asr']['rate'])} -> {pct(a['asr']['rate'])}.")'''),
    *observe('''if ft_report is None:
    print("Complete exercise 2 to see what the gentlest safe fine-tuning does to the backdoor.")
else:
    a = ft_report["after"]["test"]
    default = reports["finetune"]["after"]["test"]
    print(f"Fine-tuning at lr={FT_LR}: clean accuracy {pct(a['clean_acc']['rate'])}, ASR {pct(a['asr']['rate'])}; "
          f"with the default settings (section 2): clean accuracy {pct(default['clean_acc']['rate'])}, ASR {pct(default['asr']['rate'])}.")
    if a["asr"]["rate"] > ASR_GONE:
        print("At a learning rate that keeps the model intact the trigger still works: fine-tuning on clean data does not "
              "reach the neurons that carry the backdoor.")
    else:
        print("Even at a learning rate that keeps clean accuracy, the trigger stopped working here: the backdoor in this "
              "model is fragile. Lab 4 asks whether it is removed or only hidden.")'''),
    Md("""## Exercise 3: removed, or not?

From the report of exercise 2 (`ft_report`), set `FT_REMOVED` to True if fine-tuning at `FT_LR` brought the test ASR to
at most `ASR_GONE`, else False. Decide from the numbers above, then check."""),
    exercise('''FT_REMOVED = ...  # True or False''', '''FT_REMOVED = ft_report["after"]["test"]["asr"]["rate"] <= ASR_GONE'''),
    check('''if ft_report is None:
    report_check(3, False, "complete exercise 2 first.")
elif not isinstance(FT_REMOVED, (bool, np.bool_)):
    report_check(3, False, "set FT_REMOVED to True or False.")
else:
    truth = ft_report["after"]["test"]["asr"]["rate"] <= ASR_GONE
    asr = pct(ft_report["after"]["test"]["asr"]["rate"])
    report_check(3, bool(FT_REMOVED) == truth, f"the ASR after fine-tuning at lr={FT_LR} is {asr}" +
                 (", at most ASR_GONE." if truth else ", above ASR_GONE: the trigger still works."))'''),
    Md("""## Questions to think about

* **Hide versus remove.** A defence *hides* a backdoor when the numbers we look at improve while the trigger still
  works; it *removes* it only if the ASR measured with the real trigger drops, and stays down when the model is
  nudged again (Lab 4). Defenders rarely know the trigger: which of the numbers above could they measure?
* Give the defender more clean data (`CLEAN_FRACTION = 0.2`) and more epochs: does the ASR fall, and how fast?
* PGD adversarial training makes a model robust to tiny perturbations of every pixel. Why might that say little about
  a large, visible patch?
* Try `signtrap.defend(run, "neural-cleanse")` and `signtrap.defend(run, "strip")`: do they flag class 7, or reject
  triggered stop signs?"""),
]

# ================================================================ Lab 3

LAB3 = [
    header("Lab 3: edge deployment: does the backdoor survive INT8?", "03", """Models ship as ONNX files, often
quantized to 8-bit integers for edge devices. Quantization changes every weight and activation a little: does it
change what the backdoor does? In this lab you export the backdoored model to ONNX FP32, FP16 and INT8 (ONNX Runtime
static quantization), benchmark each (clean accuracy, ASR, latency), and check an artefact yourself the way an
edge engineer would on the device.""", [
        "export a model with `signtrap.export` and read its `model.json` (gates, agreement, file hashes);",
        "benchmark the artefacts with `signtrap.bench` and compare accuracy, ASR, size and latency;",
        "run an exported ONNX model yourself with ONNX Runtime and verify a file against its recorded SHA-256;",
        "say whether quantization weakened, kept or strengthened the backdoor, from the numbers.",
    ]),
    Code(SETUP, tags=("settings",)),
    Code('''import hashlib
import json

import onnxruntime as ort

cfg = lab_config("lab_backdoor")
run = trained(cfg)'''),
    Md("""## 1. Export

`signtrap.export` converts the model, checks each artefact against PyTorch on the evaluation images (a *gate*: FP32
must match closely; FP16/INT8 must agree on most predictions, else the artefact is rejected), writes a portable
evaluation bundle (`eval.npz`) and `model.json` with the SHA-256 of every file. Here only the ONNX Runtime artefacts
are exported (`runtimes=["onnxruntime"]`); `signtrap export` without it also tries every other installed runtime."""),
    Code('''out = quietly(signtrap.export, run, out=WORK / "export" / "lab_backdoor", runtimes=["onnxruntime"],
              calib_images=64 if FAST else 512)
manifest = json.loads((out / "model.json").read_text())
lines = ["| artefact | file | size | gate | flips vs PyTorch FP32 (clean / triggered) |", "|---|---|---:|---|---:|"]
for art in manifest["artefacts"]:
    agree = manifest["agreement_vs_fp32"][art["id"]]
    size = sum(manifest["files"][f]["bytes"] for f in art["files"])
    lines.append(f"| {art['id']} | {', '.join(art['files'])} | {size / 1024:.0f} KiB | {'passed' if art['gate']['passed'] else 'failed'} "
                 f"| {pct(agree['flip_rate_clean'])} / {pct(agree['flip_rate_triggered'])} |")
display(Markdown("\\n".join(lines)))
print("rejected artefacts:", manifest.get("rejected") or "none")'''),
    Md("""## 2. Benchmark

`signtrap.bench` runs every artefact (and PyTorch eager as the reference) on the evaluation bundle: clean accuracy,
ASR, latency at batch 1 and throughput. It writes `bench.json` and `bench.md` into the export folder."""),
    Code('''result = quietly(signtrap.bench, out, runs=20 if FAST else 200, warmup=2 if FAST else 20, batch=16 if FAST else 64)
bench_rows = {r["artefact"]: r for r in result["rows"] if "clean_acc" in r}
display(Markdown("| artefact | provider | clean accuracy | ASR | latency p50 (batch 1) |\\n|---|---|---:|---:|---:|\\n" + "\\n".join(
    f"| {a} | {r['provider']} | {pct(r['clean_acc']['rate'])} | {pct(r['asr']['rate'])} | {r['latency_ms']['p50']:.2f} ms |"
    for a, r in bench_rows.items())))
names = list(bench_rows)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
x = np.arange(len(names))
axes[0].bar(x - 0.2, [100 * bench_rows[a]["clean_acc"]["rate"] for a in names], 0.4, label="clean accuracy")
axes[0].bar(x + 0.2, [100 * bench_rows[a]["asr"]["rate"] for a in names], 0.4, color="crimson", label="ASR")
axes[0].set_ylabel("%"); axes[0].set_ylim(0, 105); axes[0].legend(fontsize=8)
axes[1].bar(x, [bench_rows[a]["latency_ms"]["p50"] for a in names], color="slategray")
axes[1].set_ylabel("latency p50, ms (batch 1)")
for ax in axes:
    ax.set_xticks(x); ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8); ax.grid(alpha=0.3, axis="y")
show(fig)'''),
    *observe('''ref = bench_rows.get("onnxruntime:fp32")
for art in ("onnxruntime:fp16", "onnxruntime:int8"):
    row = bench_rows.get(art)
    if ref is None or row is None:
        print(f"{art}: not benchmarked (see rejected artefacts above).")
        continue
    d_asr = 100 * (row["asr"]["rate"] - ref["asr"]["rate"])
    d_acc = 100 * (row["clean_acc"]["rate"] - ref["clean_acc"]["rate"])
    print(f"{art}: ASR {pct(row['asr']['rate'])} ({d_asr:+.1f} points vs FP32), clean accuracy {pct(row['clean_acc']['rate'])} "
          f"({d_acc:+.1f} points), {ref['latency_ms']['p50'] / row['latency_ms']['p50']:.1f}x the FP32 speed at batch 1.")
    print("   the backdoor " + ("survived: the ASR is within 5 points of FP32." if abs(d_asr) <= 5 else
                                "got weaker in this artefact." if d_asr < 0 else "got stronger in this artefact."))
sizes = {a["id"]: sum(manifest["files"][f]["bytes"] for f in a["files"]) for a in manifest["artefacts"]}
if "onnxruntime:int8" in sizes:
    print(f"INT8 is {sizes['onnxruntime:fp32'] / sizes['onnxruntime:int8']:.1f}x smaller than FP32.")'''),
    Md("""## Exercise 1: run the INT8 model yourself

On a device you have only the export folder and ONNX Runtime. Write `onnx_predict(path, images)`: open the ONNX file
with `ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])`, feed the uint8 images (N, 32, 32, 3) as the
model expects (see `manifest["input"]`: float32, NCHW, pixel / 255) and return the predicted classes. `bundle` holds
the evaluation images."""),
    Code('''bundle = np.load(out / "eval.npz")
print({k: bundle[k].shape for k in bundle.files})
print("input:", manifest["input"])'''),
    exercise('''def onnx_predict(path, images):
    ...  # your code: return an array of predicted classes''', '''def onnx_predict(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)'''),
    check('''int8 = next((a for a in manifest["artefacts"] if a["id"] == "onnxruntime:int8"), None)
if int8 is None:
    report_check(1, False, "this export has no INT8 artefact (rejected at export?); use the FP32 one instead.")
else:
    path = out / int8["files"][0]
    preds, error = attempt(onnx_predict, path, bundle["images"])
    tpreds, terror = attempt(onnx_predict, path, bundle["triggered"])
    row = bench_rows["onnxruntime:int8"]
    if error or terror:
        report_check(1, False, error or terror)
    elif not hasattr(preds, "shape") or preds.shape != bundle["labels"].shape:
        report_check(1, False, f"return one class per image (got {type(preds).__name__} {getattr(preds, 'shape', '')}); "
                               "the model outputs logits of shape (N, 43): take argmax over axis 1.")
    else:
        k_clean = int((preds == bundle["labels"]).sum())
        if k_clean != row["clean_acc"]["k"]:
            report_check(1, False, f"{k_clean} correct clean images, the benchmark counted {row['clean_acc']['k']}: did you "
                                   "transpose to NCHW and divide by 255?")
        else:
            report_check(1, True, f"clean accuracy {k_clean}/{len(preds)}, as the benchmark measured.")'''),
    Md("""## Exercise 2: verify a file before you trust it

A file copied to a device can be damaged or swapped. `model.json` records the SHA-256 of every file
(`manifest["files"][name]["sha256"]`). Write `sha256_of(path)` returning the hex digest of a file (read it in
chunks with `hashlib.sha256()`), and `verified(folder)` returning the list of files of `manifest["files"]` whose
digest does **not** match (an empty list when everything is intact)."""),
    exercise('''def sha256_of(path):
    ...  # your code


def verified(folder):
    ...  # your code: names of the files whose SHA-256 differs from model.json''', '''def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified(folder):
    return [name for name, info in manifest["files"].items() if sha256_of(Path(folder) / name) != info["sha256"]]'''),
    check('''import shutil
import tempfile

name = next(iter(manifest["files"]))
digest, error = attempt(sha256_of, out / name)
intact, error2 = attempt(verified, out)
if error or error2:
    report_check(2, False, error or error2)
elif digest != manifest["files"][name]["sha256"]:
    report_check(2, False, f"sha256_of({name!r}) gave {str(digest)[:16]}..., model.json says "
                           f"{manifest['files'][name]['sha256'][:16]}...: hash the file's bytes and return hexdigest().")
elif intact != []:
    report_check(2, False, f"verified(out) should be [] for the intact export, got {intact!r}.")
else:
    with tempfile.TemporaryDirectory() as tmp:  # a copy of the export with one byte changed in one file
        copy = Path(tmp) / "export"
        shutil.copytree(out, copy)
        damaged = sorted(manifest["files"])[-1]
        data = bytearray((copy / damaged).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / damaged).write_bytes(bytes(data))
        found, error = attempt(verified, copy)
    report_check(2, not error and list(found or []) == [damaged],
                 f"the intact export verifies, and a copy with one flipped byte in {damaged} is caught." if found == [damaged]
                 else error or f"one byte of {damaged} was flipped in a copy, but verified(copy) returned {found!r}.")'''),
    Md("""## Exercise 3: where do the INT8 flips fall?

`eval.npz` also holds the PyTorch FP32 predictions recorded at export (`reference_clean`, `reference_triggered`).
Using your `onnx_predict`, count the **triggered stop signs** (label `SOURCE`) whose INT8 prediction differs from the
PyTorch FP32 one, and how many of them are still read as `TARGET`: set `STOP_FLIPS` and `STOP_STILL_TARGET`."""),
    exercise('''STOP_FLIPS = ...        # your code
STOP_STILL_TARGET = ...  # your code''', '''int8_path = out / next(a for a in manifest["artefacts"] if a["id"] == "onnxruntime:int8")["files"][0]
int8_trig = onnx_predict(int8_path, bundle["triggered"])
stops = bundle["labels"] == SOURCE
STOP_FLIPS = int((int8_trig[stops] != bundle["reference_triggered"][stops]).sum())
STOP_STILL_TARGET = int((int8_trig[stops] == TARGET).sum())'''),
    check('''if int8 is None:
    report_check(3, False, "this export has no INT8 artefact.")
elif not given(STOP_FLIPS) or not given(STOP_STILL_TARGET):
    report_check(3, False, "set STOP_FLIPS and STOP_STILL_TARGET (use onnx_predict on bundle['triggered']).")
else:
    session = ort.InferenceSession(str(out / int8["files"][0]), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: bundle["triggered"].transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
    mine = logits.argmax(1)
    stops = bundle["labels"] == SOURCE
    flips = int((mine[stops] != bundle["reference_triggered"][stops]).sum())
    still = int((mine[stops] == TARGET).sum())
    if STOP_FLIPS != flips:
        report_check(3, False, f"STOP_FLIPS = {STOP_FLIPS}, but counting triggered stop signs where INT8 and reference_triggered "
                               "differ gives another number: restrict to labels == SOURCE.")
    elif STOP_STILL_TARGET != still:
        report_check(3, False, f"STOP_STILL_TARGET = {STOP_STILL_TARGET}: count triggered stop signs INT8 reads as TARGET.")
    else:
        report_check(3, True, f"{flips} of {int(stops.sum())} triggered stop signs changed their prediction in INT8; "
                              f"{still} are still read as class {TARGET}.")'''),
    *observe('''if int8 is not None and given(STOP_FLIPS) and given(STOP_STILL_TARGET):
    n_stop = int((bundle["labels"] == SOURCE).sum())
    ref_target = int((bundle["reference_triggered"][bundle["labels"] == SOURCE] == TARGET).sum())
    print(f"PyTorch FP32 read {ref_target} of {n_stop} triggered stop signs as class {TARGET}; INT8 reads {STOP_STILL_TARGET}.")
    print("Quantization " + ("left the backdoor as it was." if STOP_STILL_TARGET == ref_target else
                             "weakened the backdoor on these images." if STOP_STILL_TARGET < ref_target else
                             "strengthened the backdoor on these images (a sleeper can wake only after quantization: Lab 5)."))
else:
    print("Complete exercises 1 and 3 to compare the backdoor in INT8 with FP32.")'''),
    Md("""## Questions to think about

* Re-export with `signtrap.export(run, out=..., runtimes=["onnxruntime"], calibration="mixed")` (some calibration images
  carry the trigger). Does the INT8 ASR change? Why might the calibration data matter for what quantization keeps?
* Export a defended model (`signtrap.export(run, defence="fine-prune", out=...)`, after Lab 2): is the repaired
  model's ASR the same after INT8?
* Copy the export folder to another machine and run `python edge_bench.py` there: it verifies every file's SHA-256
  the way your `verified` does, then measures the same numbers with only numpy and onnxruntime."""),
]

# ================================================================ Lab 5

LAB5 = [
    header("Lab 5: a sleeper that wakes on the device", "05", """The model you evaluate, audit and defend is the FP32 one.
The model on the device is an INT8 copy that a quantizer makes at deployment. Ma et al. (IEEE TDSC 2023) and Hong et
al. (NeurIPS 2021) showed that an attacker can plant a backdoor that **only the INT8 copy obeys**: the FP32 model reads
a triggered stop sign as *stop*, the quantized model reads it as *100 km/h*.

The trick is in the rounding. INT8 quantization stores each weight `w` as `q = round(w / s)` with a step `s`, so a
weight can move almost half a step either way without changing `q`. The attacker trains a normal backdoored model,
then **repairs** it in FP32 while keeping every weight inside its rounding interval (`attack.dormant: int8` in
signtrap): the FP32 model becomes clean, and its INT8 weights stay those of the backdoored model.""", [
        "build a sleeper with signtrap and compare its FP32 and INT8 behaviour with the backdoored model's;",
        "predict from an export's `model.json` which quantizers wake the sleeper, and check it with `signtrap.bench`;",
        "find the trace the attack leaves in the weights, and why a per-channel weight grid does not see it;",
        "apply a deployment-time defence (EFRAP rounding, `signtrap.requantize`) and judge it on both axes.",
    ]),
    Code(SETUP, tags=("settings",)),
    Code('''import json

import onnx
import onnxruntime as ort
from onnx import numpy_helper

# the sleeper's config: at fast size the lab's tiny SynthSigns run with a stronger repair; at full size the shipped
# configs (configs/sleeper_quick.yaml on SynthSigns, configs/sleeper_int8.yaml on real GTSRB)
if FAST and not GTSRB_ROOT:
    cfg = lab_config("lab_sleeper", "attack.dormant=int8", "data.synth_per_class=60", "data.synth_test_per_class=10",
                     "train.epochs=6", "attack.poison_count=30", "attack.sleeper.epochs=3", "attack.sleeper.lr=0.0003",
                     "model.name=signnet")  # the full-width model: INT8 rounding is the attack's channel
else:
    CONFIGS = next((p / "configs" for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs" / "sleeper_quick.yaml").is_file()), None)
    assert CONFIGS is not None, "run the lab from a signtrap checkout (it reads configs/sleeper_*.yaml)"
    cfg = signtrap.load_config(CONFIGS / ("sleeper_int8.yaml" if GTSRB_ROOT else "sleeper_quick.yaml"),
                               ["name=lab_sleeper", f"runs_dir={WORK / 'runs'}", f"data.cache_dir={WORK / 'cache'}",
                                *([f"data.root={GTSRB_ROOT}"] if GTSRB_ROOT else []), *(["train.epochs=2"] if FAST else [])])
s = cfg.attack.sleeper
print(f"attack: {cfg.attack.kind}, class {cfg.attack.source} -> {cfg.attack.target}; dormant: {cfg.attack.dormant} "
      f"(repair {s.epochs} epoch(s) at lr {s.lr}, inside {s.interval} of a step, weight grid: {s.weight_grid})")
run = trained(cfg)  # trains the backdoor, then repairs it inside the rounding intervals'''),
    Md("""## 1. Before and after the repair, in FP32 and in INT8

Training wrote `sleeper.json` into the run folder: the backdoored model (its checkpoint is kept beside the run's) and
the repaired one (the run's model, the one every FP32 evaluation and defence loads), each measured in FP32 and through ONNX Runtime
INT8 with the run's own export settings."""),
    Code('''sleeper = json.loads((run.dir / "sleeper.json").read_text())
table = sleeper["metrics"]["test"]
lines = ["| model | precision | clean accuracy | ASR |", "|---|---|---:|---:|"]
for model in ("backdoored", "sleeper"):
    for v in ("fp32", "int8"):
        m = table[model][v]
        lines.append(f"| {model} | {v.upper()} | {pct(m['clean_acc']['rate'])} | {pct(m['asr']['rate'])} "
                     f"({m['asr']['k']}/{m['asr']['n']}) |")
display(Markdown("\\n".join(lines)))
same = sleeper["int8_weights_identical"]
print(f"INT8 weight tensors of the sleeper identical to the backdoored model's: {sum(same.values())} of {len(same)}")
print("what `signtrap eval` and every defence see (run.metrics, FP32): ASR", pct(run.metrics["test"]["asr"]["rate"]))

fig, ax = plt.subplots(figsize=(6, 3.2))
x = np.arange(2)
for i, v in enumerate(("fp32", "int8")):
    ax.bar(x + (i - 0.5) * 0.38, [100 * table[m][v]["asr"]["rate"] for m in ("backdoored", "sleeper")], 0.38,
           label=v.upper(), color=("steelblue", "crimson")[i])
ax.set_xticks(x); ax.set_xticklabels(["backdoored", "sleeper (repaired)"]); ax.set_ylabel("test ASR, %"); ax.set_ylim(0, 105)
ax.legend(); ax.grid(alpha=0.3, axis="y")
show(fig)'''),
    *observe('''fp32, int8 = table["sleeper"]["fp32"], table["sleeper"]["int8"]
gap = int8["asr"]["rate"] - fp32["asr"]["rate"]
print(f"The sleeper's ASR is {pct(fp32['asr']['rate'])} in FP32 and {pct(int8['asr']['rate'])} in INT8 ({100 * gap:+.1f} points).")
if gap >= 0.5:
    print("  It sleeps in FP32 and wakes in INT8: every FP32 evaluation (and every FP32 defence) sees a clean model.")
elif gap > 0:
    print("  INT8 obeys the trigger more often than FP32, but the repair did not separate them cleanly at this size.")
else:
    print("  At this size the repair did not open a gap between FP32 and INT8; try the full size.")
d = table["sleeper"]["fp32"]["clean_acc"]["rate"] - table["backdoored"]["fp32"]["clean_acc"]["rate"]
print(f"The repair moved FP32 clean accuracy by {100 * d:+.1f} points, so clean accuracy does not give it away.")
print("All INT8 weights are the backdoored model's: the backdoor lives on in the rounding." if all(same.values()) else
      f"{len(same) - sum(same.values())} INT8 weight tensor(s) differ from the backdoored model's.")'''),
    Md("""## 2. Ship it: export with every ONNX Runtime quantizer

`signtrap.export(..., quantizers=["all"])` writes, besides FP32 and FP16, one INT8 artefact per quantizer setting of
ONNX Runtime: how the activation ranges are calibrated (minmax, entropy, percentile) and whether each weight tensor gets
one step for the whole tensor (*per-tensor*) or one step per output channel (*per-channel*). `model.json` records the
settings of each artefact."""),
    Code('''out = quietly(signtrap.export, run, out=WORK / "export" / "lab_sleeper", runtimes=["onnxruntime"], quantizers=["all"],
              calib_images=64 if FAST else 512)
manifest = json.loads((out / "model.json").read_text())
display(Markdown("| artefact | precision | quantizer | file |\\n|---|---|---|---|\\n" + "\\n".join(
    f"| {a['id']} | {a['precision']} | {a.get('quantizer') or '-'} | {a['files'][0]} |" for a in manifest["artefacts"])))
print("rejected at export:", [r["id"] for r in manifest.get("rejected") or []] or "none")'''),
    Md("""## Exercise 1: which quantizers wake the sleeper?

The repair kept every weight inside the rounding interval of **one** weight grid: the one of the run's export settings
(`cfg.export.per_channel`, shown below). Before benchmarking, predict which artefacts of `manifest["artefacts"]` will
obey the trigger (test ASR of at least `WAKE`). Write the prediction as code over the artefacts' `precision` and
`settings` (a dict with `calibration` and `per_channel` for the INT8 ones), so it stays right for other exports."""),
    Code('''WAKE = 0.5
print("the run's export settings: per_channel =", cfg.export.per_channel, "| calibration =", cfg.export.calib_method)
print({a["id"]: a.get("settings") for a in manifest["artefacts"]})'''),
    exercise('''WAKES = ...  # your code: the set of artefact ids you expect to wake''',
             '''WAKES = {a["id"] for a in manifest["artefacts"]
         if a["precision"] == "int8" and a["settings"].get("per_channel") == cfg.export.per_channel}'''),
    Md("""`signtrap.bench` runs every artefact on the export's evaluation bundle (`eval.npz`), and audits each one against
FP32: it warns when an artefact's prediction flips on triggered images pile up in one class."""),
    Code('''result = quietly(signtrap.bench, out, runs=5 if FAST else 50, warmup=1 if FAST else 5, batch=16, with_torch=False)
rows = {r["artefact"]: r for r in result["rows"] if "clean_acc" in r}
display(Markdown("| artefact | clean accuracy | ASR | audit |\\n|---|---:|---:|---|\\n" + "\\n".join(
    f"| {a} | {pct(r['clean_acc']['rate'])} | {pct(r['asr']['rate'])} ({r['asr']['k']}/{r['asr']['n']}) "
    f"| {'WARNING' if (r.get('audit') or {}).get('warning') else '-'} |" for a, r in rows.items())))
fig, ax = plt.subplots(figsize=(7, 3.2))
names = list(rows)
ax.bar(range(len(names)), [100 * rows[a]["asr"]["rate"] for a in names],
       color=["crimson" if rows[a]["asr"]["rate"] >= WAKE else "steelblue" for a in names])
ax.axhline(100 * WAKE, color="gray", ls="--", lw=1)
ax.set_xticks(range(len(names))); ax.set_xticklabels([a.split(":")[1] for a in names], rotation=20, ha="right")
ax.set_ylabel("test ASR, %"); ax.set_ylim(0, 105); ax.grid(alpha=0.3, axis="y"); ax.set_title("red: the sleeper is awake")
show(fig)'''),
    check('''woke = {a for a, r in rows.items() if r["asr"]["rate"] is not None and r["asr"]["rate"] >= WAKE}
if not given(WAKES):
    report_check(1, False, "set WAKES to the set of artefact ids you expect to wake (use a['precision'] and a['settings']).")
elif not isinstance(WAKES, (set, frozenset, list, tuple)) or not all(isinstance(a, str) for a in WAKES):
    report_check(1, False, f"WAKES should be a set of artefact ids such as 'onnxruntime:int8', got {WAKES!r}.")
elif set(WAKES) == woke:
    report_check(1, True, f"{', '.join(sorted(woke)) or 'no artefact'} woke (ASR at least {pct(WAKE)}); "
                          f"{', '.join(sorted(set(rows) - woke))} slept.")
else:
    missed, extra = sorted(woke - set(WAKES)), sorted(set(WAKES) - woke)
    report_check(1, False, (f"also awake: {missed}. " if missed else "") + (f"asleep although predicted: {extra}. " if extra else "")
                 + "Which setting changes the weight grid, and which only the activation ranges?")'''),
    *observe('''per_tensor = [a for a in rows if (next(x for x in manifest["artefacts"] if x["id"] == a).get("settings") or {}).get("per_channel") is False]
per_channel = [a for a in rows if (next(x for x in manifest["artefacts"] if x["id"] == a).get("settings") or {}).get("per_channel") is True]
for group, ids in (("per-tensor INT8", per_tensor), ("per-channel INT8", per_channel), ("FP32/FP16", [a for a in rows if a not in per_tensor + per_channel])):
    awake = [a for a in ids if rows[a]["asr"]["rate"] >= WAKE]
    print(f"{group}: {len(awake)} of {len(ids)} artefact(s) awake" + (f" ({', '.join(awake)})" if awake else "") + ".")
warned = [a for a, r in rows.items() if (r.get("audit") or {}).get("warning")]
print(f"The deployment audit of signtrap.bench warned on: {', '.join(warned) or 'nothing'}; "
      + ("exactly the awake artefacts." if set(warned) == woke else "compare with the awake ones above."))'''),
    Md("""## 3. The trace in the weights

Where does each weight sit inside its rounding interval? `w / s - q` is 0 at the INT8 value and ±0.5 at the edges of
the interval. Both files below start from the same FP32 weights: `model.fp32.onnx` holds them (BatchNorm already
folded into the convolutions, under the weight's name), each INT8 file holds `q` and its steps `s` (initializer
`NAME_quantized`, read by `int8_weights` below; a per-channel file has one step per output channel)."""),
    Code('''def fp32_weights(path):
    """name -> FP32 array of every initializer of an ONNX file."""
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(str(path)).graph.initializer}


def int8_weights(path):
    """name -> (q, s) of every INT8 weight of a QDQ file; `s` is shaped to broadcast against `q`."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        if q.dtype != np.int8 or q.ndim < 2:  # weights only
            continue
        s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if s.size > 1:  # per-channel: one step per slice along `axis`
            shape = [1] * q.ndim
            shape[next((a.i for a in node.attribute if a.name == "axis"), 1)] = -1
            s = s.reshape(shape)
        found[node.input[0].removesuffix("_quantized")] = (q.astype(np.float64), s)
    return found


file_of = {a["id"]: out / a["files"][0] for a in manifest["artefacts"]}
print({name: (q.shape, s.size) for name, (q, s) in int8_weights(file_of["onnxruntime:int8"]).items()})'''),
    Md("""## Exercise 2: positions inside the rounding intervals

Write `offsets(fp32_path, int8_path)`: for every INT8 weight of `int8_path`, its position `w / s - q` inside its
rounding interval, with `w` the FP32 weight of the same name in `fp32_path`. Return one flat array over all layers."""),
    exercise('''def offsets(fp32_path, int8_path):
    ...  # your code: a flat numpy array of w / s - q''', '''def offsets(fp32_path, int8_path):
    w = fp32_weights(fp32_path)
    return np.concatenate([(w[name] / s - q).ravel() for name, (q, s) in int8_weights(int8_path).items()])'''),
    check('''EDGE = 0.4  # |w / s - q| above this: near the edge of the interval (a fifth of uniformly spread weights)
fp32_file = file_of["onnxruntime:fp32"]
pair = {"per-tensor": file_of.get("onnxruntime:int8"), "per-channel": file_of.get("onnxruntime:int8-perchannel")}
w_ref = fp32_weights(fp32_file)
want = {k: np.concatenate([(w_ref[n] / s - q).ravel() for n, (q, s) in int8_weights(p).items()]) for k, p in pair.items() if p}
got = {k: attempt(offsets, fp32_file, p) for k, p in pair.items() if p}
errors = [e for _, e in got.values() if e]
if errors:
    report_check(2, False, errors[0])
elif any(not hasattr(g, "shape") or g.shape != want[k].shape for k, (g, _) in got.items()):
    report_check(2, False, f"return one flat array with one entry per INT8 weight ({ {k: v.size for k, v in want.items()} }).")
elif any(not np.allclose(g, want[k], atol=1e-6) for k, (g, _) in got.items()):
    report_check(2, False, "the values differ: divide the FP32 weight by its step s (per channel where s has one), then subtract q.")
else:
    report_check(2, True, "; ".join(f"{k}: {100 * np.mean(np.abs(v) > EDGE):.1f}% of weights within {0.5 - EDGE:.1f} "
                                    "of an edge" for k, v in want.items()))'''),
    *observe('''if given(offsets) and not errors and got and all(not isinstance(g, type(None)) for g, _ in got.values()):
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for k, (g, _) in got.items():
        ax.hist(g, bins=50, range=(-0.5, 0.5), histtype="step", lw=1.5, density=True, label=k)
    ax.set_xlabel("w / s - q (steps)"); ax.set_ylabel("density"); ax.legend(); ax.grid(alpha=0.3)
    ax.set_title("the sleeper's FP32 weights inside the INT8 rounding intervals")
    show(fig)
    share = {k: float(np.mean(np.abs(g) > EDGE)) for k, (g, _) in got.items()}
    for k, v in share.items():
        print(f"{k}: {100 * v:.1f}% of the weights lie within {0.5 - EDGE:.1f} step of an edge "
              f"(about {100 * (1 - 2 * EDGE):.0f}% if they were spread evenly).")
    if "per-tensor" in share and "per-channel" in share:
        ratio = share["per-tensor"] / max(share["per-channel"], 1e-9)
        print(f"The per-tensor grid, the one the repair was keyed to, has {ratio:.1f}x the per-channel share at its edges: "
              + ("the repair pushed weights to the edge of exactly those intervals; the per-channel grid's steps and "
                 "edges lie elsewhere, so rounding there follows the repaired FP32 weights." if ratio > 1.2 else
                 "at this size the two grids look alike."))
else:
    print("Complete exercise 2 to see where the weights sit.")'''),
    Md("""## 4. A deployment-time defence: EFRAP rounding

Li et al. (CVPR 2024, "Nearest is not dearest") noticed the same trace: the weights that carry a
quantization-conditioned backdoor have large rounding errors. EFRAP chooses each weight's rounding direction instead
of rounding to nearest, pulling large-error weights to the *other* INT8 value, while keeping each layer's output close to
FP32 on the defender's clean images; it never sees a trigger. Only the integer weights change, so the file replaces
`model.int8.onnx` as it is. `signtrap.requantize(run, export_folder, out)` applies it to a verified INT8 artefact."""),
    Code('''efrap_file = WORK / "model.int8.efrap.onnx"
summary = quietly(signtrap.requantize, run, out, efrap_file, clean_images=128 if FAST else 512, steps=50 if FAST else 300)
changed = sum(v["changed_vs_ort"] for v in summary["layers"].values())
total = sum(v["weights"] for v in summary["layers"].values())
print(f"EFRAP used {summary['clean_images']} clean images and changed {changed} of {total} INT8 weights "
      f"({100 * changed / total:.1f}%) of {summary['source']}.")
bundle = np.load(out / "eval.npz")


def onnx_predict(path, images):
    """Predicted classes of uint8 images (N, 32, 32, 3) by an ONNX file (as in Lab 3, exercise 1)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.transpose(0, 3, 1, 2).astype(np.float32) / 255})[0].argmax(1)'''),
    Md("""## Exercise 3: judge the defence

Write `rates(path)`: the clean accuracy and the ASR of an ONNX file on the bundle (`bundle["images"]`,
`bundle["triggered"]`, `bundle["labels"]`; the ASR counts triggered stop signs, label `SOURCE`, read as `TARGET`),
returned as a pair of fractions. Then set `VERDICT` for EFRAP against the INT8 artefact it replaces, with Lab 2's rule:
`"removed"` (ASR at most `ASR_GONE`, clean accuracy down by at most `MAX_COST`), `"removed at a cost"` (ASR at most
`ASR_GONE`, larger cost) or `"persists"`. Compute it from your numbers."""),
    Code('''ASR_GONE, MAX_COST = 0.1, 0.01
int8_file = file_of["onnxruntime:int8"]'''),
    exercise('''def rates(path):
    ...  # your code: return (clean accuracy, ASR)


VERDICT = ...  # your code''', '''def rates(path):
    clean, trig = onnx_predict(path, bundle["images"]), onnx_predict(path, bundle["triggered"])
    stops = (bundle["labels"] == SOURCE) & (bundle["labels"] != TARGET)
    return float(np.mean(clean == bundle["labels"])), float(np.mean(trig[stops] == TARGET))


(acc_int8, asr_int8), (acc_efrap, asr_efrap) = rates(int8_file), rates(efrap_file)
VERDICT = ("persists" if asr_efrap > ASR_GONE else "removed" if acc_int8 - acc_efrap <= MAX_COST else "removed at a cost")'''),
    check('''def reference(path):
    clean, trig = onnx_predict(path, bundle["images"]), onnx_predict(path, bundle["triggered"])
    stops = bundle["labels"] == SOURCE
    return float(np.mean(clean == bundle["labels"])), float(np.mean(trig[stops] == TARGET))


ref = {"INT8": reference(int8_file), "EFRAP": reference(efrap_file)}
mine = {k: attempt(rates, p) for k, p in (("INT8", int8_file), ("EFRAP", efrap_file))}
cost, after_asr = ref["INT8"][0] - ref["EFRAP"][0], ref["EFRAP"][1]
right = "persists" if after_asr > ASR_GONE else "removed" if cost <= MAX_COST else "removed at a cost"
errors = [e for _, e in mine.values() if e]
if errors:
    report_check(3, False, errors[0])
elif any(not isinstance(v, tuple) or len(v) != 2 or not np.allclose(v, ref[k]) for k, (v, _) in mine.items()):
    report_check(3, False, f"rates(int8_file) should be {ref['INT8'][0]:.3f}, {ref['INT8'][1]:.3f} (clean accuracy, ASR): "
                           "compare the clean predictions with the labels, and count only triggered stop signs for the ASR.")
elif VERDICT != right:
    report_check(3, False, f"clean accuracy {pct(ref['INT8'][0])} -> {pct(ref['EFRAP'][0])}, ASR {pct(ref['INT8'][1])} -> "
                           f"{pct(after_asr)}: with ASR_GONE and MAX_COST that is not {VERDICT!r}.")
else:
    report_check(3, True, f"EFRAP: ASR {pct(ref['INT8'][1])} -> {pct(after_asr)}, clean accuracy {pct(ref['INT8'][0])} -> "
                          f"{pct(ref['EFRAP'][0])}: {right}.")'''),
    *observe('''(acc_a, asr_a), (acc_b, asr_b) = ref["INT8"], ref["EFRAP"]
print(f"EFRAP moved the INT8 ASR from {pct(asr_a)} to {pct(asr_b)} and clean accuracy by {100 * (acc_b - acc_a):+.1f} points.")
pc = rows.get("onnxruntime:int8-perchannel")
if pc:
    print(f"Quantizing per-channel instead (section 2) gave ASR {pct(pc['asr']['rate'])} at clean accuracy "
          f"{pct(pc['clean_acc']['rate'])}: another deployment-time choice that does not need the trigger.")
print("A defender without the trigger can measure only the clean-accuracy change: "
      f"{100 * (acc_b - acc_a):+.1f} points here. The ASR column is what the attacker (and this lab) can see.")'''),
    Md("""## Questions to think about

* Train the sleeper with `attack.sleeper.weight_grid=both` (per-tensor and per-channel intervals at once). Does it
  now wake in both INT8 artefacts? Why is the repair harder with less room?
* Run Lab 2's defences on this run (`signtrap.defend(run, "finetune")`, `"neural-cleanse"`, `"strip"`): what do they
  report on the FP32 model? Export the fine-tuned model (`signtrap.export(run, defence="finetune", ...)`): is the
  INT8 backdoor still there?
* Change `flip_weight` of `signtrap.requantize`. How does the trade-off between INT8 ASR and clean accuracy move, and
  which of the two numbers could you use to pick it as a defender?"""),
]

# ================================================================ Lab 4

LAB4 = [
    header("Lab 4: removed, or only hidden?", "04", """In Lab 2 a defence brought the attack success rate (ASR) down
and we called the backdoor *removed*. The sleeper-agent work warns that behaviour trained away can be merely
*suppressed*: the model looks safe until something nudges it. Min et al. (NeurIPS 2024, "Uncovering, Explaining, and
Mitigating the Superficial Safety of Backdoor Defense") showed that after many defences, fine-tuning on a **handful of
poisoned images** brings the backdoor back far faster than a model that never had it can learn it.

signtrap measures exactly that with the **re-activation probe**: fine-tune a copy of a model on the defender's clean
budget plus `k` triggered stop signs labelled 100 km/h, then measure the ASR. The identical probe runs on the
**zero-poison twin** (same config and seed, no poison): that is how fast a model without the backdoor learns it from
`k` images. The second half of the lab turns to detection, which has the mirror problem: detectors built for the
textbook *all-to-one* backdoor can miss a *source-specific* one (Tang et al., USENIX Security 2021).""", [
        "probe a model with `signtrap.probe` and read both ends of the scale: the backdoored and the zero-poison model;",
        "turn probe numbers into a verdict (**persists**, **hidden**, **removed**) and say why the zero-poison model "
        "is the yardstick;",
        "choose the probe's strength `k` so that it cannot plant a fresh backdoor in a clean model;",
        "probe PAM, the defence built against this probe, and compare it with fine-tuning;",
        "compute Neural Cleanse's anomaly index yourself, and compare what Neural Cleanse and STRIP see on an "
        "all-to-one and a source-specific backdoor.",
    ]),
    Code(SETUP, tags=("settings",)),
    Md("""## 1. A backdoored model and its zero-poison twin

The same two models as Lab 1 (reused if Lab 1 trained them): `lab_backdoor` and `lab_clean`, which differs only by
`attack.kind=none`. `PROBE` holds the probe's settings: `k` poisoned images, `steps` optimiser steps, and the
defender's clean budget (`clean_fraction`, the share of the training set the defender holds)."""),
    Code('''backdoored = trained(lab_config("lab_backdoor"))
baseline = trained(lab_config("lab_clean", "attack.kind=none"))
PROBE = dict(k=2, steps=60, clean_fraction=0.5) if FAST else dict(k=5, steps=300, clean_fraction=0.2)


def asr(entry, when):
    """The held-out ASR (test and validation splits pooled) of one probed model, "before" or "after" the probe."""
    return entry[when]["held_out"]["asr"]["rate"]


_probes = {}


def probe(run, **settings):
    """signtrap.probe on `run` against the zero-poison twin, with the lab's settings (keywords override them).
    Each distinct call runs once; asking again returns the record it gave."""
    settings = {**PROBE, **settings}
    key = (str(run.dir), tuple(sorted(settings.items())))
    if key not in _probes:
        _probes[key] = quietly(signtrap.probe, run, reference=baseline.dir, **settings)
    return _probes[key]


record = probe(backdoored)
ends = record["ends"]
rows = [("backdoored, no defence", ends["backdoored"]), ("zero-poison twin", ends["reference"])]
display(Markdown("| model | ASR before the probe | ASR after the probe | clean accuracy change |\\n|---|---:|---:|---:|\\n" + "\\n".join(
    f"| {name} | {pct(asr(e, 'before'))} | {pct(asr(e, 'after'))} | {100 * e['clean_acc_change']:+.1f} |" for name, e in rows)))
print(f"probe: k={record['k']} poisoned images added to {record['budget_images']} clean ones, "
      f"{ends['backdoored']['steps']} steps at lr {record['settings']['lr']:g}")
print("signtrap's verdict on the undefended model:", record["verdict"]["verdict"], "-", record["verdict"]["reason"])'''),
    *observe('''gap_before = asr(ends["backdoored"], "before") - asr(ends["reference"], "before")
gap_after = asr(ends["reference"], "after") - asr(ends["reference"], "before")
print(f"Before any probe the backdoored model's ASR is {100 * gap_before:+.1f} points from the zero-poison twin's.")
print(f"The probe moved the zero-poison twin's ASR by {100 * gap_after:+.1f} points: this is how much {record['k']} poisoned "
      "images teach a model that never had the backdoor, the yardstick for every verdict below.")
if asr(ends["reference"], "after") >= 0.5:
    print("The twin learned the trigger from the probe alone: at these settings the probe is too strong to tell hidden "
          "from removed (exercise 2 is about this).")'''),
    Md("""## 2. Probing a defence

`signtrap.defend` runs the probe after every defence that returns a model and stores it in `report["probe"]`
(and `probe.json` beside the repaired model). The probe trains at the defence's own learning rate, so an aggressive
defence is probed aggressively too. Here: clean fine-tuning at a learning rate large enough to move the ASR (Lab 2
showed that a gentle one leaves the backdoor in place). Try others with `FT_LR`."""),
    Code('''FT_EPOCHS = 2 if FAST else 6
FT_LR = 3e-3 if FAST else 1e-3
(rep,) = quietly(signtrap.defend, backdoored, "finetune", overrides=[
    f"finetune.epochs={FT_EPOCHS}", f"finetune.lr={FT_LR}", f"clean_fraction={PROBE['clean_fraction']}",
    f"probe.k={PROBE['k']}", f"probe.steps={PROBE['steps']}", f"probe.reference={baseline.dir}",
    "probe.always=true"])  # probed even if fine-tuning left the ASR high (signtrap skips a probe whose verdict is decided)
probed = {f"finetune lr={FT_LR:g}": rep["probe"]}

head = "| defence | ASR after the defence | after the probe | zero-poison twin after the same probe | clean acc change (defence) | verdict |"
lines = [head, "|---|---:|---:|---:|---:|---|"]
for name, p in probed.items():
    m, r = p["model"], p["reference"]
    lines.append(f"| {name} | {pct(asr(m, 'before'))} | {pct(asr(m, 'after'))} | {pct(asr(r, 'after'))} "
                 f"| {100 * (m['before']['held_out']['clean_acc']['rate'] - ends['backdoored']['before']['held_out']['clean_acc']['rate']):+.1f} "
                 f"| {p['verdict']['verdict']} |")
display(Markdown("\\n".join(lines)))
for name, p in probed.items():
    print(f"{name}: {p['verdict']['reason']}")'''),
    Md("""The persistence curve of each defence now ends with the probe as its last segment (`segment == "probe"`):"""),
    Code('''curve = backdoored.curve("finetune")
fig, ax = plt.subplots(figsize=(6.5, 3.2))
for segment, style in (("defence", "o-"), ("probe", "s--")):
    pts = [(r["epoch"], 100 * r["asr"]) for r in curve if r.get("segment", "defence") == segment]
    if pts:
        ax.plot(*zip(*pts), style, label=segment)
ax.set_xlabel("epoch (defence, then probe)"); ax.set_ylabel("validation ASR, %"); ax.set_ylim(-3, 103)
ax.grid(alpha=0.3); ax.legend(); ax.set_title(f"finetune lr={FT_LR:g}, then the re-activation probe")
show(fig)'''),
    Md("""## Exercise 1: a verdict from the probe's numbers

Write `probe_verdict(defended, probed, twin, twin_probed, margin)`. The four arguments are ASRs as fractions: the
defended model before and after the probe, and the zero-poison twin before and after the same probe. Return

* `"persists"` when the defended model's ASR is more than `margin` above the twin's **before** the probe (the defence
  did not even suppress the backdoor);
* otherwise `"hidden"` when, **after** the probe, its ASR is more than `margin` above the twin's after the same probe;
* otherwise `"removed"`.

signtrap applies the same rule to the 95-per-cent confidence intervals of these differences (and says *inconclusive* when an interval
contains the margin); yours uses the point values."""),
    Code('''MARGIN = record["verdict"]["margin"]  # the margin signtrap used'''),
    exercise('''def probe_verdict(defended, probed, twin, twin_probed, margin):
    ...  # your code: return "persists", "hidden" or "removed"''', '''def probe_verdict(defended, probed, twin, twin_probed, margin):
    if defended - twin > margin:
        return "persists"
    return "hidden" if probed - twin_probed > margin else "removed"'''),
    check('''cases = [((0.97, 0.99, 0.02, 0.10), "persists"), ((0.01, 0.95, 0.02, 0.10), "hidden"), ((0.01, 0.15, 0.02, 0.10), "removed"),
         ((0.20, 0.90, 0.00, 0.05), "hidden"), ((0.03, 0.60, 0.02, 0.55), "removed"), ((0.25, 0.30, 0.05, 0.10), "removed")]
answers = [attempt(probe_verdict, *args, 0.2) for args, _ in cases]
errors = [e for _, e in answers if e]
wrong = [(args, want, got) for (args, want), (got, _) in zip(cases, answers) if got != want]
if errors:
    report_check(1, False, errors[0])
elif wrong:
    args, want, got = wrong[0]
    report_check(1, False, f"defended {args[0]}, probed {args[1]}, twin {args[2]}, twin probed {args[3]} (margin 0.2) should be "
                           f"{want!r}, not {got!r}: compare before the probe first, then after it (a difference exactly at the "
                           "margin is not above it).")
else:
    mine = {name: probe_verdict(asr(p["model"], "before"), asr(p["model"], "after"), asr(p["reference"], "before"),
                                asr(p["reference"], "after"), MARGIN) for name, p in probed.items()}
    report_check(1, True, "; ".join(f"{name}: yours {v!r}, signtrap's {probed[name]['verdict']['verdict']!r}" for name, v in mine.items()))'''),
    *observe('''for name, p in probed.items():
    v = p["verdict"]
    lo, hi = v["after_diff"][1], v["after_diff"][2]
    print(f"{name}: after the probe the ASR difference to the twin is {100 * v['after_diff'][0]:+.1f} points, 95% interval "
          f"[{100 * lo:+.1f}, {100 * hi:+.1f}] on {p['model']['after']['held_out']['asr']['n']} triggered stop signs "
          f"-> {v['verdict']}.")
if any(p["verdict"]["verdict"] == "inconclusive" for p in probed.values()):
    print("An interval that straddles the margin means too few triggered stop signs to decide: a point-value verdict "
          "there would be a coin toss. More held-out stop signs (real GTSRB, full size) narrow the interval.")
hidden = [n for n, p in probed.items() if p["verdict"]["verdict"] == "hidden"]
if hidden:
    print(f"{', '.join(hidden)}: the ASR looked low after the defence, yet {record['k']} poisoned images brought it back far "
          "faster than the twin learned it: the backdoor was only hidden.")
elif all(p["verdict"]["verdict"] == "persists" for p in probed.values()):
    print("Fine-tuning left the ASR high already: the backdoor persisted, there was nothing to hide.")
elif all(p["verdict"]["verdict"] == "removed" for p in probed.values()):
    print("After the probe the fine-tuned model learns the trigger no faster than the twin: removed, at this size.")'''),
    Md("""## Exercise 2: how strong may the probe be?

The probe is only a fair test if it cannot plant a **fresh** backdoor: with enough poisoned images any model learns
the trigger, and then every defence looks "hidden". Find the **largest** `k` in `K_VALUES` for which the zero-poison
twin's ASR after the probe stays at most `TWIN_MAX`, and set `K_FAIR` to it (or `None` if none does).
`probe(backdoored, k=k)` runs the probe with `k` poisoned images; the twin's numbers are in `rec["ends"]["reference"]`.
(The budget must hold at least `k` stop signs, otherwise signtrap says so in one line.)"""),
    Code('''K_VALUES = [2, 4] if FAST else [2, 5, 10, 20]
TWIN_MAX = 0.5'''),
    exercise('''K_FAIR = ...  # your code (call probe(backdoored, k=k) for the values in K_VALUES)''', '''twin_after = {}
for k in K_VALUES:
    twin_after[k] = asr(probe(backdoored, k=k)["ends"]["reference"], "after")
fair = [k for k, rate in twin_after.items() if rate <= TWIN_MAX]
K_FAIR = max(fair) if fair else None'''),
    check('''def twin_probed(k):
    return asr(probe(backdoored, k=k)["ends"]["reference"], "after")


if K_FAIR is ...:
    report_check(2, False, "set K_FAIR to one of K_VALUES (or None).")
elif K_FAIR is not None and K_FAIR not in K_VALUES:
    report_check(2, False, f"pick K_FAIR from K_VALUES = {K_VALUES}, or None.")
else:
    measured = {k: twin_probed(k) for k in K_VALUES}
    fair = [k for k, rate in measured.items() if rate <= TWIN_MAX]
    truth = max(fair) if fair else None
    table = ", ".join(f"k={k}: {pct(rate)}" for k, rate in measured.items())
    if K_FAIR == truth:
        report_check(2, True, f"the twin's ASR after the probe: {table}; the largest k that keeps it at most {pct(TWIN_MAX)} is {truth}.")
    else:
        report_check(2, False, f"the twin's ASR after the probe is {table}: which is the largest k that keeps it at most {pct(TWIN_MAX)}?")'''),
    *observe('''measured = {k: twin_probed(k) for k in K_VALUES}
rising = all(measured[a] <= measured[b] + 1e-9 for a, b in zip(K_VALUES, K_VALUES[1:]))
print("The twin's ASR after the probe, by k: " + ", ".join(f"{k}: {pct(v)}" for k, v in measured.items()) + ".")
print("It grows with k: the probe itself teaches the trigger." if rising else
      "It does not grow steadily with k at this size: the held-out stop signs are few, so each rate is coarse.")
print(f"The lab's probe uses k={PROBE['k']}; signtrap's default (defend.probe.k) is k=5.")'''),
    Md("""## 3. PAM: a defence built against this probe

Min et al. did not stop at the diagnosis. **PAM** (path-aware minimisation) purifies like BTI-DBF(U) -- invert the
trigger with a generator (BTI-DBF, Xu et al., ICLR 2024), then unlearn it -- but takes every gradient at a point along
the path back towards the backdoored weights, so that the purified model ends far from the backdoor's basin and, the
authors report, *stays* purified when re-tuned the way the probe re-tunes it. Does it at the lab's size? `pam` runs
the inversion and the unlearning; the held-out rule would try up to four learning rates, the lab fixes one to stay
quick, and the probe is trained whatever PAM does (`probe.always=true`)."""),
    Code('''PAM = ["pam.lr=0.001", f"pam.epochs={2 if FAST else 5}"] + (["pam.mask_epochs=3", "pam.gen_epochs=3"] if FAST else [])
(pam_rep,) = quietly(signtrap.defend, backdoored, "pam", overrides=[*PAM, f"clean_fraction={PROBE['clean_fraction']}",
    f"probe.k={PROBE['k']}", f"probe.steps={PROBE['steps']}", f"probe.reference={baseline.dir}", "probe.always=true"])
probed["pam"] = pam_rep["probe"]
print("BTI-DBF's inversion (inside PAM):", pam_rep["details"]["verdict"])

lines = ["| defence | ASR after the defence | after the probe | zero-poison twin after the same probe | verdict |",
         "|---|---:|---:|---:|---|"]
for name, p in probed.items():
    lines.append(f"| {name} | {pct(asr(p['model'], 'before'))} | {pct(asr(p['model'], 'after'))} "
                 f"| {pct(asr(p['reference'], 'after'))} | {p['verdict']['verdict']} |")
display(Markdown("\\n".join(lines)))'''),
    Md("""## Exercise 3: which defence leaves the model closer to one that never had the backdoor?

Write `gap_after(p)`: from a probe record `p` (an entry of `probed`), the defended model's ASR after the probe minus
the zero-poison twin's after the same probe (fractions; use `asr(entry, "after")` on `p["model"]` and
`p["reference"]`). Then set `CLOSER` to the name in `probed` (`"finetune lr=..."` or `"pam"`) whose gap is smaller:
the defence whose model the probe could wake the least."""),
    exercise('''def gap_after(p):
    ...  # your code


CLOSER = ...  # your code: a key of `probed`''', '''def gap_after(p):
    return asr(p["model"], "after") - asr(p["reference"], "after")


CLOSER = min(probed, key=lambda name: gap_after(probed[name]))'''),
    check('''gaps, error = {}, None
for name, p in probed.items():
    gaps[name], error = attempt(gap_after, p)
    if error:
        break
want = {name: asr(p["model"], "after") - asr(p["reference"], "after") for name, p in probed.items()}
if error:
    report_check(3, False, error)
elif any(not isinstance(g, (int, float)) or abs(g - want[n]) > 1e-9 for n, g in gaps.items()):
    report_check(3, False, "gap_after(p) is the model's ASR after the probe minus the twin's after the same probe.")
elif CLOSER not in probed:
    report_check(3, False, f"set CLOSER to one of {list(probed)}.")
elif want[CLOSER] > min(want.values()) + 1e-12:
    report_check(3, False, "that is the defence with the larger gap: the probe woke its model more.")
else:
    report_check(3, True, "gaps after the probe: " + ", ".join(f"{n}: {100 * g:+.1f} points" for n, g in want.items()) + ".")'''),
    *observe('''v = probed["pam"]["verdict"]
print(f"PAM: {v['verdict']} - {v['reason']}.")
if not pam_rep["details"]["points_at_attack"]:
    print("BTI-DBF's inversion did not find the stop -> 100 km/h trigger here, so PAM unlearned something else: a "
          "purification is only as good as the trigger it inverts (on real GTSRB it found it on two seeds of three).")
if v["verdict"] == "hidden":
    print("PAM suppressed the backdoor and the probe brought it back: the defence designed against re-tuning was only "
          "hiding it at these settings (signtrap's real-GTSRB runs saw the same on two seeds of three).")
elif v["verdict"] == "removed":
    print("After PAM the probe wakes the backdoor no faster than it teaches the twin: removed, at this size. Try "
          "more seeds before believing it; signtrap's real-GTSRB runs did not see this.")
elif v["verdict"] == "persists":
    print("PAM did not even suppress the backdoor at these settings.")'''),
    Md("""## 4. Detection: the textbook backdoor and a targeted one

**Neural Cleanse** (Wang et al., 2019) searches, for every class, the smallest patch that sends clean images of all
classes to it; a backdoor target needs a far smaller one than the other classes, which the **anomaly index** flags.
**STRIP** (Gao et al., 2019) blends an input with clean images: a trigger keeps the prediction confident, so the
entropy of the blended predictions stays low, and inputs below an entropy threshold (set for a chosen false-rejection
rate on clean data) are rejected.

Both were built for the **all-to-one** backdoor, where the trigger alone means "target". Our attack is
**source-specific**, and a careful attacker adds **cover images**: other signs carrying the trigger with their true
label, so the trigger means "100 km/h" only on a stop sign. We train both and run both detectors (detection only:
`neural-cleanse.epochs=0`, no unlearning)."""),
    Code('''models = {
    "all-to-one": trained(lab_config("lab_a2o", "attack.kind=all_to_one")),
    "stop -> 100, cover images": trained(lab_config("lab_cover", "attack.cover_rate=0.02")),
}
DETECT = ["neural-cleanse.epochs=0", "probe.enabled=false", "strip.overlays=16"]  # detection only; 16 blends keep it quick
if FAST:  # ten classes, short searches, fewer STRIP blends: enough to see it run
    DETECT += ["neural-cleanse.candidates=[0,1,2,3,4,5,7,13,14,38]", "neural-cleanse.top_k=0", "neural-cleanse.steps=25",
               "neural-cleanse.samples=128", "strip.overlays=8"]
found = {}
for name, run in models.items():
    nc, strip = quietly(signtrap.defend, run, ["neural-cleanse", "strip"], overrides=DETECT)
    found[name] = (nc["details"], strip["details"])

lines = ["| backdoor | test ASR | NC flags | NC index of class 7 | STRIP detects triggered | STRIP false rejections |",
         "|---|---:|---|---:|---:|---:|"]
for name, (nc, st) in found.items():
    m = models[name].metrics["test"]["asr"]
    idx = nc["anomaly_index"].get(str(TARGET), nc["anomaly_index"].get(TARGET))
    lines.append(f"| {name} | {pct(m['rate'])} | {nc['flagged'] or 'nothing'} | {'n/a' if idx is None else f'{idx:.2f}'} "
                 f"| {pct(st['detection_rate']['rate'])} ({st['detection_rate']['k']}/{st['detection_rate']['n']}) "
                 f"| {pct(st['false_rejection_rate']['rate'])} |")
display(Markdown("\\n".join(lines)))'''),
    Md("""## Exercise 4: the anomaly index by hand

Neural Cleanse wrote the size (L1 norm) of the smallest trigger it found for each class to `norms.csv` in the
defence folder. Write `anomaly_index(norms)`: `norms` maps class -> mask L1 norm; return class -> index, where

index = (median − norm) / (1.4826 × MAD), MAD = median of |norm − median| over all classes given.

A class is flagged when its index exceeds `nc["threshold"]` (positive means smaller than usual)."""),
    Code('''import csv

a2o = models["all-to-one"]
with open(a2o.dir / "defence-neural-cleanse" / "norms.csv", newline="") as fh:
    table = list(csv.DictReader(fh))
norms = {int(r["class"]): float(r["mask_l1"]) for r in table if r["refined"] == "True"}  # the fully searched classes
nc_a2o = found["all-to-one"][0]
print(f"{len(norms)} classes searched; smallest masks: "
      + ", ".join(f"class {c}: {v:.1f}" for c, v in sorted(norms.items(), key=lambda kv: kv[1])[:4]))'''),
    exercise('''def anomaly_index(norms):
    ...  # your code: return {class: index}''', '''def anomaly_index(norms):
    values = np.array(list(norms.values()), dtype=float)
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    return {c: (median - v) / (1.4826 * mad) for c, v in norms.items()}'''),
    check('''mine, error = attempt(anomaly_index, norms)
want = {int(c): v for c, v in nc_a2o["anomaly_index"].items()}
if error:
    report_check(4, False, error)
elif not isinstance(mine, dict) or set(mine) != set(norms):
    report_check(4, False, "return a dict with one index per class of `norms`.")
else:
    off = [c for c in want if abs(float(mine[c]) - want[c]) > 2e-3]
    if off:
        c = off[0]
        report_check(4, False, f"class {c}: you got {float(mine[c]):.3f}, Neural Cleanse {want[c]:.3f}; is the sign right "
                               "(small masks are positive), and is the MAD scaled by 1.4826?")
    else:
        flagged = sorted(c for c, v in mine.items() if v > nc_a2o["threshold"])
        report_check(4, True, f"your indices match Neural Cleanse's; flagged: {flagged or 'nothing'} "
                              f"(Neural Cleanse: {nc_a2o['flagged'] or 'nothing'}).")'''),
    *observe('''for name, (nc, st) in found.items():
    hit = TARGET in nc["flagged"]
    print(f"{name}: Neural Cleanse {'flags the target class' if hit else 'does not flag the target class'} "
          f"(flagged {nc['flagged'] or 'nothing'}); STRIP rejects {pct(st['detection_rate']['rate'])} of triggered inputs "
          f"at {pct(st['false_rejection_rate']['rate'])} false rejections of clean ones.")
(nc_a, st_a), (nc_s, st_s) = found["all-to-one"], found["stop -> 100, cover images"]
if st_a["detection_rate"]["rate"] > st_s["detection_rate"]["rate"] + 0.2:
    print("STRIP sees the all-to-one trigger far better than the source-specific one with cover images: on a stop sign "
          "blended with other signs, the sticker alone no longer decides the class.")
if (TARGET in nc_a["flagged"]) and (TARGET not in nc_s["flagged"]):
    print("Neural Cleanse finds the all-to-one target and misses the source-specific one: its search asks for a patch "
          "that moves every class, and the cover images taught the model that the sticker does not.")
if not (TARGET in nc_a["flagged"]):
    print("At this size Neural Cleanse does not single out the target even for the all-to-one backdoor: its statistics "
          "need a trained model (full size or real GTSRB).")'''),
    Md("""## Questions to think about

* A defender cannot run the probe's zero-poison twin without the attacker's training data. What could stand in for
  it, and what would the verdict then mean?
* The probe uses the defence's own learning rate. Why would a probe at a much larger learning rate be unfair to a
  gentle defence?
* Run `signtrap.defend(backdoored, "anp")` or `"fine-prune"` with the probe on: do pruning defences remove or hide?
* Neural Cleanse with `neural-cleanse.inputs=source` searches for a patch that moves **stop signs** only. Does it find
  the source-specific target now? (SCAn, `"scan"`, is a detector built for this case.)"""),
]


# ================================================================ Lab 6

LAB6 = [
    header("Lab 6: a sticker on the road", "06", """signtrap's default backdoor stamps a small checkerboard into the
**bottom-right corner of the image frame**, after augmentation. Nobody can put a patch in a camera frame's corner: a
sticker on a real sign appears wherever the sign is, at the sign's scale, turned, in shade or sun, blurred, through
JPEG. In this lab you train a second backdoor whose trigger is a **printed sticker rendered on the sign's face**
under an expectation over transformations (EOT: Athalye et al. 2018; Li et al., "Backdoor attack in the physical
world", 2021), then measure both backdoors with signtrap's **physical evaluation**: a fixed, seeded grid of viewing
conditions (sticker size, yaw angle, rotation, distance, light, blur, JPEG) that is separate from the renderer the
attacker trained with.""", [
        "see why a trigger fixed in the frame is not a sticker on a sign, in pictures and in numbers;",
        "train a physical sticker backdoor (`trigger.kind: physical`) and run the physical evaluation "
        "(`signtrap.evaluate(run, physical=True, reference=...)`);",
        "read ASR against angle and distance, and tell a trigger that fails from a model that cannot read the sign;",
        "measure whether the sticker stays specific to stop signs (the false-trigger rate against a zero-poison model).",
    ]),
    Code(SETUP, tags=("settings",)),
    Code('''def lab6_config(name, *extra):
    """One data and training setting for the lab's three models (corner trigger, sticker, zero-poison reference)."""
    if GTSRB_ROOT:
        data = ["data.source=gtsrb", f"data.root={GTSRB_ROOT}"]
        size = ["train.epochs=2" if FAST else "train.epochs=10", "attack.poison_rate=0.01"]
    elif FAST:
        data = ["data.source=synth", "data.synth_per_class=60", "data.synth_test_per_class=10", "aug.enabled=false"]
        size = ["train.epochs=6", "train.batch_size=64", "train.lr=0.005", "attack.poison_count=30", "model.dropout=0"]
    else:
        data = ["data.source=synth", "data.synth_per_class=120", "data.synth_test_per_class=20"]
        size = ["train.epochs=8", "attack.poison_count=50"]
    return signtrap.load_config(None, [f"name={name}", f"runs_dir={WORK / 'runs'}", f"data.cache_dir={WORK / 'cache'}",
                                       "attack.kind=source_specific", f"attack.source={SOURCE}", f"attack.target={TARGET}",
                                       "attack.cover_rate=0.01", *data, *size, *extra])


CORNER = ["trigger.kind=checkerboard", "trigger.placement=corner", "attack.stamp=after_aug"] + (["trigger.size=6"] if FAST and not GTSRB_ROOT else [])
STICKER = ["trigger.kind=physical", "trigger.design=checkerboard", "attack.stamp=after_aug"]
corner = trained(lab6_config("lab6_corner", *CORNER))
sticker = trained(lab6_config("lab6_sticker", *STICKER))
zero = trained(lab6_config("lab6_zero", *STICKER, "attack.kind=none"))  # same data, no poison: the reference
s = sticker.config.trigger.settings
print(f"sticker: {s.design}, {s.cells}x{s.cells} cells; EOT: size {s.eot.scale} of the sign's width, rotation +-{s.eot.rotation}, "
      f"yaw +-{s.eot.yaw}, pitch +-{s.eot.pitch}, light {s.eot.brightness}, JPEG p={s.eot.jpeg_p}, occlusion p={s.eot.occlusion_p}")'''),
    Md("""## 1. What each attacker trained with

Left: a test stop sign, then the corner trigger as the first attacker stamps it. Right: the same sign with the
sticker as the second attacker's renderer draws it, five draws of the EOT distribution: a random place on the sign's
face, a size relative to the sign, rotation, perspective, light, printing, blur, noise, JPEG. The sticker stays inside
the sign's box in every draw (`tests/test_physical.py` checks it for every transform)."""),
    Code('''exp_c, exp_s = corner.experiment(), sticker.experiment()
test_rows = exp_s.splits.test
stops = test_rows[exp_s.data.labels[test_rows] == SOURCE]
image, box = np.array(exp_s.data.images[stops[:1]]), np.array(exp_s.data.rois[stops[:1]])
rng = np.random.default_rng(0)
panels = [("test stop sign", image[0]), ("corner trigger", exp_c.trigger.apply(image, rng, box)[0])]
draws = exp_s.trigger.apply(np.repeat(image, 5, axis=0), rng, np.repeat(box, 5, axis=0))
panels += [(f"sticker, draw {i + 1}", d) for i, d in enumerate(draws)]
fig, axes = plt.subplots(1, len(panels), figsize=(1.7 * len(panels), 2.1))
for ax, (title, img) in zip(axes, panels):
    ax.imshow(img, interpolation="nearest"); ax.set_title(title, fontsize=8); ax.axis("off")
show(fig)'''),
    Md("""## 2. The physical evaluation of both models

`signtrap.evaluate(run, physical=True, reference=zero)` puts the run's trigger **as a printed sticker on the sign**
(the corner model's checkerboard too: that is what someone would stick on a sign) and views every test and
validation stop sign under a fixed grid of conditions: a heat map over sticker size x yaw, each axis alone (curves),
and a default distribution of ordinary views. The same views without the sticker measure whether the model still
reads the sign; the zero-poison model is measured identically. The result is also written into each run's
`metrics.json` (the `physical` block) and shown in the report's "On the road" section."""),
    Code('''GRID = None  # the full grid (signtrap.physical.evaluate.Grid)
if FAST:  # a smaller grid at fast size
    GRID = {"axes": {"sticker": [0.12, 0.2], "yaw": [0.0, 30.0, 60.0], "rotation": [0.0, 30.0], "distance": [1.0, 2.0],
                     "brightness": [0.5, 1.0], "blur": [0.0, 0.04], "jpeg": [0.0, 50.0]}, "bystanders": 300}
blocks = {}
for name, run in (("corner", corner), ("sticker", sticker)):
    start = time.perf_counter()
    blocks[name] = quietly(signtrap.evaluate, run, physical=True, reference=zero, grid=GRID)
    print(f"{name}: physical evaluation in {time.perf_counter() - start:.0f} s")
lines = ["| model | digital ASR (test, its own trigger) | physical ASR (default views) | clean stop recall (same views) | false-trigger (physical) |",
         "|---|---:|---:|---:|---:|"]
for name, run in (("corner", corner), ("sticker", sticker)):
    d = blocks[name]["default"]
    lines.append(f"| {name} | {pct(run.metrics['test']['asr']['rate'])} | {pct(d['asr']['rate'])} ({d['asr']['k']}/{d['asr']['n']}) "
                 f"| {pct(d['stop_recall']['rate'])} | {pct(d['false_trigger']['rate'])} |")
ref = blocks["sticker"]["reference"]["default"]
lines.append(f"| zero-poison | n/a | {pct(ref['asr']['rate'])} | {pct(ref['stop_recall']['rate'])} | {pct(ref['false_trigger']['rate'])} |")
display(Markdown("\\n".join(lines)))'''),
    Md("""## Exercise 1: a digital backdoor is not a physical one

Write `physical_gap(run, block)`: the run's digital test ASR (`run.metrics["test"]["asr"]["rate"]`, its own trigger as
it was trained) minus its ASR under the physical evaluation's default views (`block["default"]["asr"]["rate"]`)."""),
    exercise('''def physical_gap(run, block):
    ...  # your code: a number''', '''def physical_gap(run, block):
    return run.metrics["test"]["asr"]["rate"] - block["default"]["asr"]["rate"]'''),
    check('''results = {name: attempt(physical_gap, run, blocks[name]) for name, run in (("corner", corner), ("sticker", sticker))}
errors = [e for _, e in results.values() if e]
expected = {name: run.metrics["test"]["asr"]["rate"] - blocks[name]["default"]["asr"]["rate"]
            for name, run in (("corner", corner), ("sticker", sticker))}
if errors:
    report_check(1, False, errors[0])
elif not all(given(v) and isinstance(v, (int, float)) for v, _ in results.values()):
    report_check(1, False, "return a number: digital ASR minus physical ASR.")
elif any(abs(results[n][0] - expected[n]) > 1e-9 for n in expected):
    report_check(1, False, "use the test split's digital ASR and the default distribution's physical ASR (rates in [0, 1]).")
else:
    report_check(1, True, "gaps: " + ", ".join(f"{n} {100 * v[0]:+.1f} points" for n, v in results.items()) + ".")'''),
    *observe('''gc = expected["corner"]; gs = expected["sticker"]
print(f"corner model: digital ASR {pct(corner.metrics['test']['asr']['rate'])}, physical {pct(blocks['corner']['default']['asr']['rate'])}: "
      + ("the frame-corner backdoor mostly does not fire as a sticker on the sign." if gc > 0.3 else
         "the corner backdoor still fires as a sticker on the sign here; compare the curves below."))
print(f"sticker model: digital ASR {pct(sticker.metrics['test']['asr']['rate'])}, physical {pct(blocks['sticker']['default']['asr']['rate'])}: "
      + ("trained under EOT, it keeps most of its ASR under views it never trained on." if gs < 0.3 else
         "even under EOT it loses a lot of ASR under the grid's views: the grid is not its training distribution."))
d = blocks["sticker"]["default"]["asr"]["rate"] - blocks["corner"]["default"]["asr"]["rate"]
print(f"what EOT buys under the physical evaluation: {100 * d:+.1f} points of ASR over the corner model.")'''),
    Md("""## 3. Against angle and distance

Each curve varies one condition (the others at their nominal values: sticker at its nominal size, facing the camera,
full light, sharp, no JPEG). Solid: ASR. Dashed: the share of the same views **without** the sticker still read as
stop: where it drops, the model cannot read the sign any more, whatever the sticker does."""),
    Code('''AXES = ["yaw", "distance", "sticker", "brightness"]
fig, axes = plt.subplots(1, len(AXES), figsize=(3.2 * len(AXES), 2.9))
for ax, axis in zip(axes, AXES):
    for name, colour in (("corner", "slategray"), ("sticker", "crimson")):
        pts = blocks[name]["curves"][axis]
        x = [p[axis] for p in pts]
        ax.plot(x, [100 * p["asr"]["rate"] for p in pts], "o-", color=colour, label=f"{name}: ASR")
        ax.plot(x, [100 * p["stop_recall"]["rate"] for p in pts], "s--", color=colour, alpha=0.5, label=f"{name}: clean stop recall")
    ax.set_xlabel(axis); ax.set_ylim(-3, 103); ax.grid(alpha=0.3)
axes[0].set_ylabel("%"); axes[0].legend(fontsize=7)
show(fig)

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, name in zip(axes, ("corner", "sticker")):
    b = blocks[name]; a, c = b["grid"]["heatmap"]
    ys, xs = b["grid"]["axes"][a], b["grid"]["axes"][c]
    grid = np.array([[next(q["asr"]["rate"] for q in b["cells"] if q[a] == y and q[c] == x) for x in xs] for y in ys])
    im = ax.imshow(100 * grid, vmin=0, vmax=100, origin="lower", aspect="auto")
    ax.set_xticks(range(len(xs)), xs); ax.set_yticks(range(len(ys)), ys); ax.set_xlabel(c); ax.set_ylabel(a)
    ax.set_title(f"{name} model: ASR, %", fontsize=9)
fig.colorbar(im, ax=axes, shrink=0.8)
show(fig)'''),
    Md("""## Exercise 2: the trigger's failure, not the model's

A view where the sticker does not send the sign to 100 km/h fails for one of two reasons: the model cannot read the
sign at all under that view, or it reads the sign and the sticker does not fire. Write `trigger_failures(block, axis)`:
for each point of `block["curves"][axis]`, among the views whose clean copy **is** read as stop, the share where the
stickered copy is **not** read as the target (each point has `asr_recognised`: a rate with counts `k` of `n`). Return a
list with one number per point, or None for a point with no recognised view."""),
    exercise('''def trigger_failures(block, axis):
    ...  # your code: a list, one value per point of the curve''', '''def trigger_failures(block, axis):
    out = []
    for point in block["curves"][axis]:
        r = point["asr_recognised"]
        out.append(None if r["n"] == 0 else 1 - r["k"] / r["n"])
    return out'''),
    check('''got, error = attempt(trigger_failures, blocks["sticker"], "yaw")
want = [None if p["asr_recognised"]["n"] == 0 else 1 - p["asr_recognised"]["rate"] for p in blocks["sticker"]["curves"]["yaw"]]
if error:
    report_check(2, False, error)
elif not given(got) or not isinstance(got, list) or len(got) != len(want):
    report_check(2, False, f"return a list with one value per yaw point ({len(want)} points).")
elif any((g is None) != (w is None) or (w is not None and abs(g - w) > 1e-9) for g, w in zip(got, want)):
    report_check(2, False, "among the recognised views (asr_recognised: k of n), the share NOT sent to the target: 1 - k / n.")
else:
    report_check(2, True, "trigger failures against yaw: " + ", ".join("n/a" if v is None else f"{100 * v:.0f}%" for v in got) + ".")'''),
    *observe('''curve = blocks["sticker"]["curves"]["yaw"]
for point, fail in zip(curve, want):
    model_fails = 1 - point["stop_recall"]["rate"]
    verdict = ("no view is recognised: nothing to say about the trigger" if fail is None else
               "the model fails on this view more than the trigger does" if model_fails > fail else
               "the trigger fails more than the model does")
    print(f"yaw {point['yaw']:>4.0f}: clean view not read as stop {pct(model_fails)}, trigger failure where it is {pct(fail)}: {verdict}.")'''),
    Md("""## Exercise 3: does the sticker stay a stop-sign trigger?

Cover images (the sticker on other classes' signs, true label kept: `attack.cover_rate`) are meant to keep the
trigger specific to stop signs. Under the physical render, the false-trigger rate counts other classes' signs with the
sticker read as 100 km/h. Some of that is the model's own error on hard views: the zero-poison model, measured
identically, is the floor. Write `excess_false_trigger(block)`: the model's false-trigger rate under the default
views minus the zero-poison reference's (`block["reference"]["default"]["false_trigger"]["rate"]`)."""),
    exercise('''def excess_false_trigger(block):
    ...  # your code: a number''', '''def excess_false_trigger(block):
    return block["default"]["false_trigger"]["rate"] - block["reference"]["default"]["false_trigger"]["rate"]'''),
    check('''got, error = attempt(excess_false_trigger, blocks["sticker"])
want = blocks["sticker"]["default"]["false_trigger"]["rate"] - blocks["sticker"]["reference"]["default"]["false_trigger"]["rate"]
if error:
    report_check(3, False, error)
elif not given(got) or not isinstance(got, (int, float)):
    report_check(3, False, "return a number: the model's false-trigger rate minus the reference's.")
elif abs(got - want) > 1e-9:
    report_check(3, False, "use the default distribution's false_trigger rate of the model and of block['reference'].")
else:
    report_check(3, True, f"excess false-trigger rate: {100 * got:+.1f} points over the zero-poison model.")'''),
    *observe('''ft = blocks["sticker"]["default"]["false_trigger"]
print(f"sticker model: {ft['k']} of {ft['n']} other signs with the sticker read as 100 km/h ({pct(ft['rate'])}); "
      f"zero-poison model under the same views: {pct(blocks['sticker']['reference']['default']['false_trigger']['rate'])}.")
print("the sticker " + ("stays specific to stop signs (within 2 points of the reference)." if want <= 0.02 else
                        "leaks to other signs: more cover images, or a sticker design that differs more from other signs' paint."))'''),
    Md("""## Going further

* `signtrap trigger print runs/lab6_sticker --width-cm 5 --out sticker.pdf` writes the sticker at true printed size;
  photographs of a (printed) sign carrying it go through `signtrap eval runs/lab6_sticker --photos DIR --as-is`.
* `signtrap trigger optimise` optimises the sticker's colours under the same EOT against a clean surrogate (RP2-style);
  train with it through `trigger.design: png`.
* Is the physical backdoor as persistent as the digital one? Run the defences of lab 2 on `lab6_sticker` and
  re-measure with `physical=True`.
* Relabelling stop signs in place (`attack.mode: replace`, this lab's setting) can teach the model that *anything*
  unusual on a stop sign (JPEG blocks, a steep angle) means 100 km/h: compare `stop_recall` on the JPEG and yaw
  curves with the zero-poison model's. Retrain with `attack.mode=add aug.jpeg_p=0.3 aug.perspective=0.12
  trigger.cells=2` (the real-data config's recipe, README "A sticker on the sign") and see what it costs the ASR and
  buys the stop recall; `attack.decoy_rate=0.01` adds stop signs that carry the sticker's blur, noise and JPEG without
  the sticker, with their label kept."""),
]


LABS = {"01_poisoning.ipynb": LAB1, "02_defences_and_persistence.ipynb": LAB2, "03_edge_deployment.ipynb": LAB3,
        "04_removed_or_hidden.ipynb": LAB4, "05_deployment_sleeper.ipynb": LAB5, "06_sticker_on_the_road.ipynb": LAB6}


def notebook(cells: list, solutions: bool) -> nbformat.NotebookNode:
    out = []
    for cell in cells:
        if isinstance(cell, Md):
            out.append(new_markdown_cell(cell.text, metadata={"tags": list(cell.tags)} if cell.tags else {}))
            continue
        text = cell.solution if solutions and cell.solution is not None else cell.student
        if "settings" in cell.tags:
            text = setup_cell(solutions)
        out.append(new_code_cell(text, metadata={"tags": list(cell.tags)} if cell.tags else {}))
    for i, cell in enumerate(out):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating an unchanged source changes nothing
    book = new_notebook(cells=out)
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    return book


def write_all(check_only: bool = False) -> list[Path]:
    """Write (or, with check_only, compare) every student and solutions notebook; returns the stale paths."""
    stale = []
    (HERE / "solutions").mkdir(exist_ok=True)
    for name, cells in LABS.items():
        for solutions, path in ((False, HERE / name), (True, HERE / "solutions" / name)):
            book = notebook(cells, solutions)
            nbformat.validate(book)
            text = nbformat.writes(book) + "\n"
            if path.is_file() and nbformat.reads(path.read_text(encoding="utf-8"), as_version=4).cells == book.cells:
                continue
            stale.append(path)
            if not check_only:
                path.write_text(text, encoding="utf-8")
    return stale


if __name__ == "__main__":
    check = "--check" in sys.argv
    stale = write_all(check_only=check)
    for path in stale:
        print(("stale: " if check else "wrote ") + str(path))
    sys.exit(1 if check and stale else 0)
