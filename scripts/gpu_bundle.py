#!/usr/bin/env python3
"""Offline install bundle of vLLM (GPU) + fluxserve for air-gapped GPU hosts.

Three steps; the first two run on a machine with access to a package index, the last on the
GPU host, which needs nothing but its own Python (this script uses the standard library only):

1. ``download``: the exact wheels listed in a requirements file (default
   ``scripts/gpu-wheels-cp312.txt``: torch, triton, vLLM and the pure-Python packages a CUDA host
   image lacks) for a target Python version and platform, plus a wheel of fluxserve built from
   this checkout. Every file is checked: one wheel per listed ``name==version``, nothing else.
2. ``pack``: one uncompressed tar of those wheels (wheels are zip files already), written
   straight into pieces of at most ``--piece-size`` bytes, with a JSON manifest (SHA-256 of each
   piece and of the whole) so that pieces can travel over links with a size limit.
3. ``install``: check every piece, reassemble them as a stream (no second copy on disk), and
   ``pip install --no-index --no-deps`` every wheel into ``--target DIR`` (then put DIR first on
   ``PYTHONPATH``) or into a virtual environment ``--venv DIR`` that also sees the host's own
   site-packages (the host image provides CUDA libraries, numpy, transformers, ...).

Usage (see docs/gpu.md)::

    python scripts/gpu_bundle.py download --dest build/gpu-bundle/wheels
    python scripts/gpu_bundle.py pack --wheels build/gpu-bundle/wheels \\
        --out build/gpu-bundle/pieces --piece-size 52M
    # on the GPU host, with the pieces directory copied over:
    python3 gpu_bundle.py install --pieces pieces --target /opt/fluxserve-site
    export PYTHONPATH=/opt/fluxserve-site VLLM_USE_FLASHINFER_SAMPLER=0

Errors: exits with a message (``SystemExit``) on a missing or extra wheel, a piece whose size or
SHA-256 differs from the manifest, or a failed pip call.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REQUIREMENTS = ROOT / "scripts" / "gpu-wheels-cp312.txt"
MANIFEST = "MANIFEST.json"
BUNDLE_NAME = "fluxserve-gpu-bundle"


# ----------------------------------------------------------------------------- requirements
def read_requirements(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` from ``name==version`` lines (``#`` comments allowed)."""
    reqs: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise SystemExit(f"{path}:{n}: expected name==version, got {raw!r}")
        name = normalize(m.group(1))
        if name in reqs:
            raise SystemExit(f"{path}:{n}: {name} listed twice")
        reqs[name] = m.group(2)
    return reqs


def normalize(name: str) -> str:
    """PEP 503 name normalization (``Foo_Bar`` and ``foo-bar`` are one project)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """``(normalized name, version)`` of a wheel file name (PEP 427)."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        raise SystemExit(f"not a wheel file name: {filename}")
    return normalize(parts[0]), parts[1]


def platform_args(arch: str, glibc_max: int) -> list[str]:
    # pip matches manylinux tags exactly: list every glibc minor a wheel may be tagged with.
    plats = [f"manylinux_2_{n}_{arch}" for n in range(5, glibc_max + 1)]
    plats += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}",
              f"linux_{arch}"]
    out: list[str] = []
    for p in plats:
        out += ["--platform", p]
    return out


# ----------------------------------------------------------------------------- download
def cmd_download(args) -> None:
    reqs = read_requirements(args.requirements)
    dest = args.dest
    dest.mkdir(parents=True, exist_ok=True)
    py = args.python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", args.python_version, "--implementation", "cp",
           "--abi", f"cp{py}", "--abi", "abi3", "--abi", "none",
           *platform_args(args.arch, args.glibc_max), "-d", str(dest), "-r", str(args.requirements)]
    print("+", " ".join(cmd[:12]), "...", flush=True)
    subprocess.run(cmd, check=True)  # files already in dest are reused, not fetched again
    if not args.no_fluxserve:
        for old in dest.glob("fluxserve-*.whl"):
            old.unlink()
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-w", str(dest), str(ROOT)], check=True)
        reqs["fluxserve"] = "*"
    check_wheels(dest, reqs)


def check_wheels(dest: Path, reqs: dict[str, str]) -> list[Path]:
    """Exactly one wheel per requirement at its pinned version ("*": any), nothing else."""
    found: dict[str, list[Path]] = {}
    for whl in sorted(dest.glob("*.whl")):
        name, _ = wheel_name_version(whl.name)
        found.setdefault(name, []).append(whl)
    problems = []
    for name, version in reqs.items():
        files = found.get(name, [])
        if len(files) != 1:
            problems.append(f"{name}: {len(files)} wheels ({[f.name for f in files]})")
        elif version != "*" and wheel_name_version(files[0].name)[1] != version:
            problems.append(f"{name}: want {version}, have {files[0].name}")
    extra = sorted(set(found) - set(reqs))
    if extra:
        problems.append(f"wheels not in the requirements: {extra}")
    if problems:
        raise SystemExit("wheel folder does not match the requirements:\n  " +
                         "\n  ".join(problems))
    wheels = [f for files in found.values() for f in files]
    total = sum(f.stat().st_size for f in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.0f} MiB, in {dest}")
    return wheels


# ----------------------------------------------------------------------------- pack
def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)i?B?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size like 58M expected, got {text!r}")
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]


class _PieceWriter(io.RawIOBase):
    """A write-only stream that cuts what it is given into files of at most ``size`` bytes."""

    def __init__(self, out_dir: Path, stem: str, size: int) -> None:
        self.out_dir, self.stem, self.size = out_dir, stem, size
        self.pieces: list[dict] = []
        self.whole = hashlib.sha256()
        self._f = None
        self._hash = None
        self._left = 0

    def writable(self) -> bool:
        return True

    def _next_piece(self) -> None:
        self._close_piece()
        name = f"{self.stem}.{len(self.pieces):03d}"
        self._f = open(self.out_dir / name, "wb")  # noqa: SIM115 (closed in _close_piece)
        self._hash = hashlib.sha256()
        self._left = self.size
        self.pieces.append({"name": name, "bytes": 0, "sha256": None})

    def _close_piece(self) -> None:
        if self._f is not None:
            self._f.close()
            self.pieces[-1]["sha256"] = self._hash.hexdigest()
            self._f = None

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self._f is None or self._left == 0:
                self._next_piece()
            chunk = view[:self._left]
            self._f.write(chunk)
            self._hash.update(chunk)
            self.whole.update(chunk)
            self._left -= len(chunk)
            self.pieces[-1]["bytes"] += len(chunk)
            view = view[len(chunk):]
        return len(data)

    def close(self) -> None:
        self._close_piece()
        super().close()


def cmd_pack(args) -> None:
    wheels = sorted(args.wheels.glob("*.whl"))
    if args.requirements is not None:
        reqs = read_requirements(args.requirements)
        reqs.setdefault("fluxserve", "*")
        wheels = check_wheels(args.wheels, reqs)
    if not wheels:
        raise SystemExit(f"no wheels in {args.wheels}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{BUNDLE_NAME}.tar.*"):
        old.unlink()
    writer = _PieceWriter(out, f"{BUNDLE_NAME}.tar", args.piece_size)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for whl in wheels:
            tar.add(whl, arcname=f"wheels/{whl.name}")
    writer.close()
    manifest = {"bundle": f"{BUNDLE_NAME}.tar", "sha256": writer.whole.hexdigest(),
                "bytes": sum(p["bytes"] for p in writer.pieces), "pieces": writer.pieces,
                "wheels": [w.name for w in wheels]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(writer.pieces)} pieces of <= {args.piece_size / 2**20:.0f} MiB, "
          f"{manifest['bytes'] / 2**20:.0f} MiB in all, in {out} (manifest: {out / MANIFEST})")


# ----------------------------------------------------------------------------- install
class _Concat(io.RawIOBase):
    """Read the pieces one after the other, checking each piece's SHA-256 as it is read."""

    def __init__(self, paths: list[Path], digests: list[str]) -> None:
        self.paths, self.digests = paths, digests
        self.i = -1
        self._f = None
        self._hash = None
        self.whole = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def _advance(self) -> bool:
        if self._f is not None:
            self._f.close()
            if self._hash.hexdigest() != self.digests[self.i]:
                raise SystemExit(f"{self.paths[self.i]}: SHA-256 differs from the manifest")
        self.i += 1
        if self.i >= len(self.paths):
            self._f = None
            return False
        self._f = open(self.paths[self.i], "rb")  # noqa: SIM115 (closed in _advance)
        self._hash = hashlib.sha256()
        return True

    def readinto(self, buf) -> int:
        if self._f is None and not self._advance():
            return 0
        while True:
            n = self._f.readinto(buf)
            if n:
                self._hash.update(memoryview(buf)[:n])
                self.whole.update(memoryview(buf)[:n])
                return n
            if not self._advance():
                return 0


def cmd_install(args) -> None:
    pieces_dir = args.pieces
    manifest = json.loads((pieces_dir / MANIFEST).read_text())
    paths = [pieces_dir / p["name"] for p in manifest["pieces"]]
    for p, meta in zip(paths, manifest["pieces"], strict=True):
        if not p.is_file():
            raise SystemExit(f"missing piece {p}")
        if p.stat().st_size != meta["bytes"]:
            raise SystemExit(f"{p}: {p.stat().st_size} bytes, manifest says {meta['bytes']}")
    # Check every piece before unpacking anything: a damaged piece then stops the install with
    # its name, not with a tar error halfway through (one extra read of the pieces).
    whole = hashlib.sha256()
    for p, meta in zip(paths, manifest["pieces"], strict=True):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                whole.update(chunk)
        if h.hexdigest() != meta["sha256"]:
            raise SystemExit(f"{p}: SHA-256 differs from the manifest")
    if whole.hexdigest() != manifest["sha256"]:
        raise SystemExit("the pieces together: SHA-256 differs from the manifest")
    work = Path(tempfile.mkdtemp(prefix="fluxserve-bundle-", dir=args.tmp_dir))
    try:
        stream = _Concat(paths, [p["sha256"] for p in manifest["pieces"]])
        with tarfile.open(fileobj=io.BufferedReader(stream, 1 << 20), mode="r|") as tar:
            tar.extractall(work, filter="data")
        if stream.whole.hexdigest() != manifest["sha256"]:
            raise SystemExit("reassembled bundle: SHA-256 differs from the manifest")
        wheels = sorted((work / "wheels").glob("*.whl"))
        if sorted(w.name for w in wheels) != sorted(manifest["wheels"]):
            raise SystemExit("the bundle's wheels differ from the manifest's list")
        pip = [sys.executable, "-m", "pip"]
        if args.venv is not None:
            if not (args.venv / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                                str(args.venv)], check=True)
            pip = [str(args.venv / "bin" / "python"), "-m", "pip"]
            dest = []
        else:
            dest = ["--target", str(args.target), "--upgrade"]
        base = [*pip, "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                "--disable-pip-version-check", "-q", *dest]
        subprocess.run([*base, *map(str, wheels)], check=True)
        if args.extra_wheel:  # a second call, so that these replace the bundle's copies
            subprocess.run([*base, "--upgrade", "--force-reinstall", *map(str, args.extra_wheel)]
                           if args.venv is not None else [*base, *map(str, args.extra_wheel)],
                           check=True)
            wheels += args.extra_wheel
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.venv is not None:
        print(f"installed {len(wheels)} wheels into the venv {args.venv}")
    else:
        print(f"installed {len(wheels)} wheels into {args.target}; now:\n"
              f"  export PYTHONPATH={args.target}${{PYTHONPATH:+:$PYTHONPATH}} "
              f"VLLM_USE_FLASHINFER_SAMPLER=0")


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("download", help="download the wheels and build fluxserve's wheel")
    d.add_argument("--requirements", type=Path, default=DEFAULT_REQUIREMENTS)
    d.add_argument("--dest", type=Path, required=True)
    d.add_argument("--python-version", default="3.12")
    d.add_argument("--arch", default="x86_64")
    d.add_argument("--glibc-max", type=int, default=39,
                   help="highest manylinux_2_N tag to accept (the host's glibc minor or lower)")
    d.add_argument("--no-fluxserve", action="store_true", help="do not build fluxserve's wheel")
    d.set_defaults(func=cmd_download)

    k = sub.add_parser("pack", help="tar the wheels into pieces with a manifest")
    k.add_argument("--wheels", type=Path, required=True)
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--piece-size", type=parse_size, default=parse_size("52M"))
    k.add_argument("--requirements", type=Path, default=DEFAULT_REQUIREMENTS,
                   help="check the folder against this list first")
    k.set_defaults(func=cmd_pack)

    i = sub.add_parser("install", help="check, reassemble and pip-install a bundle, no index")
    i.add_argument("--pieces", type=Path, required=True, help="folder with the pieces and "
                   f"{MANIFEST}")
    where = i.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", type=Path, help="pip --target folder (put it on PYTHONPATH)")
    where.add_argument("--venv", type=Path, help="venv (created with --system-site-packages)")
    i.add_argument("--extra-wheel", type=Path, action="append",
                   help="a wheel to install after the bundle, over its copy "
                   "(e.g. a newer fluxserve)")
    i.add_argument("--tmp-dir", type=Path, default=None, help="where to unpack (default: $TMPDIR)")
    i.set_defaults(func=cmd_install)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
