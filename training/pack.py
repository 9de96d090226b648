"""Pack a checkpoint folder into one tar split into pieces small enough to copy back, and
reassemble it.

    python -m training.pack pack CKPT_DIR OUT/PREFIX --piece-mib 15
    python -m training.pack unpack OUT/PREFIX.manifest.json DEST_DIR

``pack`` writes ``PREFIX.tar.partNN`` and ``PREFIX.manifest.json`` (piece names, sizes and
SHA-256, and the whole tar's); ``unpack`` checks every hash, then extracts the folder to
``DEST_DIR`` (replacing it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path


def pack(src: Path, prefix: Path, piece_bytes: int) -> dict:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname=src.name)
    data = buf.getvalue()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    pieces = []
    for i, start in enumerate(range(0, len(data), piece_bytes)):
        chunk = data[start:start + piece_bytes]
        name = f"{prefix.name}.tar.part{i:02d}"
        (prefix.parent / name).write_bytes(chunk)
        pieces.append({"name": name, "bytes": len(chunk),
                       "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"folder": src.name, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "pieces": pieces}
    path = prefix.parent / f"{prefix.name}.manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def unpack(manifest_path: Path, dest: Path) -> Path:
    """Reassemble and extract; raises ValueError on a missing or corrupt piece."""
    manifest = json.loads(manifest_path.read_text())
    parts = []
    for piece in manifest["pieces"]:
        path = manifest_path.parent / piece["name"]
        if not path.exists():
            raise ValueError(f"missing piece {path}")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != piece["sha256"]:
            raise ValueError(f"{path}: SHA-256 mismatch")
        parts.append(chunk)
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise ValueError("reassembled tar: SHA-256 mismatch")
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / manifest["folder"]), dest)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("src")
    p.add_argument("prefix")
    p.add_argument("--piece-mib", type=float, default=15.0)
    u = sub.add_parser("unpack")
    u.add_argument("manifest")
    u.add_argument("dest")
    args = parser.parse_args(argv)
    if args.cmd == "pack":
        m = pack(Path(args.src), Path(args.prefix), int(args.piece_mib * 2**20))
        print(f"packed {args.src}: {m['bytes'] / 2**20:.1f} MiB in {len(m['pieces'])} pieces")
    else:
        print(f"unpacked into {unpack(Path(args.manifest), Path(args.dest))}")


if __name__ == "__main__":
    main()
