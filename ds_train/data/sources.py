"""Reading (docstring, code) pairs from local files, folders of them, or a hub dataset.

A pair is a record ``{"_id", "docstring", "code"}`` whose code is *linearized* (DESIGN.md §2).
Local inputs are JSON lines (``.jsonl``), JSON arrays (``.json``), Parquet (``.parquet``) and Arrow
(``.arrow``, IPC file or stream format, as ``datasets`` writes them) files, or folders searched
recursively in sorted order. A name that is not a local path and looks like ``owner/name`` is read
from the Hugging Face hub through ``datasets`` streaming.

Bad input never stops a stream: every bad record or file is skipped, counted by reason in a
``SkipCounter`` (with file and position logged) and reported at the end. Only when nothing at all
can be read does reading fail, with one clear ``ValueError``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
FIELDS = ("_id", "docstring", "code")
HUB_HINT = "download it elsewhere and pass local .jsonl/.json/.parquet/.arrow files or a folder of them"
LOGGED_PER_REASON = 5
FILE_REASONS = ("missing_file", "unreadable", "corrupt_file", "unsupported_file")  # seen by every reader


@dataclass(frozen=True)
class Pair:
    """One (docstring, linearized code) pair."""

    id: str
    docstring: str
    code: str


class SkipCounter:
    """Counts skipped records and files by reason; logs the first few of each reason with position."""

    def __init__(self, counts: dict[str, int] | None = None, *, quiet: bool = False) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.quiet = quiet

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped item; ``where`` is ``file:position`` (or a file / source name)."""
        self.counts[reason] += 1
        log = logger.warning if self.counts[reason] <= LOGGED_PER_REASON and not self.quiet else logger.debug
        log("skipped (%s) at %s%s", reason, where, f": {detail}" if detail else "")

    @property
    def total(self) -> int:
        """Number of skipped items over all reasons."""
        return sum(self.counts.values())

    def update(self, other: SkipCounter | dict[str, int]) -> None:
        """Add the counts of another counter (or a plain dict of counts)."""
        self.counts.update(other.counts if isinstance(other, SkipCounter) else other)

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain, sorted dict (JSON-friendly)."""
        return dict(sorted(self.counts.items()))

    def report(self) -> str:
        """One line: ``skipped N: reason=count, ...`` (or ``skipped 0``)."""
        if not self.counts:
            return "skipped 0"
        return f"skipped {self.total}: " + ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


# ---------------------------------------------------------------------------------------------- records


def validate(record: object, where: str, skips: SkipCounter) -> Pair | None:
    """The pair of one decoded record, or None (counted in ``skips``) when it is not a valid pair."""
    if not isinstance(record, dict):
        skips.skip("not_an_object", where, type(record).__name__)
        return None
    missing = [f for f in FIELDS if record.get(f) is None]
    if missing:
        skips.skip("missing_field", where, ", ".join(missing))
        return None
    pair_id = record["_id"]
    if isinstance(pair_id, int) and not isinstance(pair_id, bool):
        pair_id = str(pair_id)
    values = (pair_id, record["docstring"], record["code"])
    if not all(isinstance(v, str) for v in values):
        skips.skip("non_string_field", where)
        return None
    for name, value in zip(FIELDS, values):
        if not value.strip():
            skips.skip(f"empty_{name.lstrip('_')}", where)
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from "\udXXX" escapes
            skips.skip("bad_utf8", where, f"field {name}")
            return None
    return Pair(*values)


# ---------------------------------------------------------------------------------------------- files


def list_files(sources: Sequence[str | os.PathLike], skips: SkipCounter) -> list[Path]:
    """The pair files named by ``sources`` (files, or folders searched recursively, sorted)."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_walk(path, skips))
        else:
            skips.skip("missing_file", str(path))
    return files


def _walk(folder: Path, skips: SkipCounter) -> list[Path]:
    """Pair files under ``folder`` in sorted order; unreadable sub-folders are counted and skipped."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        skips.skip("unreadable", str(folder), err.strerror or str(err))
        return []
    found: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            found.extend(_walk(entry, skips))
        elif entry.is_file() and entry.name.endswith(SUFFIXES) and not entry.name.startswith("."):
            found.append(entry)
    return found


Keep = Callable[[int], bool]


def keep_all(position: int) -> bool:
    """The default record filter: every position."""
    return True


def iter_file(
    path: Path, skips: SkipCounter, start: int = 0, keep: Keep = keep_all
) -> Iterator[tuple[int, Pair]]:
    """``(position, pair)`` for every valid record of one file from record ``start`` on.

    Positions count records (lines, array items or rows), valid or not, from 0, so that a reader
    can resume a file at ``position + 1``. Records whose position ``keep`` rejects are passed over
    without being decoded or counted (a reader's share of a file, see ``stream``).
    """
    name = path.name
    try:
        if name.endswith(".jsonl"):
            yield from _iter_jsonl(path, skips, start, keep)
        elif name.endswith(".json"):
            yield from _iter_json(path, skips, start, keep)
        elif name.endswith((".parquet", ".arrow")):
            yield from _iter_table(path, skips, start, keep)
        else:
            skips.skip("unsupported_file", str(path), f"expected one of {', '.join(SUFFIXES)}")
    except OSError as err:
        skips.skip("unreadable", str(path), err.strerror or str(err))


def _iter_jsonl(path: Path, skips: SkipCounter, start: int, keep: Keep) -> Iterator[tuple[int, Pair]]:
    """JSON lines; blank lines count as positions but are not records."""
    with open(path, "rb") as f:
        for position, raw in enumerate(f):
            if position < start or not keep(position) or not raw.strip():
                continue
            where = f"{path}:{position + 1}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                skips.skip("bad_utf8", where, str(err))
                continue
            except json.JSONDecodeError as err:
                skips.skip("malformed_json", where, err.msg)
                continue
            pair = validate(record, where, skips)
            if pair is not None:
                yield position, pair


def _iter_json(path: Path, skips: SkipCounter, start: int, keep: Keep) -> Iterator[tuple[int, Pair]]:
    """One JSON array of records (or ``{"data": [...]}``)."""
    try:
        content = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        skips.skip("bad_utf8", str(path), str(err))
        return
    except json.JSONDecodeError as err:
        skips.skip("corrupt_file", str(path), f"not JSON: {err.msg} (line {err.lineno})")
        return
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        content = content["data"]
    if not isinstance(content, list):
        skips.skip("corrupt_file", str(path), "expected a JSON array of pair objects")
        return
    for position in range(start, len(content)):
        if not keep(position):
            continue
        pair = validate(content[position], f"{path}:[{position}]", skips)
        if pair is not None:
            yield position, pair


def _iter_table(path: Path, skips: SkipCounter, start: int, keep: Keep) -> Iterator[tuple[int, Pair]]:
    """Rows of a Parquet or Arrow file, read batch by batch; a corrupt file stops where it breaks."""
    position = 0
    try:
        for batch in _record_batches(path):
            if position + batch.num_rows <= start:
                position += batch.num_rows
                continue
            columns = [c for c in FIELDS if c in batch.schema.names]
            rows = batch.select(columns).to_pylist()
            for row in rows:
                if position >= start and keep(position):
                    pair = validate(row, f"{path}:row {position}", skips)
                    if pair is not None:
                        yield position, pair
                position += 1
    except (pa.ArrowException, ValueError) as err:
        skips.skip("corrupt_file", f"{path}:row {position}", str(err).splitlines()[0] if str(err) else "")


def _record_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """Record batches of a Parquet file, or of an Arrow IPC file / stream."""
    if path.name.endswith(".parquet"):
        yield from pq.ParquetFile(path).iter_batches(batch_size=1024)
        return
    with pa.memory_map(str(path), "r") as source:
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
        yield from batches


# ---------------------------------------------------------------------------------------------- hub


def is_hub_name(source: str | os.PathLike) -> bool:
    """True for ``owner/name`` strings that are not local paths."""
    text = str(source)
    parts = text.split("/")
    return not Path(text).exists() and len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


def iter_hub(
    name: str, skips: SkipCounter, start: int = 0, keep: Keep = keep_all, split: str = "train"
) -> Iterator[tuple[int, Pair]]:
    """``(position, pair)`` from a hub dataset through ``datasets`` streaming.

    Resuming at ``start`` streams past the records before it (``IterableDataset.skip``); a stream
    that breaks later on is counted (``unreadable``) and ends there.

    Raises:
        ValueError: the hub cannot be reached (offline) or the dataset cannot be opened.
    """
    import datasets  # imported here: slow, and only needed for hub sources

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        rows = iter(stream.skip(start) if start else stream)
        first = next(rows, None)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types for "cannot reach the hub"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"cannot stream hub dataset {name!r} ({reason}); offline? {HUB_HINT}") from None
    if first is None:
        return
    position = start
    try:
        for position, row in enumerate(itertools.chain([first], rows), start=start):
            if not keep(position):
                continue
            pair = validate(row, f"{name}:row {position}", skips)
            if pair is not None:
                yield position, pair
    except (OSError, ValueError) as err:  # a connection lost mid-stream ends this source, counted
        skips.skip("unreadable", f"{name}:row {position}", str(err).splitlines()[0] if str(err) else "")


# ---------------------------------------------------------------------------------------------- all


def read_pairs(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    skips: SkipCounter | None = None,
    *,
    keep: Keep = keep_all,
    require_any: bool = True,
) -> Iterator[Pair]:
    """Every valid pair of ``sources`` (files, folders, hub names) in order; bad input is counted.

    ``keep`` selects records by their position inside their file (a reader's share).

    Raises:
        ValueError: (with ``require_any``) no source could be read, or none held a valid pair.
    """
    skips = skips if skips is not None else SkipCounter()
    names = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    count = 0
    for _, pair in iter_sources(names, skips, keep):
        count += 1
        yield pair
    if count == 0 and require_any:
        raise ValueError(f"no valid pairs in {', '.join(map(str, names))} ({skips.report()})")
    if skips.total:
        logger.warning("read %d pairs from %s; %s", count, ", ".join(map(str, names)), skips.report())


def iter_unit(
    unit: str, skips: SkipCounter, start: int = 0, keep: Keep = keep_all
) -> Iterator[tuple[int, Pair]]:
    """``(position, pair)`` of one reading unit: a local file or a hub dataset name."""
    if is_hub_name(unit):
        return iter_hub(unit, skips, start, keep)
    return iter_file(Path(unit), skips, start, keep)


def list_units(sources: Sequence[str | os.PathLike], skips: SkipCounter) -> list[str]:
    """The reading units of ``sources``: hub names as they are, local files and folders expanded."""
    units: list[str] = []
    for source in sources:
        units.extend([str(source)] if is_hub_name(source) else map(str, list_files([source], skips)))
    return units


def iter_sources(
    names: Iterable[str | os.PathLike], skips: SkipCounter, keep: Keep = keep_all
) -> Iterator[tuple[str, Pair]]:
    """``(source, pair)`` over hub names and local files in the given order."""
    for unit in list_units(list(names), skips):
        for _, pair in iter_unit(unit, skips, keep=keep):
            yield unit, pair
