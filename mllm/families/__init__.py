"""Model families: what a recipe's `model.kind` names. Each family is one file here with one
`register_family(Family(...))`: how to build the model from a recipe, load it and recognise its saved
folder, the training tasks it brings (module, dataset, collator) and its stage kinds.

    mllm         MultimodalLM (mllm.model): tower + projector + causal LM; the LLaVA-style stages
    contrastive  encoders.ContrastiveModel: CLIP-style image/text towers, encoders.objectives
    ssl          encoders.ssl.SSLModel: DINO + iBOT on images
    tips         encoders.tips.TipsModel: two-CLS contrastive + DINO + iBOT
    cloc         encoders.cloc.ClocModel: CLIP pair + Prompter (region-text InfoNCE + grounding)
    albef        encoders.albef.AlbefModel: pair + fusion encoder, ITM, MLM, EMA momentum model (ALBEF)
    degla        encoders.degla.DeglaModel: pair + EMA teacher, IGC/TGC on negative captions (DeGLA)

The models know nothing of recipes, stages or runs; their datasets live in `mllm.data`, their evaluations
in `mllm.evaluation`. This layer sits under training and evaluation: `mllm.training` builds and trains
through the registry, `mllm.loading` loads through it. Adding a family = one file here, imported below.
"""

# Each registers its family; in this order, which is also the order `saved_family` tries them in.
# isort: off
from mllm.families import mllm, contrastive, ssl, tips, cloc  # noqa: F401
from mllm.families import albef  # noqa: F401  (model kinds albef and degla)
from mllm.families import refine  # noqa: F401  (CLIP-Refine's stage kind, on contrastive pairs)

# isort: on
from mllm.families.base import *  # noqa: E402, F403  (the registry's public names, listed once in base)
from mllm.families.base import __all__ as __all__  # noqa: E402
