"""``docs/results-schema.md``, generated: the typed records of :mod:`medadv.results` (every key, its JSON type,
when it is present and its field's documentation), the task kinds' metric keys, and the attack registry's
table (:func:`medadv.attacks.registry.schema_markdown`), so the document cannot miss a key or an attack.

Regenerate with ``python -m medadv.report.results_doc docs/results-schema.md``; tests/test_results_schema.py
fails when the checked-in file differs from :func:`render`. (``python -m medadv.attacks.registry
docs/results-schema.md`` still rewrites only the attack table, with the same text.)
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any

from medadv.attacks.registry import SCHEMA_BEGIN, SCHEMA_END, schema_markdown
from medadv.results import (BINARY_METRICS, FLIPS, MULTICLASS_METRICS, MULTILABEL_METRICS, RECORDS, SEGMENTATION_METRICS, STUDY_TASK, Record, _record_type,
                            _type_name)

COMMAND = "python -m medadv.report.results_doc docs/results-schema.md"

HEADER = f"""<!-- Generated from medadv/results.py and the attack registry: do not edit by hand. Regenerate with
     {COMMAND}
     (tests/test_results_schema.py fails when this file differs from the generator's output). -->

# Results schemas

medadv writes its results as strict JSON (NaN is written as `null`) from the typed records of
`medadv/results.py`, and reads them back into them: a file of an older medadv still loads (keys added since
read as null), anything else (another schema, a missing or unknown key, a value of the wrong type, NaN, a
document nested too deep) is refused with one line naming the key or the schema found and the one expected.
Units are stated once here: **eps, L-inf and L2 distances are in [0, 1] pixel units** (stored pixels
divided by 255 or 65535); accuracy, sensitivity, specificity, confidences and rates are fractions in [0, 1].

*present*: **always**, a key every record has; **always (newer)**, written by this medadv but absent from
records of earlier versions (it reads as null); **when it applies**, written only then (otherwise absent).
"""


def _doc(cls: type) -> str:
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split()).replace("``", "`")  # reST literals -> Markdown


def _present(f: dataclasses.Field) -> str:
    if f.metadata.get("omit"):
        return "when it applies"
    return "always" if f.default is dataclasses.MISSING else "always (newer)"


def _rows(cls: type[Record], prefix: str = "") -> list[str]:
    """One table row per key of ``cls``, nested records flattened into dotted keys after their parent."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in cls.fields():
        key, tp = f"{prefix}{f.name}", hints[f.name]
        sub = _record_type(tp)
        text = f.metadata["doc"]
        shown = _type_name(tp).replace(f"object ({sub.__name__})", "object") if sub is not None else _type_name(tp)
        out.append(f"| `{key}` | {shown} | {_present(f)} | {text} |")
        if sub is not None:
            out += _rows(sub, f"{key}.")
    return out


def _keys_table(title: str, intro: str, keys: dict[str, str]) -> list[str]:
    return [f"## {title}", "", intro, "", "| key | meaning |", "|---|---|",
            *(f"| `{k}` | {v} |" for k, v in keys.items()), ""]


def render() -> str:
    """The whole document."""
    lines = [HEADER]
    for cls in RECORDS:
        doc = _doc(cls)
        schema = cls.__dataclass_fields__["schema"].metadata["doc"].split("`")[1].strip('"')  # type: ignore[attr-defined]
        lines += [f"## {cls.__name__}: `{schema}`", "", doc, "", "| key | type | present | meaning |", "|---|---|---|---|",
                  *_rows(cls), ""]
    lines += _keys_table("Study tasks", "The keys of each of a study's `tasks` (reproduce, demo, audit, defend; not "
                         "every kind has every key).", STUDY_TASK)
    lines += _keys_table("Binary metrics", "`clean`, `adversarial`, `clean_full_split`, an evaluate record and "
                         "`table1` of a binary task (medadv.metrics.clinical_metrics), at the model's operating "
                         "threshold.", BINARY_METRICS)
    lines += _keys_table("Multi-class metrics", "The same records of a multi-class task (medadv.metrics."
                         "multiclass_metrics); the decision is the most probable class.", MULTICLASS_METRICS)
    lines += _keys_table("Multi-label metrics", "The same records of a multi-label reader (medadv.metrics."
                         "multilabel_metrics); each finding is decided at its own threshold, unknown labels left out.",
                         MULTILABEL_METRICS)
    lines += _keys_table("Segmentation metrics", "The same records of a segmentation model (medadv.kinds.segmentation, "
                         "MONAI's metrics): per pixel at P(foreground) >= 0.5, means over images.", SEGMENTATION_METRICS)
    lines += _keys_table("Flips", "`flips`: decisions changed at the operating point (class 0 is healthy).", FLIPS)
    lines += ["## Attacks", "",
              "Every registered attack (the values of `attack.name`), its access kind, the norms it runs under, whether",
              "it is fitted on training images, the rows it adds to the default battery and its options (`attack.params`).",
              "Generated from the attack registry; a test fails when this table and the registry differ.", "",
              SCHEMA_BEGIN, schema_markdown(), SCHEMA_END, ""]
    return "\n".join(lines)


def write(path: Any) -> None:
    """Write :func:`render` to ``path`` atomically (the checked-in document is meant to be replaced)."""
    from medadv.io import write_text

    write_text(path, render(), replace=True)


if __name__ == "__main__":  # python -m medadv.report.results_doc docs/results-schema.md
    import sys

    if len(sys.argv) != 2:
        sys.exit(f"usage: {COMMAND}")
    write(sys.argv[1])
