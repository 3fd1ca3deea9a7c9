"""The shapes of stored findings: which kinds of finding exist and the fields each must have.

The run store checks a finding against its kind's shape when it is saved
(:meth:`probe.store.RunStore.save_finding`), and :mod:`probe.figures.findings` checks it again
before drawing it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

__all__ = ["FINDING_KINDS", "FINDING_SHAPES", "validate_finding"]



def _is_text(v: Any) -> bool:
    return isinstance(v, str)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _is_integer(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _is_measures(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items())


#: A field's check and what it must be, for the message.
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (_is_text, "text"),
    "text?": (lambda v: v is None or isinstance(v, str), "text or null"),
    "number": (_is_number, "a number or null"),
    "integer": (_is_integer, "an integer or null"),
    "bool": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "depth": (lambda v: _is_integer(v) or v == "all", "an integer, 'all' or null"),
    "when": (lambda v: v in ("init", "trained"), "'init' or 'trained'"),
    "measures": (_is_measures, "an object of measure names to numbers or null"),
}

_N = "number"
#: kind -> (top-level fields, {list field: its rows' fields}); every field named must be present.
FINDING_SHAPES: dict[str, tuple[dict[str, str], dict[str, dict[str, str]]]] = {
    "cells": ({"title": "text"}, {"rows": {
        "regime": "text", "data": "text", "n_train": "integer", "depth": "integer", "image_size": "integer",
        "epochs": "integer", "variant": "text", "formula": "text", "seed": "integer", "run_id": "text",
        "status": "text", "train_loss": _N, "train_err": _N, "test_loss": _N, "test_err": _N}}),
    "verdict": ({"title": "text", "baseline": "text", "paragraph": "text"}, {"rows": {
        "regime": "text", "variant": "text", "formula": "text", "n_seeds": "integer",
        "test_gap": _N, "test_gap_lo": _N, "test_gap_hi": _N, "train_gap": _N,
        "opt_share": _N, "opt_share_lo": _N, "opt_share_hi": _N, "matched_status": "text",
        "matched_gap": _N, "matched_gap_lo": _N, "matched_gap_hi": _N, "predictor": "text?",
        "predictor_rho": _N, "predictor_p_holm": _N, "answer": "text"}}),
    "trainability": ({"title": "text"}, {
        "rows": {"depth": "integer", "variant": "text", "seed": "integer", "trained": "bool",
                 "train_loss": _N, "measures": "measures"},
        "tests": {"depth": "depth", "measure": "text", "rho": _N, "p": _N, "p_holm": _N, "n": "integer"}}),
    "seed_table": ({"title": "text", "protocol": "text", "rho": _N, "lo": _N, "hi": _N, "n": "integer"}, {"rows": {
        "id": "text", "formula": "text", "group": "text", "caltech": _N, "acc_mean": _N, "acc_sd": _N,
        "n_seeds": "integer"}}),
    "correlations": ({"title": "text", "when": "when"}, {"rows": {
        "measure": "text", "label": "text", "kind": "text", "group": "text", "rho": _N, "lo": _N, "hi": _N,
        "p": _N, "p_holm": _N, "n": "integer"}}),
}

#: The kinds of finding drawn here.
FINDING_KINDS = tuple(FINDING_SHAPES)


def _value(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_problem(where: str, value: Any, present: bool, kind: str) -> str | None:
    ok, wanted = _TYPES[kind]
    if not present:
        return f"{where} is missing"
    return None if ok(value) else f"{where} must be {wanted}, got {_value(value)}"


def validate_finding(payload: Any) -> str | None:
    """``None`` when ``payload`` is a finding of a kind in :data:`FINDING_KINDS` with that kind's
    shape, else one line naming the first problem (the field, what it must be and what it is):
    not an object, no kind, an unknown kind, a field missing or of the wrong type (text where a
    number belongs, rows not a list, a row not an object). Extra fields are allowed."""
    if not isinstance(payload, Mapping):
        return f"a finding must be a JSON object, got {type(payload).__name__}"
    kind = payload.get("kind")
    if not isinstance(kind, str) or not kind:
        return f"the finding has no kind (kind is {_value(kind)})"
    if kind not in FINDING_SHAPES:
        return f"unknown kind {_value(kind)}; the kinds drawn are {', '.join(FINDING_KINDS)}"
    top, lists = FINDING_SHAPES[kind]
    for key, want in top.items():
        problem = _field_problem(key, payload.get(key), key in payload, want)
        if problem:
            return f"{kind} finding: {problem}"
    for key, fields in lists.items():
        rows = payload.get(key)
        if not isinstance(rows, list):
            return f"{kind} finding: {key} must be a list, got {_value(rows) if key in payload else 'nothing'}"
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                return f"{kind} finding: {key}[{i}] must be an object, got {_value(row)}"
            for name, want in fields.items():
                problem = _field_problem(f"{key}[{i}].{name}", row.get(name), name in row, want)
                if problem:
                    return f"{kind} finding: {problem}"
    return None
