"""conversations/sse.py: the model server's event stream, cut into events."""

import json

import pytest

from conversations import sse

STREAM = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'


def test_each_event_gives_its_data():
    assert sse.Events().feed(STREAM) == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]


@pytest.mark.parametrize("at", range(1, len(STREAM)))
def test_an_event_cut_anywhere_across_reads_is_whole(at):
    events = sse.Events()
    assert events.feed(STREAM[:at]) + events.feed(STREAM[at:]) == sse.Events().feed(STREAM)


def test_crlf_lines_comments_and_other_fields_are_read_as_the_standard_says():
    stream = b': keep-alive\r\nevent: chunk\r\nid: 7\r\ndata:{"a": 1}\r\n\r\n'
    assert sse.Events().feed(stream) == [b'{"a": 1}']


def test_an_event_of_several_data_lines_joins_them_with_newlines():
    assert sse.Events().feed(b"data: {\ndata: }\n\n") == [b"{\n}"]


def test_a_last_event_without_its_empty_line_counts_at_the_end():
    events = sse.Events()
    assert events.feed(b'data: {"a": 1}') == []
    assert events.finish() == [b'{"a": 1}']


def test_a_line_that_never_ends_is_refused_before_it_fills_memory(monkeypatch):
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 1000)
    events = sse.Events()
    events.feed(b"data: " + b"x" * 900)
    with pytest.raises(sse.EventTooLarge):
        events.feed(b"x" * 200)


def test_an_event_of_many_data_lines_is_refused_past_the_limit(monkeypatch):
    monkeypatch.setattr(sse, "MAX_EVENT_BYTES", 1000)
    with pytest.raises(sse.EventTooLarge):
        sse.Events().feed(b"data: " + b"x" * 600 + b"\ndata: " + b"x" * 600 + b"\n")


def test_json_with_a_lone_surrogate_is_read_for_clean_to_mend():
    assert sse.loads(b'{"a": "x\\ud800"}') == {"a": "x\ud800"}


def test_what_is_not_json_is_a_json_decode_error():
    with pytest.raises(json.JSONDecodeError):
        sse.loads(b"{this is not json")
