"""Tables and files of an evaluation: Markdown, CSV and JSON.

``write_results`` writes one dataset's ``results.json`` (everything
``tsjax.aggregate.summarize_dataset`` returns), ``summary.md`` and
``summary.csv`` (one row per method) and ``pairs.csv`` (one row per pair
and method). ``markdown_summary`` renders the method table that
``summary.md`` and the results page share, and ``write_results_page``
refreshes the tables and figure links of a results page such as
``docs/results.md``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "SUMMARY_COLUMNS",
    "PAGE_BEGIN",
    "PAGE_END",
    "format_value",
    "markdown_summary",
    "markdown_recall_by_kind",
    "write_results",
    "render_results_section",
    "write_results_page",
]

# Columns of the method table: (key in the method summary, header).
SUMMARY_COLUMNS = (
    ("num_pairs", "pairs"),
    ("found", "found"),
    ("num_points", "defects"),
    ("recall", "recall"),
    ("false_positives", "FP blobs"),
    ("false_positives_per_pair", "FP / pair"),
    ("defect_free_pairs_with_fp", "defect-free pairs with FP"),
    ("mean_localisation_error_px", "loc. error (px)"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("f1_max", "F1-max"),
    ("image_auroc", "image AUROC"),
    ("seconds_per_pair", "s / pair"),
)

# Summary fields that the CSV leaves out because they are lists.
_LIST_FIELDS = ("pairs", "roc", "pro")


def format_value(value: Any, digits: int = 3) -> str:
    """Format a table cell: integers as they are, floats rounded, NaN or None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_summary(method_summaries: Sequence[tuple[str, Mapping[str, Any]]], *, fpr_limit: float) -> str:
    """Render one row per method with the columns of ``SUMMARY_COLUMNS``.

    Args:
      method_summaries: ``(name, summary)`` per method, the summary as
        ``tsjax.aggregate.summarize_method`` returns it.
      fpr_limit: FPR limit of the AUPRO, shown in its header.

    Returns:
      A Markdown table, without a trailing newline.
    """
    headers = ["method"] + [
        f"AUPRO (FPR ≤ {fpr_limit:g})" if key == "aupro" else header for key, header in SUMMARY_COLUMNS
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, summary in method_summaries:
        cells = [f"`{name}`"]
        for key, _ in SUMMARY_COLUMNS:
            digits = 1 if key in ("mean_localisation_error_px", "seconds_per_pair") else 3
            cells.append(format_value(summary.get(key), digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_recall_by_kind(results: Mapping[str, Any]) -> str:
    """Render the recall per defect kind (columns) and method (rows), or ``''`` when no kind is recorded."""
    kinds = sorted({kind for entry in results["methods"] for kind in entry.get("recall_by_kind", {})})
    if not kinds:
        return ""
    first = results["methods"][0]["recall_by_kind"]
    headers = ["method"] + [f"{kind} ({first[kind]['total'] if kind in first else 0})" for kind in kinds]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for entry in results["methods"]:
        by_kind = entry.get("recall_by_kind", {})
        cells = [f"`{entry['name']}`"] + [
            format_value(by_kind[kind]["recall"]) if kind in by_kind else "–" for kind in kinds
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    fields = list(rows[0]) if rows else []
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_results(output_dir: str | os.PathLike, results: Mapping[str, Any]) -> list[str]:
    """Write one dataset's results as JSON, Markdown and CSV.

    Args:
      output_dir: Existing folder.
      results: What ``tsjax.aggregate.summarize_dataset`` returns, with a
        ``dataset`` name added.

    Returns:
      The paths written.
    """
    output_dir = os.fspath(output_dir)
    paths = {name: os.path.join(output_dir, name) for name in ("results.json", "summary.md", "summary.csv", "pairs.csv")}
    with open(paths["results.json"], "w", encoding="utf-8") as handle:
        # NaN is written as the JSON extension NaN, which Python's json reads back.
        json.dump(results, handle, indent=1)
        handle.write("\n")
    table = markdown_summary(
        [(entry["name"], entry["summary"]) for entry in results["methods"]], fpr_limit=results["fpr_limit"]
    )
    with open(paths["summary.md"], "w", encoding="utf-8") as handle:
        handle.write(f"# {results.get('dataset', 'dataset')}: {results['num_pairs']} pairs\n\n{table}\n")
    summary_rows = [
        {"method": entry["name"], **{key: value for key, value in entry["summary"].items() if key not in _LIST_FIELDS}}
        for entry in results["methods"]
    ]
    _write_csv(paths["summary.csv"], summary_rows)
    _write_csv(paths["pairs.csv"], results["pair_rows"])
    return list(paths.values())


# The results page keeps everything outside these markers, so that the
# hand-written analysis survives a rerun that refreshes the tables.
PAGE_BEGIN = "<!-- BEGIN GENERATED: experiments.evaluate rewrites this section -->"
PAGE_END = "<!-- END GENERATED -->"


def _dataset_section(results: Mapping[str, Any], figures: Mapping[str, str]) -> list[str]:
    name = results["dataset"]
    lines = [
        f"### {name}",
        "",
        f"{results['num_pairs']} pairs, {results['num_points']} annotated defects, "
        f"{results['defect_free_pairs']} defect-free pair(s); "
        + ("pixel masks available." if results["has_masks"] else "points only, no pixel masks."),
        "",
        markdown_summary([(e["name"], e["summary"]) for e in results["methods"]], fpr_limit=results["fpr_limit"]),
        "",
    ]
    for subset in results.get("subsets", []):
        slow = [e["name"] for e in results["methods"] if e["summary"]["pairs"] == subset["pairs"]]
        lines += [
            f"On the first {len(subset['pairs'])} pairs only, where {', '.join(f'`{n}`' for n in slow)} ran:",
            "",
            markdown_summary(list(subset["methods"].items()), fpr_limit=results["fpr_limit"]),
            "",
        ]
    by_kind = markdown_recall_by_kind(results)
    if by_kind:
        lines += ["Recall per defect kind (number of defects in brackets):", "", by_kind, ""]
    captions = {
        "roc": "Pixel ROC",
        "pro": "PRO curve",
        "recall_contrast": "Recall against contrast",
        "recall_size": "Recall against size",
    }
    for key, caption in captions.items():
        if key in figures:
            lines += [f"![{name}: {caption}]({figures[key]})", ""]
    for key in sorted(key for key in figures if key.startswith("maps_")):
        lines += [f"![{name}: defect maps of {key[len('maps_'):]}]({figures[key]})", ""]
    return lines


def render_results_section(all_results: Sequence[Mapping[str, Any]], figures: Mapping[str, Mapping[str, str]]) -> str:
    """Render the generated part of the results page: the method legend, then each dataset's tables and figures.

    Args:
      all_results: Per dataset, the results of ``write_results``.
      figures: Per dataset name, the figure paths relative to the page, by
        figure name (``roc``, ``pro``, ``recall_contrast``, ``recall_size``
        and ``maps_<pair>``).

    Returns:
      Markdown text.
    """
    lines = ["| method | defect map |", "|---|---|"]
    seen = set()
    for results in all_results:
        for entry in results["methods"]:
            if entry["name"] not in seen:
                seen.add(entry["name"])
                lines.append(f"| `{entry['name']}` | {entry['description']} |")
    lines.append("")
    for results in all_results:
        lines += _dataset_section(results, figures.get(results["dataset"], {}))
    return "\n".join(lines).rstrip() + "\n"


def write_results_page(
    path: str | os.PathLike, all_results: Sequence[Mapping[str, Any]], figures: Mapping[str, Mapping[str, str]]
) -> None:
    """Write the generated section of a results page, keeping the text around it.

    A new page gets a title, the generated section and an empty analysis
    heading. An existing page must contain ``PAGE_BEGIN`` and ``PAGE_END``,
    and only the text between them is replaced.

    Raises:
      ValueError: if an existing page lacks the markers.
    """
    path = os.fspath(path)
    section = render_results_section(all_results, figures)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        begin, end = text.find(PAGE_BEGIN), text.find(PAGE_END)
        if begin < 0 or end < begin:
            raise ValueError(
                f"{path} exists but lacks the markers {PAGE_BEGIN!r} and {PAGE_END!r}; add them around the "
                "generated tables, or write the page to a new path."
            )
        text = text[: begin + len(PAGE_BEGIN)] + "\n\n" + section + "\n" + text[end:]
    else:
        text = f"# Results\n\n{PAGE_BEGIN}\n\n{section}\n{PAGE_END}\n\n## Analysis\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
