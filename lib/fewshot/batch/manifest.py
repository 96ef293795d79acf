"""The batch manifest: one JSON line per finished case, appended and fsynced as each case ends.

``<output>/manifest.jsonl`` holds ``run`` lines (a run's start and end: bank generation, settings,
counts) and ``case`` lines (status ``done`` or ``failed``, output path, input stamp and sha256,
bank generation, settings hash, timings, error). A case's last line is its state. A line is
written whole or, after a crash mid-write, not at all: a torn last line is dropped on the next
open, never glued to the next record. Only one run writes a manifest at a time (``flock``).

What a re-run skips (``Manifest.plan``): a case whose last record is ``done``, whose output still
exists, whose input is unchanged (same size and mtime, or else the same sha256) and that was
segmented with the same settings against the same bank generation. When the bank changed, finished
cases are segmented again by default, so the whole output comes from one bank; ``keep_older_bank``
keeps them (each record names its own generation). A ``failed`` case is retried, except one whose
input the engine could not use (``retry: false``, e.g. a corrupt file) while that input is unchanged.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from fewshot.batch.inputs import Case, input_stamp, is_url
from fewshot.files import content_sha256

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.jsonl"


class ManifestError(RuntimeError):
    pass


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Plan:
    """What a run does with each case: segment it (with the reason) or skip it."""

    todo: list[Case] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # case id -> why it is segmented
    skipped: list[Case] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for reason in self.reasons.values():
            out[reason] = out.get(reason, 0) + 1
        return out


class Manifest:
    """Read the state of every case, then append records; holds the output folder's lock."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / MANIFEST_NAME
        self.cases: dict[str, dict] = {}  # case id -> its last record
        self.runs: list[dict] = []
        self._file = None

    def open(self) -> "Manifest":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            self._file = None
            raise ManifestError(f"{self.path}: another batch is writing to {self.output_dir}") from None
        self._file.seek(0)
        data = self._file.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A line cut short by a crash: its case was not recorded, so it is simply done again.
            logger.warning("%s: dropping a torn last line (%d bytes)", self.path, len(data) - end)
            self._file.truncate(end)
            os.fsync(self._file.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: unreadable line skipped", self.path, n)
                continue
            if record.get("kind") == "case":
                self.cases[record["case"]] = record
            elif record.get("kind") == "run":
                self.runs.append(record)
        return self

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None

    def __enter__(self) -> "Manifest":
        return self.open() if self._file is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def append(self, record: Mapping) -> None:
        """One whole line, on disk before this returns: Ctrl-C or a crash never tears a record."""
        if self._file is None:
            raise ManifestError("manifest is not open")
        line = json.dumps(record, sort_keys=True, default=str).encode() + b"\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        if record.get("kind") == "case":
            self.cases[record["case"]] = dict(record)
        elif record.get("kind") == "run":
            self.runs.append(dict(record))

    def output_path(self, case: Case) -> Path:
        return self.output_dir / f"{case.case_id}.nii.gz"

    def plan(self, cases: Iterable[Case], generation: str, settings: str,
             keep_older_bank: bool = False, retry_failed: bool = False) -> Plan:
        plan = Plan()
        for case in cases:
            reason = self._why(case, generation, settings, keep_older_bank, retry_failed)
            if reason:
                plan.todo.append(case)
                plan.reasons[case.case_id] = reason
            else:
                plan.skipped.append(case)
        return plan

    def _why(self, case: Case, generation: str, settings: str, keep_older_bank: bool, retry_failed: bool) -> str:
        """Why ``case`` must be segmented in this run ("" to skip it)."""
        last = self.cases.get(case.case_id)
        if last is None:
            return "new"
        if last.get("input") != case.path:
            return "another input file"
        if last.get("status") == "failed" and not last.get("input_stamp"):
            return "failed before"  # it never got to its input (timed out, or its worker died first)
        try:
            if not _unchanged(last, case.path):
                return "input changed"
        except OSError as exc:
            return f"input unreadable ({exc.strerror or exc})"  # the worker records the error
        if last.get("status") == "failed":
            return "failed before" if retry_failed or last.get("retry", True) else ""
        if last.get("settings") != settings:
            return "other settings"
        if last.get("bank_generation") != generation and not keep_older_bank:
            return "bank changed"
        if not (self.output_dir / last.get("output", "")).is_file():
            return "output missing"
        return ""


def _unchanged(record: Mapping, path: str) -> bool:
    if record.get("input_stamp") == input_stamp(path):
        return True
    if is_url(path):  # a series' stamp is its instances' UIDs: nothing more to compare without downloading it
        return False
    return bool(record.get("input_sha256")) and content_sha256(path) == record["input_sha256"]
