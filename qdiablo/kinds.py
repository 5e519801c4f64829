"""The one vocabulary of base kinds, for `qdiablo.models.load_base` and every flag mapped onto it.

Kept apart from the loader (which imports torch) so that building the CLI's flags stays light.
"""

BASE_KINDS = ("auto", "fp", "gptq", "rtn", "nf4", "nf2")
PACKED_KINDS = ("gptq", "rtn")
# `qdiablo train --base`: every kind but "auto" (training names its base explicitly).
TRAIN_BASE_KINDS = tuple(k for k in BASE_KINDS if k != "auto")
# `qdiablo eval --quant` onto the base kinds: `none` keeps what the folder holds.
QUANT_FLAG_KINDS = {"none": "auto", "nf4": "nf4", "nf2": "nf2"}
BASE_QUANT_CHOICES = tuple(QUANT_FLAG_KINDS)
