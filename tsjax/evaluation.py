"""Run defect-map methods on a dataset of pairs with known defects.

A dataset is a folder in the layout of the real wafer data: image files plus
one ``defects.json``. Its ``cases`` map a case name to the ``reference`` and
``inspected`` file names and to ``defects``, a list of ``{"x", "y"}`` pixels
of the inspected image (x the column, y the row). A case may also
name a ``mask`` image (nonzero on defect pixels of the inspected image) and,
as ``tsjax.synth.write_dataset`` writes them, per-defect lists ``kinds``,
``contrast`` and ``size_px`` in the order of ``defects``.

``evaluate_pair`` runs every method on one pair through the pipeline's
segmentation and matches the blobs to the annotated points. Its
``PairOutcome`` keeps each method's defect map inside the evaluation region
(the part of the inspected image that the aligned reference covers, the same
for every method), so that the pixel metrics can be pooled over a dataset
later (``tsjax.aggregate``). Outcomes can be saved and loaded, so that a long
run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import imageio.v3 as iio
import numpy as np

from tsjax import io, metrics, pipeline
from tsjax.methods import Method, PairContext

__all__ = [
    "DATASET_INDEX",
    "EvaluationPair",
    "MethodOutcome",
    "PairOutcome",
    "read_dataset",
    "evaluate_pair",
    "save_outcome",
    "load_outcome",
]

DATASET_INDEX = "defects.json"

# Per-defect attributes that synthetic datasets record, by the key of their
# list in a case entry and the key they get in ``EvaluationPair.defects``.
_DEFECT_ATTRIBUTES = {"kinds": "kind", "contrast": "contrast", "size_px": "size_px"}


@dataclasses.dataclass(frozen=True)
class EvaluationPair:
    """One reference/inspected pair with its ground truth.

    Attributes:
      name: Case name from ``defects.json``.
      reference: ``[H', W']`` float32 in [0, 1].
      inspected: ``[H, W]`` float32 in [0, 1].
      points: ``[P, 2]`` float64 defect centres ``(x, y)`` in the inspected
        image; ``P`` is 0 for a defect-free pair.
      mask: ``[H, W]`` bool defect mask of the inspected image, or ``None``
        when the dataset gives no mask.
      defects: ``P`` dicts with ``x``, ``y`` and whichever of ``kind``,
        ``contrast`` (signed peak intensity change) and ``size_px`` the
        dataset records.
    """

    name: str
    reference: np.ndarray
    inspected: np.ndarray
    points: np.ndarray
    mask: np.ndarray | None
    defects: tuple[dict[str, Any], ...]


def _case_defects(name: str, case: Mapping[str, Any]) -> tuple[np.ndarray, tuple[dict[str, Any], ...]]:
    entries = case.get("defects", [])
    try:
        points = np.array([(float(entry["x"]), float(entry["y"])) for entry in entries], np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"case {name!r}: every entry of 'defects' needs numeric 'x' and 'y'; got {entries!r}."
        ) from error
    defects = [{"x": float(x), "y": float(y)} for x, y in points]
    for list_key, attribute in _DEFECT_ATTRIBUTES.items():
        values = case.get(list_key)
        if values is None:
            continue
        if len(values) != len(defects):
            raise ValueError(
                f"case {name!r}: '{list_key}' has {len(values)} value(s) for {len(defects)} defect(s); "
                "give one value per defect, in the order of 'defects'."
            )
        for defect, value in zip(defects, values):
            defect[attribute] = value
    return points, tuple(defects)


def _read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"defect mask not found: {path!r}. Fix the case's 'mask' entry or add the file.")
    mask = np.asarray(iio.imread(path))
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != shape:
        raise ValueError(
            f"defect mask {path!r} is {mask.shape[0]}x{mask.shape[1]} px but its inspected image is "
            f"{shape[0]}x{shape[1]} px; the mask must cover the inspected image pixel for pixel."
        )
    return mask > 0


def read_dataset(directory: str | os.PathLike, names: Sequence[str] | None = None) -> list[EvaluationPair]:
    """Load every pair of a dataset folder, in the sorted order of case names.

    Args:
      directory: Folder with ``defects.json`` and the files it names.
      names: Cases to load; all of them by default.

    Returns:
      One ``EvaluationPair`` per case.

    Raises:
      FileNotFoundError: if ``defects.json``, an image or a mask is missing.
      ValueError: if ``defects.json`` has no ``cases``, names an unknown
        case, or a case's entries are malformed.
      ImageError: if an image is unusable.
    """
    directory = os.fspath(directory)
    index_path = os.path.join(directory, DATASET_INDEX)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(
            f"dataset index not found: {index_path!r}. A dataset folder needs a {DATASET_INDEX} "
            "(see tsjax.evaluation); experiments.make_synthetic writes one."
        )
    with open(index_path, encoding="utf-8") as handle:
        cases = json.load(handle).get("cases")
    if not isinstance(cases, dict) or not cases:
        raise ValueError(f"{index_path}: expected a non-empty 'cases' object mapping case names to entries.")
    if names is None:
        names = sorted(cases)
    unknown = [name for name in names if name not in cases]
    if unknown:
        raise ValueError(f"{index_path}: unknown case(s) {unknown}; the dataset has {sorted(cases)[:10]}...")

    pairs = []
    for name in names:
        case = cases[name]
        missing = [key for key in ("reference", "inspected") if key not in case]
        if missing:
            raise ValueError(f"{index_path}: case {name!r} lacks {missing}; name both image files.")
        reference = io.load_image(os.path.join(directory, case["reference"]))
        inspected = io.load_image(os.path.join(directory, case["inspected"]))
        points, defects = _case_defects(name, case)
        mask = _read_mask(os.path.join(directory, case["mask"]), inspected.shape) if case.get("mask") else None
        pairs.append(EvaluationPair(name, reference, inspected, points, mask, defects))
    return pairs


@dataclasses.dataclass
class MethodOutcome:
    """The result of one method on one pair.

    Attributes:
      defect_map: ``[h, w]`` float32, the method's map inside the pair's
        evaluation region (zero where the method scores no pixel).
      match: The ``tsjax.metrics.match_points`` result of its blobs.
      blobs: The blobs of ``pipeline.segment``.
      threshold: The threshold ``pipeline.segment`` applied.
      image_score: The maximum of the map over the method's valid pixels.
      pixel_metrics: ``pixel_auroc``, ``aupro`` and ``f1_max`` of this pair
        alone, NaN without a mask or where undefined.
      seconds: Wall-clock seconds of the map and the segmentation, without
        the work shared with other methods (alignment, teacher features).
    """

    defect_map: np.ndarray
    match: dict[str, Any]
    blobs: list[dict[str, Any]]
    threshold: float
    image_score: float
    pixel_metrics: dict[str, float]
    seconds: float


@dataclasses.dataclass
class PairOutcome:
    """Every method's result on one pair.

    Attributes:
      name: Case name.
      points: ``[P, 2]`` ground-truth defect centres ``(x, y)``.
      defects: Per point, its attributes (see ``EvaluationPair.defects``).
      region: ``(y0, x0, y1, x1)``: the evaluation region, the bounding box
        of the aligned pair's overlap. Alignment is a translation, so the
        overlap is this rectangle.
      mask: ``[h, w]`` bool ground-truth mask inside the region, or ``None``.
      alignment: ``Alignment.summary()`` of the pair.
      shared_seconds: Seconds of work shared by all methods.
      methods: ``MethodOutcome`` per method name.
    """

    name: str
    points: np.ndarray
    defects: tuple[dict[str, Any], ...]
    region: tuple[int, int, int, int]
    mask: np.ndarray | None
    alignment: dict[str, Any]
    shared_seconds: float
    methods: dict[str, MethodOutcome]

    @property
    def is_defective(self) -> bool:
        """Whether the pair has at least one annotated defect point or mask pixel."""
        return len(self.points) > 0 or (self.mask is not None and bool(self.mask.any()))


def _bounding_box(region: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _pair_pixel_metrics(scores: np.ndarray, mask: np.ndarray | None, fpr_limit: float) -> dict[str, float]:
    if mask is None:
        return {"pixel_auroc": float("nan"), "aupro": float("nan"), "f1_max": float("nan")}
    return {
        "pixel_auroc": metrics.pixel_auroc(scores, mask),
        "aupro": metrics.aupro(scores, mask, fpr_limit=fpr_limit),
        "f1_max": metrics.f1_max(scores, mask),
    }


def evaluate_pair(
    pair: EvaluationPair,
    methods: Sequence[Method],
    variables: Mapping,
    *,
    match_radius: float = 10.0,
    fpr_limit: float = 0.3,
    last_layer: str = "layer3",
) -> PairOutcome:
    """Run every method on one pair, segment its map and score the result.

    Args:
      pair: The pair and its ground truth.
      methods: Methods to run, with unique names.
      variables: Teacher variables reaching ``last_layer``.
      match_radius: Growth in px of each blob's bounding box when matching
        points (``tsjax.metrics.match_points``).
      fpr_limit: FPR limit of the per-pair AUPRO.
      last_layer: Deepest teacher layer any method reads.

    Returns:
      A ``PairOutcome``.

    Raises:
      ValueError: if two methods share a name.
      ImageError: if the pair cannot be aligned.
    """
    names = [method.name for method in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names {names} repeat; give each method its own name.")
    context = PairContext(pair.reference, pair.inspected, variables, last_layer)
    y0, x0, y1, x1 = _bounding_box(context.overlap)
    mask = None if pair.mask is None else pair.mask[y0:y1, x0:x1]

    outcomes = {}
    for method in methods:
        shared_before = context.shared_seconds
        start = time.perf_counter()
        defect_map, valid = method.compute(pair.reference, pair.inspected, context)
        threshold, _, blobs = pipeline.segment(defect_map, valid, method.config)
        seconds = time.perf_counter() - start - (context.shared_seconds - shared_before)
        region_map = np.ascontiguousarray(defect_map[y0:y1, x0:x1], np.float32)
        outcomes[method.name] = MethodOutcome(
            defect_map=region_map,
            match=metrics.match_points(pair.points, blobs, match_radius=match_radius),
            blobs=blobs,
            threshold=float(threshold.value),
            image_score=float(defect_map[valid].max()),
            pixel_metrics=_pair_pixel_metrics(region_map, mask, fpr_limit),
            seconds=seconds,
        )
    return PairOutcome(
        name=pair.name,
        points=pair.points,
        defects=pair.defects,
        region=(y0, x0, y1, x1),
        mask=mask,
        alignment=context.alignment.summary(),
        shared_seconds=context.shared_seconds,
        methods=outcomes,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def save_outcome(path: str | os.PathLike, outcome: PairOutcome) -> None:
    """Write a ``PairOutcome`` to one ``.npz`` file (maps as arrays, the rest as JSON).

    The file is written under a temporary name and renamed, so that an
    interrupted run leaves no truncated outcome behind.
    """
    record = {
        "name": outcome.name,
        "defects": list(outcome.defects),
        "region": list(outcome.region),
        "alignment": outcome.alignment,
        "shared_seconds": outcome.shared_seconds,
        "methods": {
            name: {key: getattr(result, key) for key in ("match", "blobs", "threshold", "image_score", "pixel_metrics", "seconds")}
            for name, result in outcome.methods.items()
        },
    }
    arrays = {f"map__{name}": result.defect_map for name, result in outcome.methods.items()}
    arrays["points"] = outcome.points
    if outcome.mask is not None:
        arrays["mask"] = outcome.mask
    path = os.fspath(path)
    temporary = path + ".partial.npz"
    np.savez_compressed(temporary, record=np.array(json.dumps(record, default=_json_default)), **arrays)
    os.replace(temporary, path)


def load_outcome(path: str | os.PathLike) -> PairOutcome:
    """Read a ``PairOutcome`` written by ``save_outcome``.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
    """
    with np.load(os.fspath(path)) as data:
        record = json.loads(str(data["record"]))
        methods = {
            name: MethodOutcome(defect_map=data[f"map__{name}"], **fields) for name, fields in record["methods"].items()
        }
        return PairOutcome(
            name=record["name"],
            points=data["points"],
            defects=tuple(record["defects"]),
            region=tuple(record["region"]),
            mask=data["mask"] if "mask" in data.files else None,
            alignment=record["alignment"],
            shared_seconds=record["shared_seconds"],
            methods=methods,
        )
