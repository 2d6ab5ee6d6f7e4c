"""llama.cpp's code-completion stops (n_indent, t_max_predict_ms) on streamed text, and response_fields."""

from csps.server.llama_api import select_fields
from csps.server.llama_stops import LocalStops


def feed_all(stops: LocalStops, pieces: list[str], dt: float = 0.0) -> str:
    out = "".join(stops.feed(p, i * dt) for i, p in enumerate(pieces))
    return out + stops.flush()


def test_no_conditions_pass_everything_through():
    s = LocalStops()
    assert feed_all(s, ["def f():\n", "return 1\n", "x"]) == "def f():\nreturn 1\nx" and not s.stopped


def test_a_line_indented_less_than_n_indent_ends_the_completion_at_its_start():
    s = LocalStops(n_indent=4)
    out = feed_all(s, ["x = 1\n", "    y = 2\n", "\n", "  ", "  ", "z = 3\n", "def g():\n"])
    # the first line's indentation is the prompt's business; blank lines do not stop; '    z' (4) passes
    assert out == "x = 1\n    y = 2\n\n    z = 3\n" and s.stopped
    s = LocalStops(n_indent=4)
    assert feed_all(s, ["    a\n", "  ", "b", "\n    c"]) == "    a\n" and s.stopped
    assert s.feed("more", 1.0) == "" and s.flush() == ""


def test_leading_whitespace_of_a_line_is_held_back_until_the_line_decides():
    s = LocalStops(n_indent=2)
    assert s.feed("a\n", 0) == "a\n"
    assert s.feed(" ", 0) == ""  # undecided: one space so far
    assert s.feed(" b", 0) == "  b" and not s.stopped
    assert s.feed("\n", 0) == "\n"
    assert s.flush() == ""


def test_t_max_predict_stops_after_the_time_once_a_newline_was_generated():
    s = LocalStops(t_max_predict_ms=100)
    assert s.feed("a", 0.0) == "a"
    assert s.feed("b", 0.5) == "b" and not s.stopped  # late, but no newline yet
    assert s.feed("\n", 0.6) == "\n" and s.stopped  # the token that completes the line is kept
    assert s.feed("c", 0.7) == ""
    fast = LocalStops(t_max_predict_ms=100)
    assert feed_all(fast, ["a\n", "b\n", "c"], dt=0.01) == "a\nb\nc" and not fast.stopped


def test_response_fields_select_and_unnest():
    body = {"content": "x", "timings": {"prompt_n": 3, "predicted_n": 2}, "stop": True}
    assert select_fields(body, None) is body
    assert select_fields(body, ["content", "timings/prompt_n", "timings/nothing", "absent"]) == {
        "content": "x", "timings/prompt_n": 3}
