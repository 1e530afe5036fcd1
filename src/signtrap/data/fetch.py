"""`signtrap data fetch`: download the GTSRB archives (torchvision's URLs and checksums), or say what to place where."""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from signtrap.errors import DataError
from signtrap.fileio import atomic_path
from signtrap.machine.progress import progress, say

BASE_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
ARCHIVES = {
    "GTSRB-Training_fixed.zip": "513f3c79a4c5141765e10e952eaa2478",
    "GTSRB_Final_Test_Images.zip": "c7e4e6327067d32654124b0fe9e82185",
    "GTSRB_Final_Test_GT.zip": "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}


def manual_instructions(root: Path) -> str:
    names = ", ".join(ARCHIVES)
    return (f"place {names} (from {BASE_URL}) in {root}, or the official GTSRB_Final_Training_Images.zip "
            f"with the two test zips; signtrap reads them without extracting")


def fetch(root: Path, timeout: float = 10.0) -> list[Path]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, md5 in ARCHIVES.items():
        path = root / name
        if path.is_file() and _md5(path) == md5:
            say(f"{path}: present, checksum ok")
            paths.append(path)
            continue
        try:
            _download(BASE_URL + name, path, md5, timeout)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(f"cannot download {name} ({reason}); {manual_instructions(root)}") from None
        paths.append(path)
    return paths


def _download(url: str, path: Path, md5: str, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, atomic_path(path) as tmp:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = progress(total, f"download {path.name}", unit="B")
        with open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
                bar.update(len(block))
        bar.close()
        if _md5(tmp) != md5:
            raise DataError(f"{url}: downloaded file fails its MD5 checksum; try again")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


