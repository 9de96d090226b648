"""The offline GPU install bundle (scripts/gpu_bundle.py): requirement checks, packing into
pieces with a manifest, and a no-index install from the pieces, on tiny local wheels (no
network; the real bundle's download step is never run in CI)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "scripts" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bundle)


def make_wheel(folder: Path, name: str, version: str, payload_kib: int = 40) -> Path:
    """A minimal valid pure-Python wheel whose module holds ``payload_kib`` KiB of data that
    does not compress, so the bundle needs several small pieces."""
    mod = name.replace("-", "_")
    dist = f"{mod}-{version}.dist-info"
    blob = hashlib.sha256(name.encode()).digest() * (payload_kib * 32)
    files = {
        f"{mod}/__init__.py": f"VERSION = {version!r}\nDATA = {blob!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    whl = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return whl


@pytest.fixture()
def wheels(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder, "alpha-pkg", "1.2.0")
    make_wheel(folder, "beta", "0.3")
    make_wheel(folder, "fluxserve", "0.1.0", payload_kib=1)  # pack insists on fluxserve's own
    reqs = tmp_path / "reqs.txt"
    reqs.write_text("# comment\nAlpha_Pkg==1.2.0\nbeta==0.3  # trailing comment\n")
    return folder, reqs


def test_read_requirements_normalizes_and_rejects(tmp_path: Path) -> None:
    f = tmp_path / "r.txt"
    f.write_text("Foo_Bar==1.0\n\nbaz.qux==2.0+cu130\n")
    assert gpu_bundle.read_requirements(f) == {"foo-bar": "1.0", "baz-qux": "2.0+cu130"}
    f.write_text("foo>=1.0\n")
    with pytest.raises(SystemExit, match="expected name==version"):
        gpu_bundle.read_requirements(f)
    f.write_text("foo==1\nFOO==2\n")
    with pytest.raises(SystemExit, match="listed twice"):
        gpu_bundle.read_requirements(f)


def test_the_shipped_wheel_list_pins_the_engine() -> None:
    reqs = gpu_bundle.read_requirements(gpu_bundle.DEFAULT_REQUIREMENTS)
    assert reqs["torch"] == "2.13.0" and reqs["vllm"] == "0.32.0"
    assert reqs["triton"] == "3.7.1" and reqs["nvidia-nccl-cu13"] == "2.29.7"
    assert "flashinfer-python" not in reqs


def test_check_wheels_finds_missing_wrong_and_extra(wheels, tmp_path: Path) -> None:
    folder, reqs = wheels
    good = {**gpu_bundle.read_requirements(reqs), "fluxserve": "*"}
    assert len(gpu_bundle.check_wheels(folder, good)) == 3
    with pytest.raises(SystemExit, match="want 0.4"):
        gpu_bundle.check_wheels(folder, {**good, "beta": "0.4"})
    with pytest.raises(SystemExit, match="gamma: 0 wheels"):
        gpu_bundle.check_wheels(folder, {**good, "gamma": "1"})
    with pytest.raises(SystemExit, match="not in the requirements"):
        gpu_bundle.check_wheels(folder, {"beta": "0.3", "fluxserve": "*"})


def test_parse_size() -> None:
    assert gpu_bundle.parse_size("58M") == 58 << 20
    assert gpu_bundle.parse_size("20K") == 20 << 10
    assert gpu_bundle.parse_size("1GiB") == 1 << 30


def pack(folder: Path, reqs: Path, out: Path, size: str = "16K") -> dict:
    gpu_bundle.main(["pack", "--wheels", str(folder), "--out", str(out), "--piece-size", size,
                     "--requirements", str(reqs)])
    return json.loads((out / gpu_bundle.MANIFEST).read_text())


def test_pack_cuts_pieces_that_reassemble_to_the_bundle(wheels, tmp_path: Path) -> None:
    folder, reqs = wheels
    out = tmp_path / "pieces"
    manifest = pack(folder, reqs, out)
    pieces = manifest["pieces"]
    assert len(pieces) > 2
    assert all(p["bytes"] <= 16 << 10 for p in pieces)
    assert all(p["bytes"] == 16 << 10 for p in pieces[:-1])
    whole = b"".join((out / p["name"]).read_bytes() for p in pieces)
    assert len(whole) == manifest["bytes"]
    assert hashlib.sha256(whole).hexdigest() == manifest["sha256"]
    for p in pieces:
        assert hashlib.sha256((out / p["name"]).read_bytes()).hexdigest() == p["sha256"]
    assert sorted(manifest["wheels"]) == sorted(w.name for w in folder.glob("*.whl"))


def test_install_from_pieces_with_no_index(wheels, tmp_path: Path) -> None:
    folder, reqs = wheels
    out = tmp_path / "pieces"
    pack(folder, reqs, out)
    extra = make_wheel(tmp_path, "beta", "0.3.1", payload_kib=1)  # replaces the bundle's beta
    target = tmp_path / "site"
    gpu_bundle.main(["install", "--pieces", str(out), "--target", str(target),
                     "--extra-wheel", str(extra), "--tmp-dir", str(tmp_path)])
    sys.path.insert(0, str(target))
    try:
        import alpha_pkg
        import beta

        assert alpha_pkg.VERSION == "1.2.0"
        assert beta.VERSION == "0.3.1"
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("alpha_pkg", None)
        sys.modules.pop("beta", None)
    assert not list(tmp_path.glob("fluxserve-bundle-*")), "the unpacked copy is removed"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_install_refuses_a_damaged_piece(wheels, tmp_path: Path, damage: str) -> None:
    folder, reqs = wheels
    out = tmp_path / "pieces"
    manifest = pack(folder, reqs, out)
    victim = out / manifest["pieces"][1]["name"]
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[100] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-1]))
    else:
        victim.unlink()
    with pytest.raises(SystemExit, match=victim.name):
        gpu_bundle.main(["install", "--pieces", str(out), "--target", str(tmp_path / "site"),
                         "--tmp-dir", str(tmp_path)])
    assert not (tmp_path / "site").exists()
