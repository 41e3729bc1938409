"""Detect defects in many reference/inspected pairs listed in a CSV file.

    python -m experiments.run_batch --pairs=pairs.csv --output_dir=outputs/batch \\
        --teacher_weights=../shared/weights/resnet18_imagenet_bnfolded

The CSV file has a header row with the columns ``reference`` and
``inspected`` and, optionally, ``name`` (by default the inspected file's name
without extension). Relative paths are read from the CSV file's folder.

Pairs of similar size go through ``tsjax.batch.detect_batch``, ``--batch_size``
at a time; pairs with a side above ``--tile_above`` px go through
``tsjax.tiling.detect_tiled``. Each pair's results go to
``OUTPUT_DIR/pairs/NAME/`` (``detections.json``, ``defect_map.npy``,
``mask.png`` and, per ``--figures``, the figures of ``experiments.run``).
``OUTPUT_DIR/summary.csv`` has one row per pair and is rewritten after every
batch, so an interrupted run keeps what it finished; ``--resume`` then skips
those pairs. A pair whose files cannot be read is recorded as failed and the
run goes on. The exit status is 1 when any pair failed.

The detection settings are the flags of ``experiments.run`` (``--helpfull``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging as python_logging
import os
import re
import time
import warnings
from typing import NamedTuple

import jax
import numpy as np
import tqdm
from absl import app, flags, logging

from experiments import run as single
from tsjax import batch, hub, io, tiling
from tsjax.report import write_detection

flags.DEFINE_string("pairs", None, "CSV file with the columns reference, inspected and optionally name.")
flags.DEFINE_integer("batch_size", 16, "Pairs per compiled call.", lower_bound=1)
flags.DEFINE_integer(
    "tile_above",
    2048,
    "Pairs whose inspected image has a side above this many px run tile by tile (tsjax.tiling).",
    lower_bound=64,
)
flags.DEFINE_integer("tile_size", tiling.DEFAULT_TILE_SIZE, "Interior side of a tile in px.", lower_bound=64)
flags.DEFINE_enum(
    "figures",
    "flagged",
    ["none", "flagged", "all"],
    "Draw the PNG figures for no pair, for pairs with at least one blob, or for every pair.",
)
flags.DEFINE_bool("resume", False, "Keep the pairs that an earlier run in --output_dir finished and run the others.")

FLAGS = flags.FLAGS

SUMMARY_FILE = "summary.csv"
PAIRS_DIR = "pairs"
SUMMARY_COLUMNS = (
    "name",
    "status",
    "blobs",
    "max_score",
    "shift_dy",
    "shift_dx",
    "correlation",
    "compared_fraction",
    "tiled",
    "reference",
    "inspected",
    "error",
)
# A name becomes a folder name, so it cannot contain a path separator or
# start with a dot.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
# Flags of experiments.run that name a single pair or the demo.
_SINGLE_PAIR_FLAGS = ("reference", "inspected", "demo")


class PairEntry(NamedTuple):
    """One row of the pair list: the output name and the two image paths."""

    name: str
    reference: str
    inspected: str


def read_pair_list(path: str) -> list[PairEntry]:
    """Read and check the CSV pair list.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the header lacks ``reference`` or ``inspected``, a row
        has an empty path, a name is not a plain file name, two pairs share
        a name, or the list is empty. The message names the row and the fix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pair list {path!r} does not exist; pass a CSV file with --pairs.")
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [column.strip() for column in reader.fieldnames or []]
        lowered = [column.lower() for column in columns]
        missing = [column for column in ("reference", "inspected") if column not in lowered]
        if missing:
            separator = " Columns must be separated by commas." if any(";" in column for column in columns) else ""
            raise ValueError(
                f"{path}: the header row must name the columns reference and inspected (and optionally "
                f"name); it lacks {', '.join(missing)}. Found: {', '.join(columns) or 'no header'}.{separator}"
            )
        entries, rows_of = [], {}
        for row_number, row in enumerate(reader, start=2):
            row = {str(key).strip().lower(): (value or "").strip() for key, value in row.items()}
            reference, inspected = row.get("reference", ""), row.get("inspected", "")
            if not reference or not inspected:
                raise ValueError(f"{path}, row {row_number}: reference and inspected must both be given.")
            name = row.get("name") or os.path.splitext(os.path.basename(inspected))[0]
            if not _NAME_PATTERN.fullmatch(name):
                raise ValueError(
                    f"{path}, row {row_number}: name {name!r} cannot be a folder name; use letters, digits "
                    "and . _ + - only (set the name column)."
                )
            if name in rows_of:
                raise ValueError(
                    f"{path}: rows {rows_of[name]} and {row_number} both have the name {name!r}; give each "
                    "pair its own name in a name column."
                )
            rows_of[name] = row_number
            entries.append(
                PairEntry(
                    name,
                    os.path.normpath(os.path.join(folder, reference)),
                    os.path.normpath(os.path.join(folder, inspected)),
                )
            )
    if not entries:
        raise ValueError(f"{path} lists no pairs; add one row per pair below the header.")
    return entries


def _check_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise app.UsageError("--resume keeps earlier results and --overwrite replaces them; pass only one.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(f"output folder {output_dir!r} is a file, not a folder; choose another --output_dir.")
    earlier = [
        name for name in (SUMMARY_FILE, PAIRS_DIR) if os.path.exists(os.path.join(output_dir, name))
    ]
    if earlier and not (resume or overwrite):
        raise FileExistsError(
            f"{output_dir!r} already contains the results of a batch run ({', '.join(earlier)}); pass --resume "
            "to finish that run, --overwrite to run every pair again, or choose another --output_dir."
        )


def _finished_record(output_dir: str, entry: PairEntry) -> dict | None:
    """Return the detections.json of an earlier run of ``entry``, or None."""
    path = os.path.join(output_dir, PAIRS_DIR, entry.name, "detections.json")
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        record = json.load(handle)
    earlier = record.get("pair", {})
    if (earlier.get("reference"), earlier.get("inspected")) != (entry.reference, entry.inspected):
        raise ValueError(
            f"{path} contains the results of pair {entry.name!r} for other images "
            f"({earlier.get('reference')}, {earlier.get('inspected')}); rename the pair in the list or "
            "choose another --output_dir."
        )
    return record


def _summary_row(entry: PairEntry, record: dict | None, error: str = "") -> dict:
    row = {column: "" for column in SUMMARY_COLUMNS}
    row.update(name=entry.name, reference=entry.reference, inspected=entry.inspected)
    if record is None:
        row.update(status="failed", error=error)
        return row
    row.update(
        status="ok",
        blobs=len(record["blobs"]),
        max_score=f"{record['max_score']:.4f}",
        shift_dy=f"{record['shift'][0]:.3f}",
        shift_dx=f"{record['shift'][1]:.3f}",
        correlation=f"{record['alignment']['correlation']:.4f}",
        compared_fraction=f"{record['compared_fraction']:.4f}",
        tiled=record["tiled"],
    )
    return row


def _write_summary(output_dir: str, entries: list[PairEntry], rows: dict[str, dict]) -> None:
    # Written to a temporary file and renamed, so that an interruption never
    # leaves a half-written summary.
    path = os.path.join(output_dir, SUMMARY_FILE)
    with open(path + ".partial", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[entry.name] for entry in entries if entry.name in rows)
    os.replace(path + ".partial", path)


def _load_pair(entry: PairEntry) -> tuple[np.ndarray, np.ndarray]:
    reference = io.load_image(entry.reference)
    inspected = io.load_image(entry.inspected)
    single.check_pair_shapes(reference.shape, inspected.shape, pair=f"pair {entry.name}: ", record=SUMMARY_FILE)
    return reference, inspected


class _Runner:
    """Runner of the pending pairs: batches them by size bucket and writes their results."""

    def __init__(self, output_dir: str, entries: list[PairEntry], rows: dict, progress: tqdm.tqdm, context: dict):
        self.output_dir = output_dir
        self.entries = entries
        self.rows = rows
        self.progress = progress
        self.context = context
        self.pending: dict[tuple[int, int], list[tuple[PairEntry, np.ndarray, np.ndarray]]] = {}
        self.traces = batch.trace_counts()
        # Pairs with at least one blob, resumed ones included, for the progress bar.
        self.flagged = sum(1 for row in rows.values() if row["status"] == "ok" and row["blobs"] > 0)

    def add(self, entry: PairEntry, reference: np.ndarray, inspected: np.ndarray) -> None:
        if max(inspected.shape) > FLAGS.tile_above:
            try:
                detection = tiling.detect_tiled(
                    reference, inspected, **self.context["detect_args"], tile_size=FLAGS.tile_size
                )
            except ValueError as error:
                # detect_tiled raises this, for example, for a student other than ridge
                # without fitted states.
                self.fail(entry, error)
                return
            self._write(entry, inspected, detection, tiled=True)
            _write_summary(self.output_dir, self.entries, self.rows)
            return
        bucket = batch.bucket_shape(inspected.shape)
        self.pending.setdefault(bucket, []).append((entry, reference, inspected))
        if len(self.pending[bucket]) == FLAGS.batch_size:
            self.flush(bucket)

    def flush(self, bucket: tuple[int, int]) -> None:
        group = self.pending.pop(bucket, [])
        if not group:
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            detections = batch.detect_batch(
                [reference for _, reference, _ in group],
                [inspected for _, _, inspected in group],
                **self.context["detect_args"],
                batch_size=FLAGS.batch_size,
            )
        for warning in caught:
            # detect_batch numbers the pairs of its call; the log names them.
            message = str(warning.message)
            match = re.match(r"pair (\d+): ", message)
            if match:
                message = f"pair {group[int(match.group(1))][0].name}: {message[match.end():]}"
            logging.warning("%s", message)
        traces = batch.trace_counts()
        compiled = sorted(stage for stage, count in traces.items() if count > self.traces.get(stage, 0))
        if compiled:
            logging.info("compiled %s for bucket %dx%d px", ", ".join(compiled), *bucket)
        self.traces = traces
        for (entry, _, inspected), detection in zip(group, detections):
            self._write(entry, inspected, detection, tiled=False)
        _write_summary(self.output_dir, self.entries, self.rows)

    def flush_all(self) -> None:
        for bucket in list(self.pending):
            self.flush(bucket)

    def fail(self, entry: PairEntry, error: Exception) -> None:
        logging.warning("pair %s failed: %s", entry.name, error)
        self.rows[entry.name] = _summary_row(entry, None, str(error))
        self.progress.update(1)

    def _write(self, entry: PairEntry, inspected: np.ndarray, detection, *, tiled: bool) -> None:
        figures = FLAGS.figures == "all" or (FLAGS.figures == "flagged" and bool(detection.blobs))
        extra = dict(
            self.context["record"],
            pair={"reference": entry.reference, "inspected": entry.inspected},
            max_score=float(detection.defect_map.max()),
            tiled=tiled,
        )
        record = write_detection(
            os.path.join(self.output_dir, PAIRS_DIR, entry.name),
            inspected,
            detection,
            self.context["flag_values"],
            extra,
            figures=figures,
        )
        self.rows[entry.name] = _summary_row(entry, record)
        self.flagged += bool(detection.blobs)
        self.progress.update(1)
        self.progress.set_postfix(flagged=self.flagged)


class _ProgressSafeStream:
    """Stream for the log that writes above the progress bar (``tqdm.write``) instead of onto its line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _log_above_progress_bar():
    handler = logging.get_absl_handler().python_handler
    previous = handler.setStream(_ProgressSafeStream(handler.stream))
    try:
        yield
    finally:
        handler.setStream(previous)


def _run() -> int:
    for name in _SINGLE_PAIR_FLAGS:
        if FLAGS[name].present:
            raise app.UsageError(f"--{name} is for experiments.run; list the pairs in the --pairs CSV file instead.")
    for name in ("pairs", "output_dir"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is missing; it is required.")
    output_dir = FLAGS.output_dir
    config = single.config_from_flags()
    student = None if FLAGS.student_checkpoint else single.student_from_flags(config)
    entries = read_pair_list(FLAGS.pairs)
    _check_output_dir(output_dir, resume=FLAGS.resume, overwrite=FLAGS.overwrite)
    logging.info("JAX devices: %s; %d pair(s) in %s", jax.devices(), len(entries), FLAGS.pairs)

    rows, todo = {}, []
    for entry in entries:
        record = _finished_record(output_dir, entry) if FLAGS.resume else None
        if record is not None:
            rows[entry.name] = _summary_row(entry, record)
        else:
            todo.append(entry)
    if FLAGS.resume:
        logging.info("resume: %d pair(s) finished earlier, %d to run", len(entries) - len(todo), len(todo))

    variables, teacher_info = hub.resolve_teacher(FLAGS.teacher_weights)
    student, states, _ = single.student_and_states(student, variables, teacher_info["sha256"], config)
    flag_values = {flag.name: flag.value for flag in single.run_flags() + single.run_flags("pairs")}
    context = {
        "detect_args": {"variables": variables, "config": config, "student": student, "states": states},
        "flag_values": flag_values,
        "record": {
            "teacher": teacher_info,
            "student": student.name,
            "student_settings": dataclasses.asdict(student),
            "student_checkpoint": FLAGS.student_checkpoint,
            "pipeline_config": dataclasses.asdict(config),
        },
    }
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    with _log_above_progress_bar(), tqdm.tqdm(
        total=len(entries), initial=len(entries) - len(todo), unit="pair", desc="pairs"
    ) as progress:
        runner = _Runner(output_dir, entries, rows, progress, context)
        for entry in todo:
            try:
                reference, inspected = _load_pair(entry)
            except (OSError, ValueError) as error:
                runner.fail(entry, error)
                continue
            runner.add(entry, reference, inspected)
        runner.flush_all()
    _write_summary(output_dir, entries, rows)

    statuses = [row["status"] for row in rows.values()]
    flagged = sum(1 for row in rows.values() if row["status"] == "ok" and row["blobs"] > 0)
    logging.info(
        "%d pair(s): %d ok (%d with blobs), %d failed; ran %d in %.1f s; summary in %s",
        len(entries), statuses.count("ok"), flagged, statuses.count("failed"), len(todo),
        time.perf_counter() - start, os.path.join(output_dir, SUMMARY_FILE),
    )
    return 1 if "failed" in statuses else 0


def main(argv):
    del argv
    python_logging.captureWarnings(True)
    try:
        return _run()
    except (FileNotFoundError, FileExistsError, ValueError, hub.WeightsDownloadError) as error:
        logging.error("%s", error)
        return 1
    except KeyboardInterrupt:
        # summary.csv and the pair folders keep every batch that finished.
        summary = os.path.join(FLAGS.output_dir or "", SUMMARY_FILE)
        if os.path.isfile(summary):
            logging.error("interrupted; the pairs finished so far are in %s. Rerun with --resume to run the others.", summary)
        else:
            logging.error("interrupted before any batch finished; rerun with --resume to run every pair.")
        return 130


if __name__ == "__main__":
    app.run(main)
