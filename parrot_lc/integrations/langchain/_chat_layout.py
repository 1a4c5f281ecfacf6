"""A chat's prompt as the served model's chat template renders it, with contents that are not known yet.

A deferred chat call is a graph call like a completion's: its prompt is the chat rendered with the model's chat
template, which the server knows and the graph API does not apply (it takes text and variables). So the client
renders it: the server renders probe messages (`POST /tokenize`, then `/detokenize`), and the text around their
contents is the layout of every chat of those roles. A shared system prompt is then the same leading text in every
call, which the server fills once.

That holds for templates that insert each content as it is, which most do. The probes check it: two renders, with
contents padded with whitespace, quotes, braces, angle brackets and `</think>`, must differ by exactly the contents;
a template that trims, escapes or edits them (one that drops an assistant's reasoning) fails, and its chats run
eagerly. A template whose output depends on contents in another way (a content it compares with a fixed string) is
not caught: run such a model's chats eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence

from parrot_lc.frontend import InvalidRequestError, ParrotClient

_SENTINEL = "\u2064{}\u2064"  # INVISIBLE PLUS around the message's index: in no real content
_PADDED = " \n\t<'\"&{{x}}</think>\n" + _SENTINEL + "\n</think>{{y}}\"'& \n"


class ChatLayout:
    """The text of a chat prompt around the contents of its messages, for one sequence of roles."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = tuple(texts)  # one more than the messages: before the first content, between, after the last

    def render(self, contents: Sequence[str]) -> str:
        parts = [self.texts[0]]
        for content, text in zip(contents, self.texts[1:]):
            parts += [content, text]
        return "".join(parts)


def chat_layout(client: ParrotClient, model: str | None, roles: Sequence[str]) -> ChatLayout | None:
    """The layout of chats of these roles on the server of `client`, or None if the chat template does not insert
    contents as they are (or refuses these roles). Other errors of the server (unreachable, overloaded, a wrong
    key) say nothing of its template: they are raised, as the chat's own request would raise them."""
    try:
        plain = _render(client, model, roles, [_SENTINEL.format(i) for i in range(len(roles))])
        padded = _render(client, model, roles, [_PADDED.format(i) for i in range(len(roles))])
    except InvalidRequestError:  # the template refuses these roles (or their order)
        return None
    if plain is None or padded is None:
        return None
    texts, rest = [], plain
    for i in range(len(roles)):
        before, found, rest = rest.partition(_SENTINEL.format(i))
        if not found or _SENTINEL.format(i) in rest:
            return None
        texts.append(before)
    layout = ChatLayout([*texts, rest])
    return layout if layout.render([_PADDED.format(i) for i in range(len(roles))]) == padded else None


def _render(client: ParrotClient, model: str | None, roles: Sequence[str], contents: Sequence[str]) -> str | None:
    """The chat prompt of these messages as the server renders it (its tokens' text); None if that text does not
    tokenize back to the same tokens."""
    messages = [{"role": role, "content": content} for role, content in zip(roles, contents)]
    tokens = client.tokenize(messages=messages, model=model, add_special_tokens=False)
    text = client.detokenize(tokens, model=model)
    return text if client.tokenize(text, model=model, add_special_tokens=False) == tokens else None
