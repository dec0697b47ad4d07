"""Scale on paper: `mllm train --recipe R --dry-run` plans a recipe before anyone rents a GPU.

Every stage's whole model is built on the meta device (shapes, no memory, no weights) from configs alone,
by the model family's own build, so a recipe that no longer composes fails here as it would on the
cluster. From that model the plan counts parameters per module and the trainable ones, the image tokens
and the sequence lengths, the memory per GPU under each ZeRO stage (DeepSpeed's own estimators) plus
activations, and the step and stage time at a stated MFU on a named GPU.

    configs    where each part's config comes from: a local folder, the recipe, or a shipped one
               (mllm/model_configs/*.json); the stand-in tokenizer's size
    build      the recipe's model on the meta device; each stage's trainable view of it (LoRA, prefixes)
    lengths    the stage's token-length distribution from its data, or the recipe's max_length
    workload   per training task: which modules run, on how many tokens, with or without gradients
    memory     model states per GPU (DeepSpeed's estimators) and activations (Korthikanti et al. 2022)
    hardware   GPU presets (bf16 dense peak, memory)
    plan       the per-stage plan, its text table and its JSON
"""

from mllm.planning.plan import RecipePlan, StagePlan, plan_recipe, render_text

__all__ = ["RecipePlan", "StagePlan", "plan_recipe", "render_text"]
