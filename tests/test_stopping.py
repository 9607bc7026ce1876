"""When generation stops, and which text is safe to release while it runs."""

from __future__ import annotations

from triforce.stopping import StopChecker


class CharTokenizer:
    """Token i is the character chr(i); 0xFFFD stands for half of a multi-byte character."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_a_possible_stop_string_is_held_back_until_it_is_decided():
    stopper = StopChecker(CharTokenizer(), set(), ["END"], max_new_tokens=100)
    assert stopper.add(ids("abc E")) == "abc "  # "E" may start "END"
    assert stopper.add(ids("N")) == ""  # "EN" still may
    assert stopper.add(ids("X")) == "ENX"  # it did not
    assert stopper.add(ids(" zEND tail")) == " z"
    assert stopper.finish_reason == "stop" and stopper.text == "abc ENX z"


def test_eos_and_length_end_inside_a_step():
    stopper = StopChecker(CharTokenizer(), {ord("!")}, [], max_new_tokens=100)
    assert stopper.add(ids("hi!ignored")) == "hi!"
    assert stopper.finish_reason == "eos" and stopper.tokens == ids("hi!")
    short = StopChecker(CharTokenizer(), set(), [], max_new_tokens=3)
    assert short.add(ids("abcdef")) == "abc" and short.finish_reason == "length"


def test_an_incomplete_character_is_not_released():
    stopper = StopChecker(CharTokenizer(), set(), [], max_new_tokens=100)
    assert stopper.add([ord("a"), 0xFFFD]) == "a"
    assert stopper.add([ord("b")]) == "\ufffdb"  # released once text follows it
