"""Sweep executors: each run is one `python -m signtrap run ...` command (the pipeline engine), run in its
own process with its own thread budget and GPU.

- `local`: a pool of N runs at a time on this machine; one GPU per run where there are GPUs
  (CUDA_VISIBLE_DEVICES), else cores / N threads each (OMP_NUM_THREADS).
- `ray`: one Ray task per run asking for the CPUs (and the GPU) it needs; the task runs the same
  commands. Every node must see the sweep's working directory, runs_dir and data cache at the same paths
  (a shared filesystem), as a local instance trivially does.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

import torch

from signtrap.data.cache import cache_path, prepare
from signtrap.errors import SigntrapError
from signtrap.fileio import make_dirs, record_written, refuse_foreign
from signtrap.machine import cores as machine_cores
from signtrap.machine import lifeline
from signtrap.machine.progress import say

RAY_HINT = "the ray executor needs Ray, an optional extra: pip install 'signtrap[ray]'"
# launcher variables that must not leak into a run (a sweep started under torchrun would otherwise join its group)
DROP_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID")


@dataclass
class Job:
    name: str
    run_dir: str
    commands: list[list[str]]  # arguments after `python -m signtrap`
    log: str
    cwd: str
    device: str  # the run's device setting: auto, cpu or cuda
    threads: int = 0  # the run's train.threads (0: not set)
    wants_gpu: bool = field(init=False)

    def __post_init__(self) -> None:
        self.wants_gpu = self.device != "cpu"


@dataclass
class Result:
    name: str
    ok: bool
    seconds: float
    log: str
    error: str = ""


def make_job(name: str, run_dir: Path, command: list[str], log: Path, device: str, threads: int = 0) -> Job:
    """A job running `python -m signtrap COMMAND...` for one run, from this working directory."""
    return Job(name, str(run_dir), [command], str(Path(log).resolve()), os.getcwd(), device, threads)


def execute(job: Job, threads: int, gpu: int | None = None) -> Result:
    """Run one job's commands in order, output to its log; stop at the first failure."""
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env = lifeline.child_env(env)  # the run dies with this process, however it dies (Linux)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    make_dirs(Path(job.log).parent)
    refuse_foreign(job.log, "replace it with this sweep run's log")
    record_written(Path(job.log).parent, Path(job.log).name)  # recorded first: a killed run's partial log is still ours
    start = time.perf_counter()
    with open(job.log, "w", encoding="utf-8") as fh:
        for cmd in job.commands:
            argv = [sys.executable, "-m", "signtrap", *cmd]
            fh.write(f"$ {shlex.join(argv)}\n")
            fh.flush()
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=job.cwd, env=env)
            with _CHILDREN_LOCK:
                _CHILDREN.add(proc)
            try:
                rc = proc.wait()
            except BaseException:  # interrupted or cancelled (a Ray task): the run stops with us, its lock released
                if proc.poll() is None:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=30)
                raise
            finally:
                with _CHILDREN_LOCK:
                    _CHILDREN.discard(proc)
            if rc != 0:
                fh.flush()
                return Result(job.name, False, time.perf_counter() - start, job.log, _failure(job.log, cmd[0], rc))
    return Result(job.name, True, time.perf_counter() - start, job.log)


_CHILDREN: set[subprocess.Popen] = set()  # the run processes this sweep has started and not yet reaped
_CHILDREN_LOCK = threading.Lock()


def stop_children(sig: int = signal.SIGTERM) -> None:
    """Pass `sig` on to every run process the sweep started (a stopped sweep leaves no orphan holding a run's lock)."""
    with _CHILDREN_LOCK:
        children = list(_CHILDREN)
    for proc in children:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(sig)


@contextlib.contextmanager
def children_stop_with_us(stopping: threading.Event):
    """While the block runs, SIGTERM (and SIGHUP) to the sweep stops its runs, then interrupts the sweep itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, frame):
        stopping.set()
        stop_children(signal.SIGTERM)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if sig}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _failure(log: str, step: str, rc: int) -> str:
    lines = [line.strip() for line in Path(log).read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("signtrap: error:")]
    if errors:
        detail = errors[0].removeprefix("signtrap: error:").strip()  # the first: what failed, not what it blocked
    elif rc < 0:
        detail = f"killed by signal {-rc}"
    else:
        detail = lines[-1][:200] if lines else "no output"
    return f"{step} exited with {rc}: {detail}"


def prepare_data(data_configs: dict) -> None:
    """Build each distinct data cache once, before runs start, so parallel runs never race to build it."""
    seen = set()
    for cfg in data_configs.values():
        path = cache_path(cfg)
        if path not in seen:
            seen.add(path)
            prepare(cfg)


def cores() -> int:
    """The CPU cores this process may use (affinity, cgroup quota): each run claims its share of them."""
    return machine_cores.allowance()


def _report(done: int, total: int, res: Result) -> None:
    if res.ok:
        say(f"[{done}/{total}] {res.name}: done in {res.seconds:.0f} s")
    else:
        say(f"[{done}/{total}] {res.name}: FAILED in {res.seconds:.0f} s ({res.error}); log: {res.log}")


def run_local(jobs: list[Job], workers: int | None = None, threads: int | None = None) -> list[Result]:
    if workers is not None and workers < 1:
        raise SigntrapError(f"--workers {workers}: must be at least 1")
    if threads is not None and threads < 1:
        raise SigntrapError(f"--threads {threads}: must be at least 1")
    if threads is not None:
        machine_cores.check_threads(threads, "--threads")  # not above the cores this process may use
    gpus = 0
    if any(j.wants_gpu for j in jobs):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n_cores = cores()
    need = threads or max(j.threads for j in jobs) or 1  # threads per run: --threads, else train.threads, else 1
    if workers is None:
        workers = gpus if gpus else max(1, n_cores // need)
    workers = max(1, min(workers, len(jobs)))
    threads = threads or max(1, n_cores // workers)
    slots: Queue = Queue()
    for i in range(workers):
        slots.put(i % gpus if gpus else None)
    say(f"local executor: {len(jobs)} runs, {workers} at a time, {threads} CPU thread(s) each"
        + (f", one of {gpus} GPU(s) each" if gpus else ""))

    stopping = threading.Event()

    def work(job: Job) -> Result:
        if stopping.is_set():
            return Result(job.name, False, 0.0, job.log, "not started: the sweep was interrupted")
        slot = slots.get()
        try:
            return execute(job, threads, slot if job.wants_gpu else None)
        finally:
            slots.put(slot)

    results = []
    with children_stop_with_us(stopping), ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, job) for job in jobs]
        try:
            for future in as_completed(futures):
                results.append(future.result())
                _report(len(results), len(jobs), results[-1])
        except BaseException:  # Ctrl-C reaches the runs' processes too (same process group); start no new ones
            stopping.set()
            for future in futures:
                future.cancel()
            raise
    return results


def require_ray():
    try:
        import ray
    except ImportError:
        raise SigntrapError(RAY_HINT) from None
    return ray


def run_ray(jobs: list[Job], address: str | None = None, workers: int | None = None, threads: int | None = None) -> list[Result]:
    """One Ray task per run; connects to `address`, to an already initialised Ray, or starts a local instance."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise SigntrapError(f"ray: cannot reach a cluster at {address or 'a new local instance'}: {str(exc).splitlines()[0]}") from None
        started = True
    try:
        resources = ray.cluster_resources()
        cluster_cpus, cluster_gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        pending, refs = list(jobs), {}
        limit = workers or len(jobs)
        remote = ray.remote(execute)
        results: list[Result] = []
        say(f"ray executor: {len(jobs)} runs on a cluster with {cluster_cpus} CPUs and {cluster_gpus} GPUs")
        with children_stop_with_us(threading.Event()):
            try:
                return _ray_loop(ray, remote, jobs, pending, refs, limit, threads, cluster_cpus, cluster_gpus, results)
            except KeyboardInterrupt:  # SIGTERM or Ctrl-C: cancel every running task; each stops its run (execute)
                for ref in list(refs):
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=False)
                with contextlib.suppress(Exception):  # let them stop their runs before the local instance goes
                    ray.wait(list(refs), num_returns=len(refs), timeout=40)
                raise
    finally:
        if started:
            ray.shutdown()


def _ray_loop(ray, remote, jobs, pending, refs, limit, threads, cluster_cpus, cluster_gpus, results) -> list[Result]:
    """Submit runs while fewer than `limit` are in flight; collect each as it finishes."""
    while pending or refs:
        while pending and len(refs) < limit:
            job = pending.pop(0)
            gpu = 1 if job.wants_gpu and cluster_gpus else 0
            if job.device.startswith("cuda") and not cluster_gpus:
                raise SigntrapError(f"sweep run {job.name} asks for device={job.device} but the Ray cluster has no GPUs")
            cpus = min(threads or job.threads or (1 if gpu else 2), cluster_cpus)
            # Ray sets CUDA_VISIBLE_DEVICES for a task that asks for a GPU; the run's processes inherit it
            refs[remote.options(num_cpus=cpus, num_gpus=gpu, max_retries=0).remote(job, cpus)] = job
        ready, _ = ray.wait(list(refs), num_returns=1)
        job = refs.pop(ready[0])
        try:
            res = ray.get(ready[0])
        except Exception as exc:  # the task itself died (node lost, worker killed)
            res = Result(job.name, False, 0.0, job.log, f"ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        results.append(res)
        _report(len(results), len(jobs), res)
    return results
