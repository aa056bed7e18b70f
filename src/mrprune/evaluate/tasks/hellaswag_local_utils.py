"""Document preprocessing of the ``hellaswag_local`` task: the text lm-eval's standard ``hellaswag`` task builds.

lm-eval loads this file by path (``process_docs: !function hellaswag_local_utils.process_docs`` in the YAML
next to it), so it imports nothing from mrprune.
"""

from __future__ import annotations

import re

_TAG = re.compile(r"\[.*?\]")


def clean(text: str) -> str:
    """WikiHow markup out, as lm-eval does it: ' [title]' ends a sentence, other [tags] go, one pass of '  ' -> ' '."""
    text = text.strip().replace(" [title]", ". ")
    return _TAG.sub("", text).replace("  ", " ")


def to_prompt(doc: dict) -> dict:
    """Query, choices and gold index of one hub-schema HellaSwag item (ctx_b starts a new, capitalised sentence)."""
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": clean(doc["activity_label"] + ": " + context),
        "choices": [clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def process_docs(dataset):
    return dataset.map(to_prompt)
