"""Checkpoints: a state dict plus what is needed to rebuild and use the model, loaded with weights_only=True."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from signtrap.errors import SigntrapError
from signtrap.fileio import atomic_path, read_json, verify_sha256, write_json
from signtrap.models import create_model

CHECKSUMS = "checksums.json"


def save(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise SigntrapError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, or a pickle that is not plain weights
        raise SigntrapError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


def model_payload(model: nn.Module, meta: dict) -> dict:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"state_dict": state, "meta": meta}


def build_model(payload: dict, device: str | torch.device = "cpu") -> nn.Module:
    meta = payload["meta"]
    model = create_model(meta["model_name"], num_classes=meta["num_classes"], dropout=meta.get("dropout", 0.0))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise SigntrapError(f"checkpoint does not match model '{meta['model_name']}': {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


def record_checksum(directory: Path, filename: str) -> None:
    """Store the SHA-256 of `directory/filename` in directory/checksums.json."""
    from signtrap.fileio import sha256_file

    sums_path = Path(directory) / CHECKSUMS
    sums = read_json(sums_path) if sums_path.is_file() else {}
    sums[filename] = sha256_file(Path(directory) / filename)
    write_json(sums_path, sums)


def verified_load(directory: Path, filename: str = "model.pt", device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a model checkpoint after checking it against the run's recorded hash."""
    directory = Path(directory)
    path = directory / filename
    if not path.is_file():
        raise SigntrapError(f"{path}: checkpoint not found (did training finish?)")
    sums_path = directory / CHECKSUMS
    if not sums_path.is_file() or filename not in read_json(sums_path):
        raise SigntrapError(f"{path}: no recorded hash in {CHECKSUMS}; refusing an unverified checkpoint")
    verify_sha256(path, read_json(sums_path)[filename])
    payload = load(path)
    return build_model(payload, device), payload["meta"]
