"""The built-in repairs ``refit`` and ``bias`` (the ``repair`` stage, docs/repair.md): layer-wise ridge
least-squares re-fit and FLAP bias compensation of the pruned output projections (``o_proj``, ``down_proj``)
against an untouched dense copy, fitted on PTB train text unless told otherwise (the choice: docs/recovery.md).

The maths as plain functions (the stage hands the pruned model, the dense copy made before pruning, the
pruned model's adapter and repair-text token batches)::

    columns = kept_columns(result)                    # or kept_columns(groups, kept)
    bias_compensate(pruned, dense, adapter, batches, columns=columns)          # FLAP, dense inputs
    refit(pruned, dense, adapter, batches, columns=columns)  # dense inputs, ridge 1 anchored at the pruned weights
    refit(pruned, dense, adapter, batches, inputs="sequential")  # the pruned model's own inputs: no columns

Both modify ``pruned`` in place and return a small report dict for run.json.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prunekit import hookimpl
from prunekit.builtin.repair.bias import bias_compensate, bias_export_plan, flap_bias, make_bias_loadable
from prunekit.builtin.repair.layerwise import kept_columns
from prunekit.builtin.repair.refit import refit, ridge_solve
from prunekit.data.pd_books import clean_gutenberg, pd_books, pd_books_text
from prunekit.data.sources import check_source

__all__ = ["Bias", "Refit", "bias_compensate", "bias_export_plan", "clean_gutenberg", "flap_bias", "kept_columns",
           "make_bias_loadable", "pd_books", "pd_books_text", "prunekit_register_repairers", "refit", "ridge_solve"]


class RepairOptions(BaseModel):
    """The text a repair fits on and which projections it touches (shared by ``bias`` and ``refit``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: str = Field(default="ptb", description="repair text: a named source (ptb, pd-books, ...), a local "
                                                    "file/folder or a mixture; ptb was chosen on validation text")
    n_samples: int = Field(default=128, ge=1, description="windows of repair text")
    seq_len: int = Field(default=128, ge=2, description="tokens per window")
    which: tuple[Literal["attention", "mlp"], ...] = Field(default=("attention", "mlp"), min_length=1,
                                                           description="o_proj (attention) and/or down_proj (mlp)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        return check_source(v)


class RefitOptions(RepairOptions):
    # defaults chosen on validation text (docs/repair.md): dense inputs, a ridge pulling towards the pruned
    # weights, ridge 1.0; sequential inputs and a ridge towards zero over-fit the repair text
    ridge: float = Field(default=1.0, ge=0, description="ridge, relative to the mean diagonal of the Gram matrix")
    anchor: Literal["zero", "pruned"] = Field(default="pruned", description="what the ridge pulls the weights "
                                                                            "towards: the pruned weights, or zero")
    inputs: Literal["sequential", "dense"] = Field(
        default="dense", description="dense: the dense model's inputs at the kept columns; sequential: the pruned "
                                     "model's own inputs, earlier layers already re-fitted")


class BiasOptions(RepairOptions):
    inputs: Literal["dense", "sequential"] = Field(default="dense", description="FLAP's choice: the dense inputs")


class _DenseRepair:
    """A repair that compares against the dense copy and fits on ``options.source`` text (``fit`` does the maths)."""

    Options: type[RepairOptions] = RepairOptions
    needs_dense = True

    def __init__(self, options: RepairOptions):
        self.options = options

    def repair(self, ctx) -> dict:
        o = self.options
        batches = ctx.calibration(o.n_samples, o.seq_len, o.source)
        return self.fit(ctx, batches, kept_columns(ctx.groups, ctx.kept))

    def fit(self, ctx, batches, columns) -> dict:
        raise NotImplementedError


class Refit(_DenseRepair):
    """Layer-wise ridge least-squares re-fit of the pruned o_proj/down_proj against the dense outputs."""

    Options = RefitOptions

    def fit(self, ctx, batches, columns) -> dict:
        o = self.options
        return refit(ctx.model, ctx.dense, ctx.adapter, batches, ridge=o.ridge, which=o.which, inputs=o.inputs,
                     anchor=o.anchor, columns=columns)


class Bias(_DenseRepair):
    """FLAP's bias compensation: each removed unit's mean contribution added to the output projection's bias."""

    Options = BiasOptions

    def fit(self, ctx, batches, columns) -> dict:
        o = self.options
        return bias_compensate(ctx.model, ctx.dense, ctx.adapter, batches, columns=columns, inputs=o.inputs,
                               which=o.which)


@hookimpl
def prunekit_register_repairers(register) -> None:
    register("refit", Refit)
    register("bias", Bias)
