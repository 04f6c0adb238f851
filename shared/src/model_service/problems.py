"""Validation errors as one `InvalidInput`, its size capped: a body with 200,000 unknown
keys is answered in a few kilobytes, not with one problem per key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from model_service.errors import InvalidInput

MAX_PROBLEMS = 20  # problems listed; the rest are counted
MAX_FIELD_CHARS = 200
MAX_PROBLEM_CHARS = 300


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} chars)"


def field_name(loc: Iterable[object], prefix: str | None = None) -> str:
    """`("input", "steps")` -> `input.steps`, capped (a key can be megabytes long)."""
    parts = [str(part) for part in loc]
    return clip(".".join([prefix, *parts] if prefix else parts), MAX_FIELD_CHARS)


def invalid_input(
    errors: Iterable[Mapping[str, Any]], what: str, prefix: str | None = None
) -> InvalidInput:
    """One InvalidInput listing the first MAX_PROBLEMS of pydantic-style `errors` (each
    with `loc` and `msg`), and how many more there were."""
    problems: list[dict[str, Any]] = []
    more = 0
    for err in errors:
        if len(problems) == MAX_PROBLEMS:
            more += 1
            continue
        problems.append(
            {
                "field": field_name(err.get("loc", ()), prefix),
                "message": clip(str(err.get("msg")), MAX_PROBLEM_CHARS),
            }
        )
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid"
    if more:
        summary += f"; and {more} more problems"
    field = problems[0]["field"] if problems else None
    details: dict[str, Any] = {"field": field, "problems": problems}
    if more:
        details["more_problems"] = more
    return InvalidInput(f"{what}: {summary}", **details)
