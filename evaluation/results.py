"""Results on disk: an append-only JSONL of finished items (what makes a run resumable), and
CSV / JSON writers for summaries. Shared by the evaluation commands."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any


class JsonlStore:
    """Records appended one JSON object per line, flushed and fsynced as they come, so an
    interrupted run loses at most the record being written (a torn last line is skipped on
    reading).

    `key` maps a record to its identity, e.g. ``(task, length, policy, index)``; a later record
    with the same key replaces an earlier one (a retried failure)."""

    def __init__(self, path: str | Path, key: Callable[[dict], Hashable]):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[Hashable, dict]:
        records: dict[Hashable, dict] = {}
        if not self.path.exists():
            return records
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn line of an interrupted write
                records[self.key(record)] = record
        return records

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


class RunFolderError(ValueError):
    """An output folder holds a run made with other settings."""


def check_run_folder(out: str | Path, fingerprint: dict) -> None:
    """Record `fingerprint` (the settings that make results comparable) in ``out/run.json``, or
    check it against the one recorded there. Raises `RunFolderError` naming the settings that
    differ, so that a resumed run never mixes results of two set-ups."""
    run_file = Path(out) / "run.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint.keys() | previous.keys()
                             if previous.get(k) != fingerprint.get(k))
            raise RunFolderError(f"{out} holds a run with other settings ({', '.join(changed)}); "
                                 "choose another --out or remove that folder")
    else:
        write_json(run_file, fingerprint)


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]],
              columns: list[str] | None = None) -> Path:
    """Write dict rows as CSV (columns: `columns`, else the keys in first-seen order)."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned columns (numbers as given, None as '-')."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
