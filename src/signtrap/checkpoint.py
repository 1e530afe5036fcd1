"""Checkpoints: a state dict plus what is needed to rebuild and use the model, loaded with weights_only=True."""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

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
