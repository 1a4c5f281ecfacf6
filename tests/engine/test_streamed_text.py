"""Streamed text: decoded a window of tokens at a time, it joins to the tokenizer's decode of the whole output,
with the same stop-string cuts."""

import random

import pytest

from parrot_lc.engine.loader import load_model_info
from parrot_lc.engine.request import StreamedText, text_decoder

TEXTS = ["Hello, world! Les élèves n'ont pas été là.", "数学は楽しい 🦜🦜 parrots", "def f(x):\n    return x ** 2  # ok",
         "   spaces   and\ttabs\n\nnew lines", "ÅÄÖ ñ ß — “quotes” …"]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request, tmp_path_factory):
    if request.param == "smollm2":
        pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    return load_model_info(request.param, tmp_path_factory.mktemp("cache"))[1]


def stream(tokenizer, token_ids: list[int], stops: tuple[str, ...] = (), min_tokens: int = 0) -> tuple[str, bool]:
    """The deltas of `token_ids` added one at a time, joined; and whether a stop string ended them (looked for
    after the first `min_tokens` tokens)."""
    text = StreamedText(text_decoder(tokenizer), stops)
    deltas = []
    for n in range(1, len(token_ids) + 1):
        delta, stopped = text.add(token_ids[:n], final=n == len(token_ids), find_stops=n > min_tokens)
        deltas.append(delta)
        if stopped:
            return "".join(deltas), True
    return "".join(deltas), False


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_join_to_the_decode_of_the_whole_output(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert stream(tokenizer, ids) == (tokenizer.decode(ids, skip_special_tokens=True), False)


def test_random_tokens_stream_to_their_whole_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
        assert stream(tokenizer, ids)[0] == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stop", ["world", "é", "🦜", "x **", "\n\n"])
def test_a_stop_string_cuts_the_streamed_text_where_the_whole_text_has_it_first(tokenizer, stop):
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        streamed, stopped = stream(tokenizer, ids, (stop, "never there"))
        expected = whole[: whole.index(stop)] if stop in whole else whole
        assert (streamed, stopped) == (expected, stop in whole), text


def test_of_two_stop_strings_the_one_the_text_has_first_cuts_it(tokenizer):
    ids = tokenizer("say ABC now", add_special_tokens=False).input_ids
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert stream(tokenizer, ids, ("B", "AB")) == (whole[: whole.index("AB")], True)  # "B" is found, but later


def test_a_stop_string_that_ended_before_min_tokens_never_cuts_the_text(tokenizer):
    """Whatever the other stop strings' lengths (a longer one widens no other's search back)."""
    ids = tokenizer("say AB then more words", add_special_tokens=False).input_ids
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    held = next(n for n in range(1, len(ids)) if "AB" in tokenizer.decode(ids[:n], skip_special_tokens=True))
    assert stream(tokenizer, ids, ("AB", "a much longer stop"), min_tokens=held) == (whole, False)
