"""Checkpoints: a state dict plus what is needed to rebuild and use the model, loaded with weights_only=True."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from signtrap.config import flat
from signtrap.errors import SigntrapError
from signtrap.fileio import CHECKSUMS, atomic_path, one_line, read_checksums, sha256_file, verify_sha256, write_json
from signtrap.models import create_model

__all__ = ["CHECKSUMS", "save", "load", "model_payload", "build_model", "record_checksum", "verified_load", "require_same_attack"]

META_KEYS = ("model_name", "num_classes")


def save(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise SigntrapError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, or a pickle that is not plain weights
        text = str(exc)
        found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise SigntrapError(f"{path}: refused: it holds a Python object ({found[1]}), not only weights, and loading it "
                                "could run arbitrary code (signtrap loads checkpoints with weights_only=True)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text.replace(": \n\n", ": "))
        reason = detail[1].strip() if detail else f"{type(exc).__name__}: {one_line(text, 160)}"
        raise SigntrapError(f"{path}: unreadable checkpoint ({reason})") from None
    if not isinstance(payload, dict):
        raise SigntrapError(f"{path}: not a signtrap checkpoint (it holds a {type(payload).__name__}, not a dict)")
    return payload


def model_payload(model: nn.Module, meta: dict) -> dict:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state_dict": state, "meta": meta}


def build_model(payload: dict, device: str | torch.device = "cpu") -> nn.Module:
    meta = payload.get("meta")
    if not isinstance(meta, dict) or not all(k in meta for k in META_KEYS) or not isinstance(payload.get("state_dict"), dict):
        raise SigntrapError("not a signtrap model checkpoint (no 'meta' with model_name and num_classes, or no 'state_dict')")
    try:
        model = create_model(meta["model_name"], num_classes=meta["num_classes"], dropout=meta.get("dropout", 0.0))
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise SigntrapError(f"checkpoint does not match model '{meta['model_name']}': {one_line(str(exc), 160)}") from None
    return model.to(device).eval()


def record_checksum(directory: Path, filename: str) -> None:
    """Store the SHA-256 of `directory/filename` in directory/checksums.json."""
    sums = read_checksums(directory)
    sums[filename] = sha256_file(Path(directory) / filename)
    write_json(Path(directory) / CHECKSUMS, sums)


def verified_load(directory: Path, filename: str = "model.pt", device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a model checkpoint after checking it against the run's recorded hash."""
    directory = Path(directory)
    path = directory / filename
    if not path.is_file():
        raise SigntrapError(f"{path}: checkpoint not found (did training finish?)")
    sums = read_checksums(directory)
    if filename not in sums:
        raise SigntrapError(f"{path}: no recorded hash in {CHECKSUMS}; refusing an unverified checkpoint")
    verify_sha256(path, sums[filename])
    payload = load(path)
    try:
        return build_model(payload, device), payload["meta"]
    except SigntrapError as exc:
        raise SigntrapError(f"{path}: {exc}") from None


def require_same_attack(meta: dict, cfg, trigger_spec: dict, where: Path) -> None:
    """Refuse a config whose attack or trigger disagrees with what the checkpoint was trained with.

    Metrics under another attack spec (a different target, source or trigger) would measure an attack the
    model never saw; the checkpoint's own metadata is the truth, an edited config.yaml is not."""
    trained = meta.get("attack") or {}
    wanted = {"kind": cfg.attack.kind, "source": cfg.attack.source, "target": cfg.attack.target}
    problems = [f"attack.{k} is {wanted[k]!r} in the config but {trained.get(k)!r} in the checkpoint"
                for k in wanted if k in trained and trained.get(k) != wanted[k]]
    stored = meta.get("trigger") or {}
    problems += [f"trigger {k} is {trigger_spec.get(k)!r} in the config but {stored.get(k)!r} in the checkpoint"
                 for k in sorted(stored) if stored.get(k) != trigger_spec.get(k)]
    if problems:
        raise SigntrapError(f"{where}: the config disagrees with the checkpoint: {'; '.join(problems[:3])}; "
                            "refusing to evaluate under another attack than the one it was trained with")


# ---------------------------------------------------------------- the provenance rule


def verify_provenance(model_dir: Path, meta: dict, cfg, exp, what: str = "checkpoint") -> None:
    """The one provenance rule, checked before any command uses a model (eval, defend, probe and its reference,
    export, requantize): the checkpoint `meta`, the run's config `cfg`, the data cache and the split of `exp` agree.

    - the data cache: every file matches its recorded SHA-256 (a corrupted cache is refused everywhere), and its
      data hash is the one the checkpoint was trained on;
    - the config: seed, split parameters (data.val_fraction), data settings, attack, trigger, model and epoch
      count are those the checkpoint was trained with (its meta records them); an edited config.yaml is refused;
    - the split: the sizes recorded in the run's provenance.json when it was trained;
    - the input size of the model is the data's.
    One line names the first disagreement; nothing is written before this passes.
    """
    from signtrap.data.cache import verify_cache

    model_dir = Path(model_dir)
    where = f"{model_dir}"
    verify_cache(exp.data)
    recorded = meta.get("data_hash")
    if not isinstance(recorded, str):
        raise SigntrapError(f"{where}: the {what} records no data hash; refusing to use it (train it again)")
    if recorded != exp.data.data_hash:
        raise SigntrapError(f"{where}: the {what} was trained on other data (data hash {recorded[:12]}…) than the run's "
                            f"config names ({exp.data.data_hash[:12]}…, {exp.data.path}); refusing to use it")
    size = meta.get("input_size")
    if size is not None and int(size) != exp.data.size:
        raise SigntrapError(f"{where}: the model takes {size}px inputs but the run's data is {exp.data.size}px")
    require_same_attack(meta, cfg, exp.trigger.spec, model_dir)
    epochs = meta.get("epoch")
    if isinstance(epochs, int) and epochs != cfg.train.epochs:
        raise SigntrapError(f"{where}: the {what} was trained for {epochs} epochs but the config says train.epochs="
                            f"{cfg.train.epochs}; the config was edited or the checkpoint swapped, refusing to use it")
    stored = meta.get("provenance")
    if isinstance(stored, dict):
        now, then = flat(cfg.provenance_view()), flat(stored)
        diffs = [f"{k} is {now.get(k)!r} in the config but {then.get(k)!r} in the checkpoint"
                 for k in sorted(set(now) & set(then)) if now[k] != then[k]]
        if diffs:
            raise SigntrapError(f"{where}: the config disagrees with the {what}: {'; '.join(diffs[:3])}; the config was "
                                "edited or the checkpoint swapped, refusing to use it")
    run_dir = model_dir if (model_dir / "provenance.json").is_file() else model_dir.parent
    splits = _json(run_dir / "provenance.json").get("splits")
    if isinstance(splits, dict) and splits != exp.splits.sizes():
        raise SigntrapError(f"{where}: the split differs from the one the model was trained on ({exp.splits.sizes()} now, "
                            f"{splits} when trained: seed or data.val_fraction changed); refusing to use it")


def _json(path: Path) -> dict:
    import json

    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}
