"""`mllm evidence`: the seed papers' claims measured in miniature on GeoWorld, with honest statistics.

claims (what each claim's arms, measures, directions and budgets are) -> runner (bases, arms at equal
compute, evaluations, resumable) -> units (per-item rows) -> stats (paired bootstrap over items and seeds,
verdicts) -> report (table JSON + markdown, figure).
"""
