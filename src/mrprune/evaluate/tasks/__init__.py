"""Task configs for lm-evaluation-harness that read local files instead of the Hugging Face hub.

Each ``*_local.yaml`` here is a template: lm-eval's standard task (same prompt, choices, target and metrics),
with the data file left as ``__DATA_FILE__`` / ``__DATASET_PATH__``. :mod:`mrprune.evaluate.zeroshot` fills
them in at run time, so the package never hard-codes where a machine keeps its data.
"""
