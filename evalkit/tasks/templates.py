"""Turning a doc into text, target and choices the way lm-eval reads ``doc_to_*`` values.

A value is a field name (when the doc has that field), a Jinja2 template, a list, an integer or
a ``!function`` callable. Templates are strict: a missing field is an error naming the field.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from typing import Any

import jinja2

from evalkit.errors import UsageError
from evalkit.tasks.yaml_loader import FunctionRef


def _regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, text, count=count)


_ENV = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace


@lru_cache(maxsize=1024)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UsageError(f"bad Jinja2 template {template!r}: {exc.message}") from None


def render(template: str, doc: dict[str, Any], task: str) -> str:
    try:
        return _compile(template).render(**doc)
    except jinja2.UndefinedError as exc:
        raise UsageError(
            f"task {task}: template {template!r} uses a field the doc lacks ({exc.message}); "
            f"doc fields are: {', '.join(doc)}"
        ) from None


class DocFormatter:
    """doc_to_text / doc_to_target / doc_to_choice for one task."""

    def __init__(self, task: str, features: list[str], has_choices: bool) -> None:
        self.task = task
        self.features = set(features)
        self.has_choices = has_choices

    def text(self, spec: Any, doc: dict[str, Any]) -> Any:
        if isinstance(spec, int):
            return spec
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            rendered = render(spec, doc, self.task)
            return ast.literal_eval(rendered) if rendered.isdigit() and self.has_choices else rendered
        return self._call(spec, doc, "doc_to_text")

    def target(self, spec: Any, doc: dict[str, Any]) -> Any:
        if isinstance(spec, (int, list)):
            return spec
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            rendered = render(spec, doc, self.task)
            if rendered.isdigit() and self.has_choices:
                return ast.literal_eval(rendered)
            if len(rendered) >= 2 and rendered[0] == "[" and rendered[-1] == "]":
                try:
                    return ast.literal_eval(rendered)
                except (SyntaxError, ValueError):
                    return rendered
            return rendered
        return self._call(spec, doc, "doc_to_target")

    def choices(self, spec: Any, doc: dict[str, Any]) -> list[str]:
        if isinstance(spec, str):
            if spec in self.features:
                return doc[spec]
            rendered = render(spec, doc, self.task)
            try:
                return ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                raise UsageError(
                    f"task {self.task}: doc_to_choice rendered {rendered!r}, which is not a Python list literal"
                ) from None
        if isinstance(spec, list):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        return self._call(spec, doc, "doc_to_choice")

    def field_or_template(self, spec: str | None, doc: dict[str, Any]) -> str:
        if not spec:
            return ""
        return doc[spec] if spec in doc else render(spec, doc, self.task)

    def _call(self, spec: Any, doc: dict[str, Any], key: str) -> Any:
        if isinstance(spec, FunctionRef):
            spec = spec.resolve()
        if callable(spec):
            return spec(doc)
        raise UsageError(f"task {self.task}: {key} must be a field name, template, list or !function, not {spec!r}")
