"""Templates of semantic functions: constant text with input and output placeholders.

Syntax::

    Summarize this report: {{input:report}}
    Summary: {{output:summary}}

- `{{input:NAME}}` is replaced by the value of the input variable NAME; `{{output:NAME}}` is where the model
  generates the value of the output variable NAME. Whitespace around the kind and the name is allowed
  (`{{ output : summary }}`); a name is a Python identifier.
- Single braces are plain text (`{"a": 1}` needs no escaping). A literal `{{` or `}}` is written `\\{{` or
  `\\}}` (the backslash is dropped); a `}}` that closes no placeholder is an error. In `{{{input:x}}}` the
  first `{` and the last `}` are text.
- Outputs are generated in template order, each seeing the text before it. An input may come after an output,
  but an output's own value cannot be read back as an input, an output cannot appear twice, and a template
  needs at least one output.

Every error raises TemplateError with the character position of the offending placeholder (its `{{`), of the
stray `}}`, or the template's length for what is missing at the end.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

KINDS = ("input", "output")


class TemplateError(ValueError):
    """A template that cannot be a semantic function; `position` is a character offset in the template."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} (at position {position})")
        self.message = message
        self.position = position


@dataclass(frozen=True)
class Text:
    """Constant text."""

    text: str


@dataclass(frozen=True)
class Placeholder:
    """An input or output variable, at `position` (the offset of its `{{`) in the template (`Template.of` sets it
    in the template it builds)."""

    kind: Literal["input", "output"]
    name: str
    position: int = 0


Piece = Text | Placeholder


@dataclass(frozen=True)
class Template:
    """A template: its source and its pieces (no empty text). Parsing merges adjacent text; `of()` keeps it apart."""

    source: str
    pieces: tuple[Piece, ...]

    @classmethod
    def of(cls, pieces: Iterable[Piece]) -> Template:
        """The template of these pieces as they are: adjacent texts stay apart, so that a text that other calls
        begin with too is a piece of its own (the server fills such a prefix once and forks the calls from it);
        empty texts are dropped. Placeholders follow the rules of parsing; the source is the pieces written in
        template syntax, where positions count."""
        kept: list[Piece] = []
        written: list[str] = []
        seen: dict[str, Placeholder] = {}
        position = 0
        for piece in pieces:
            if isinstance(piece, Text):
                if not piece.text:
                    continue
                text = piece.text.replace("{{", "\\{{").replace("}}", "\\}}")
            else:
                piece = _placeholder(f"{piece.kind}:{piece.name}", position, None)
                _note_use(piece, seen)
                text = f"{{{{{piece.kind}:{piece.name}}}}}"
            kept.append(piece)
            written.append(text)
            position += len(text)
        _check_has_output(seen, position)
        return cls("".join(written), tuple(kept))

    @property
    def inputs(self) -> tuple[str, ...]:
        """Input names, each once, in order of first appearance."""
        return tuple(dict.fromkeys(p.name for p in self.placeholders if p.kind == "input"))

    @property
    def outputs(self) -> tuple[str, ...]:
        """Output names in template order (the order they are generated in)."""
        return tuple(p.name for p in self.placeholders if p.kind == "output")

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        return tuple(p for p in self.pieces if isinstance(p, Placeholder))


def parse_template(source: str, parameters: Collection[str] | None = None) -> Template:
    """Parses `source`; with `parameters` (a function's parameter names), every placeholder must name one of
    them and every one of them must appear in the template."""
    pieces: list[Piece] = []
    text: list[str] = []
    seen: dict[str, Placeholder] = {}  # first placeholder of each name
    i, n = 0, len(source)
    while i < n:
        if source.startswith(("\\{{", "\\}}"), i):
            text.append(source[i + 1:i + 3])
            i += 3
        elif source.startswith("{{{", i):
            text.append("{")  # the last two braces of a run open the placeholder
            i += 1
        elif source.startswith("{{", i):
            end = source.find("}}", i + 2)
            reopened = source.find("{{", i + 2, end if end != -1 else n)
            if end == -1 or reopened != -1:
                raise TemplateError("'{{' is not closed by '}}' (write '\\{{' for literal braces)", i)
            placeholder = _placeholder(source[i + 2:end], i, parameters)
            _note_use(placeholder, seen)
            if text:
                pieces.append(Text("".join(text)))
                text = []
            pieces.append(placeholder)
            i = end + 2
        elif source.startswith("}}", i):
            raise TemplateError("'}}' closes no placeholder (write '\\}}' for literal braces)", i)
        else:
            text.append(source[i])
            i += 1
    if text:
        pieces.append(Text("".join(text)))
    _check_has_output(seen, n)
    unused = [name for name in parameters or () if name not in seen]
    if unused:
        raise TemplateError(f"parameter {unused[0]!r} does not appear in the template", n)
    return Template(source, tuple(pieces))


def _placeholder(body: str, position: int, parameters: Collection[str] | None) -> Placeholder:
    kind, colon, name = (part.strip() for part in body.partition(":"))
    if not colon:
        raise TemplateError(f"placeholder {{{{{body}}}}} has no kind: write {{{{input:NAME}}}} or "
                            f"{{{{output:NAME}}}}", position)
    if kind not in KINDS:
        raise TemplateError(f"unknown placeholder kind {kind!r} (expected 'input' or 'output')", position)
    if not name:
        raise TemplateError(f"{kind} placeholder with an empty name", position)
    if not name.isidentifier():
        raise TemplateError(f"invalid {kind} name {name!r} (a Python identifier is expected)", position)
    if parameters is not None and name not in parameters:
        raise TemplateError(f"{name!r} is not a parameter of the function "
                            f"(parameters: {', '.join(parameters) or 'none'})", position)
    return Placeholder(kind, name, position)  # type: ignore[arg-type]  # kind is checked above


def _note_use(placeholder: Placeholder, seen: dict[str, Placeholder]) -> None:
    """Notes a placeholder in `seen` (the first of each name). Outputs are generated in order: each name is either
    an input (any number of times) or one output."""
    first = seen.get(placeholder.name)
    if first is None:
        seen[placeholder.name] = placeholder
        return
    name, position = placeholder.name, placeholder.position
    if placeholder.kind == "output" and first.kind == "output":
        raise TemplateError(f"output {name!r} appears twice (first at position {first.position})", position)
    if placeholder.kind == "output":
        raise TemplateError(f"{name!r} is an input (at position {first.position}) and an output", position)
    if first.kind == "output":
        raise TemplateError(f"output {name!r} is used as an input", position)


def _check_has_output(seen: dict[str, Placeholder], end: int) -> None:
    if not any(p.kind == "output" for p in seen.values()):
        raise TemplateError("the template has no {{output:NAME}} placeholder", end)
