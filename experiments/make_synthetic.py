"""Write a synthetic SEM pair dataset with planted defects.

    python -m experiments.make_synthetic --num_pairs=50 --seed=0 --output_dir=outputs/synth

The folder gets the layout of the real wafer data: per case a reference and
an inspected 8-bit TIFF, a defect mask PNG, and one defects.json for all
cases. Flags become one ``SynthConfig``, and the library never reads
``FLAGS``.
"""

from __future__ import annotations

import time

import tqdm
from absl import app, flags, logging

from tsjax import synth

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define this script's flags.

    They are defined here rather than at import, so that importing this module
    next to another script with flags of the same name (seed, output_dir)
    raises no DuplicateFlagError.
    """
    defaults = synth.SynthConfig()
    flags.DEFINE_integer("num_pairs", None, "Number of reference/inspected pairs to write.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Dataset seed. Pair i uses synth.pair_seed(seed, i).", lower_bound=0)
    flags.DEFINE_string("output_dir", None, "Folder for the TIFF and PNG files and defects.json.")
    flags.DEFINE_bool("overwrite", False, "Replace an earlier dataset in a non-empty --output_dir.")
    flags.DEFINE_list(
        "height_range", [str(v) for v in defaults.height_range], "Min and max image height, in px."
    )
    flags.DEFINE_list("width_range", [str(v) for v in defaults.width_range], "Min and max image width, in px.")
    flags.DEFINE_float(
        "defect_free_fraction", defaults.defect_free_fraction, "Probability that a pair has no defect."
    )
    flags.DEFINE_integer("max_defects", defaults.max_defects, "Maximum number of defects in one inspected image.")
    flags.mark_flags_as_required(["num_pairs", "output_dir"])


def _parse_range(name: str, values: list[str]) -> tuple[int, int]:
    try:
        low, high = (int(value) for value in values)
    except ValueError as error:
        raise app.UsageError(
            f"--{name}={','.join(values)} is invalid: use two integers MIN,MAX."
        ) from error
    return low, high


def config_from_flags() -> synth.SynthConfig:
    """Build the frozen generator config from the parsed flags."""
    try:
        return synth.SynthConfig(
            height_range=_parse_range("height_range", FLAGS.height_range),
            width_range=_parse_range("width_range", FLAGS.width_range),
            defect_free_fraction=FLAGS.defect_free_fraction,
            max_defects=FLAGS.max_defects,
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = config_from_flags()

    logging.info("Writing %d pairs (seed %d) to %s", FLAGS.num_pairs, FLAGS.seed, FLAGS.output_dir)
    start = time.perf_counter()
    try:
        with tqdm.tqdm(total=FLAGS.num_pairs, unit="pair") as progress:
            index = synth.write_dataset(
                FLAGS.output_dir,
                FLAGS.num_pairs,
                FLAGS.seed,
                config,
                overwrite=FLAGS.overwrite,
                on_pair_written=lambda name: progress.update(1),
            )
    except FileExistsError as error:
        raise app.UsageError(str(error)) from error
    cases = index["cases"].values()
    num_defects = sum(len(case["defects"]) for case in cases)
    num_defect_free = sum(not case["defects"] for case in cases)
    logging.info(
        "Wrote %d pairs (%d defects, %d defect-free pairs) in %.1f s",
        len(index["cases"]),
        num_defects,
        num_defect_free,
        time.perf_counter() - start,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
