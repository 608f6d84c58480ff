"""Repair after structured pruning: FLAP bias compensation and layer-wise ridge least-squares re-fit of the
pruned output projections (``o_proj``, ``down_proj``) against an untouched dense copy, plus ``pd-books``,
a generic public-domain calibration text.

Entry points (plain functions; the pipeline passes the pruned model, a dense copy made before pruning,
the pruned model's adapter and calibration token batches)::

    columns = kept_columns(result)                    # or kept_columns(groups, kept)
    bias_compensate(pruned, dense, adapter, batches, columns=columns)          # FLAP, dense inputs
    refit(pruned, dense, adapter, batches, columns=columns)  # dense inputs, ridge 1 anchored at the pruned weights
    refit(pruned, dense, adapter, batches, inputs="sequential")  # the pruned model's own inputs: no columns

Both modify ``pruned`` in place and return a small report dict for run.json.
"""

from prunekit.builtin.repair.bias import bias_compensate, bias_export_plan, flap_bias, make_bias_loadable
from prunekit.builtin.repair.corpus import clean_gutenberg, pd_books, pd_books_text
from prunekit.builtin.repair.layerwise import kept_columns
from prunekit.builtin.repair.refit import refit, ridge_solve

__all__ = ["bias_compensate", "bias_export_plan", "clean_gutenberg", "flap_bias", "kept_columns", "make_bias_loadable",
           "pd_books", "pd_books_text", "refit", "ridge_solve"]
