"""Stop conditions: finish reasons after each token, and stop strings over streamed deltas."""
from __future__ import annotations

import itertools

import pytest

from engine.config import SamplingParams
from engine.request import Request
from engine.stop import StopStringMatcher, check_stop

EOS = frozenset({2})


def _req(output: list[int], prompt_len: int = 3, **kw) -> Request:
    r = Request("r", list(range(10, 10 + prompt_len)), SamplingParams(**kw))
    r.output_ids = list(output)
    return r


def test_eos_stops_unless_ignored():
    assert check_stop(_req([5, 2], max_tokens=10), EOS, 100) == "stop"
    assert check_stop(_req([5, 2], max_tokens=10, ignore_eos=True), EOS, 100) is None
    assert check_stop(_req([5, 6], max_tokens=10), EOS, 100) is None


def test_stop_token_ids_stop_even_with_ignore_eos():
    assert check_stop(_req([7], max_tokens=10, stop_token_ids=[7, 8]), EOS, 100) == "stop"
    assert check_stop(_req([8], max_tokens=10, stop_token_ids=[7, 8], ignore_eos=True), EOS, 100) == "stop"


def test_max_tokens():
    assert check_stop(_req([5, 6], max_tokens=3), EOS, 100) is None
    assert check_stop(_req([5, 6, 7], max_tokens=3), EOS, 100) == "length"
    # Reaching EOS on the last allowed token is a stop, not a length finish.
    assert check_stop(_req([5, 6, 2], max_tokens=3), EOS, 100) == "stop"


def test_max_model_len():
    # prompt 3 + output 4 = 7 tokens: the context window of 7 is full.
    assert check_stop(_req([5, 6, 7, 8], max_tokens=None), EOS, 7) == "length"
    assert check_stop(_req([5, 6, 7], max_tokens=None), EOS, 7) is None
    assert check_stop(_req([5, 6, 7, 8], max_tokens=100, ignore_eos=True), EOS, 7) == "length"


def _run(stops: list[str], parts: list[str], include: bool = False) -> tuple[str, bool, list[str]]:
    m = StopStringMatcher(stops, include)
    out, released = "", []
    matched = False
    for d in parts:
        text, matched = m.feed(d)
        released.append(text)
        out += text
        if matched:
            break
    if not matched:
        tail = m.flush()
        released.append(tail)
        out += tail
    return out, matched, released


def _splits(text: str, max_cuts: int = 2):
    """Every way of cutting text into up to max_cuts + 1 deltas (empty deltas included)."""
    for n in range(max_cuts + 1):
        for cuts in itertools.combinations_with_replacement(range(len(text) + 1), n):
            bounds = [0, *cuts, len(text)]
            yield [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(("stops", "text", "include", "expected", "matched"), [
    (["STOP"], "hello STOP world", False, "hello ", True),
    (["STOP"], "hello STOP world", True, "hello STOP", True),
    (["STOP"], "hello STO", False, "hello STO", False),  # a partial stop at the end is released by flush
    (["ab", "b c"], "xa b cab", False, "xa ", True),  # "b c" completes before "ab"
    (["ab", "b c"], "xa b cab", True, "xa b c", True),
    (["abcd", "bc"], "xabcd", False, "xa", True),  # "bc" ends first although "abcd" starts first
    (["bc", "abc"], "xabc", False, "x", True),  # same end: the longer (earlier-starting) one wins
    (["bc", "abc"], "xabc", True, "xabc", True),
    (["aab"], "aaab", False, "a", True),  # the holdback must not lose the right starting point
    (["\n\n", "END"], "one\ntwo\n\nEND", False, "one\ntwo", True),
    (["x"], "", False, "", False),
])
def test_stop_strings_at_every_split(stops, text, include, expected, matched):
    for parts in _splits(text):
        out, got_matched, released = _run(stops, parts, include)
        assert (out, got_matched) == (expected, matched), parts
        # A client never sees a partial stop string it should not: every released prefix is a prefix of
        # the final text, so nothing is ever taken back.
        assert expected.startswith("".join(released)), parts


def test_holds_back_only_possible_stop_prefixes():
    m = StopStringMatcher(["</end>", "STOP"])
    assert m.feed("abc<") == ("abc", False)
    assert m.feed("/e") == ("", False)
    assert m.feed("x") == ("</ex", False)  # no longer a prefix: released at once
    assert m.feed("ST") == ("", False)
    assert m.flush() == "ST"


def test_nothing_after_a_match():
    m = StopStringMatcher(["ab"])
    assert m.feed("xaby") == ("x", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_no_stops_releases_everything():
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_min_tokens_holds_off_every_stop_but_length():
    assert check_stop(_req([2], max_tokens=10, min_tokens=2), EOS, 100) is None  # EOS too early
    assert check_stop(_req([7], max_tokens=10, min_tokens=2, stop_token_ids=[7]), EOS, 100) is None
    assert check_stop(_req([5, 2], max_tokens=10, min_tokens=2), EOS, 100) == "stop"
    assert check_stop(_req([5, 6], max_tokens=2, min_tokens=2), EOS, 100) == "length"
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_stop_string_before_min_tokens_is_text_and_one_completed_after_it_stops():
    m = StopStringMatcher(["END"])
    assert m.feed("a END b", can_stop=False) == ("a END b", False)  # too early: released as text
    assert m.feed("E", can_stop=False) == ("", False)  # may begin a stop string: held
    assert m.feed("ND!", can_stop=True) == ("", True)  # completed once stopping is allowed
