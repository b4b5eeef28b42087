"""The checks of a run's settings that need the loaded model and data: the pipeline's preflight
runs them before the output folder is touched (src/config.py checks everything else up front).
Like src/config.py, this module speaks in flag names.
"""
from __future__ import annotations

from src.config import RunConfig, subsets_used
from src.errors import UserError
from src.sensitivity.perturb import PerturbOptions, resolve_bit
from src.sensitivity.rank import max_k

CALIBRATION_NAMES = {"source": "the calibration data", "max_length": "--max-length",
                     "max_samples": "--max-samples",
                     "sha256": "the calibration blocks' sha256"}  # the text changed


def check_model(config: RunConfig, *, context: int | None, sizes: dict[str, int], dtypes,
                n_calibration: int) -> None:
    """The model's context, K against the eligible weights, the bit to flip in the weights'
    dtypes, and enough calibration blocks for the stability parts."""
    if context is not None and config.max_length > context:
        raise UserError(f"--max-length {config.max_length} exceeds the model's context of "
                        f"{context} tokens")
    limit = max_k(sizes, config.mode)
    if config.topk > limit:
        where = "the smallest scored tensor" if config.mode == "per_tensor" else \
            "all scored weights"
        raise UserError(f"--topk {config.topk} is larger than {where} ({limit} weights) in "
                        f"{config.mode} mode")
    if config.perturb == "bit_flip":
        for dtype in set(dtypes):
            try:
                resolve_bit(config.settings(PerturbOptions).bit_position, dtype)
            except UserError as error:
                raise UserError(f"bad --bit-position: {error}") from None
    if subsets_used(config) and config.stability_batches > n_calibration:
        raise UserError(f"--stability-batches {config.stability_batches} needs as many "
                        f"calibration blocks, but the data gave {n_calibration}; lower it or "
                        f"give more text")


def scores_data(config: RunConfig, differences: dict[str, tuple]) -> tuple[list[str], str | None]:
    """For --scores-from computed on other calibration data (``differences``:
    score_store.calibration_differences): ('what: X there, Y here' per difference, the warning
    that this run uses them anyway); UserError without --scores-from-other-data."""
    described = [f"{CALIBRATION_NAMES[key]}: {there} there, {here} here"
                 for key, (there, here) in differences.items()]
    if not described:
        return [], None
    if not config.scores_from_other_data:
        raise UserError(f"--scores-from '{config.scores_from}' was scored on other calibration "
                        f"data ({'; '.join(described)}); pass --scores-from-other-data to use "
                        f"those scores anyway, or score on this run's data")
    return described, (f"the scores of --scores-from '{config.scores_from}' were computed on "
                       f"other calibration data than this run's ({'; '.join(described)}); "
                       f"--scores-from-other-data uses them anyway")


def data_warnings(config: RunConfig, data) -> list[str]:
    """One line per way the token blocks (src.data.loading.DataSplit) fall short of what was
    asked: a single document cut in two, a side with fewer than --max-samples blocks."""
    warnings = []
    if data.halved:
        warnings.append(f"the data is a single document, cut in two at the space nearest its "
                        f"middle ({data.sides()}); documents separated by blank lines or one "
                        f"per line split better")
    short = [side for side, blocks in (("calibration", data.calibration),
                                       ("evaluation", data.evaluation))
             if len(blocks) < config.max_samples]
    if short:
        warnings.append(f"the {' and '.join(short)} side{'s' if len(short) > 1 else ''} got "
                        f"fewer blocks than --max-samples {config.max_samples} asks "
                        f"({data.sides()}); give more text or lower --max-samples")
    return warnings
