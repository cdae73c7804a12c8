"""The Pipes message reader parses only whole lines, however the writer's bytes arrive."""

import json
import random
import threading
import time

import pytest

from flow_pipeline.defs.pipes_reader import WholeLineTempFileMessageReader, whole_lines


class RecordingHandler:
    """Stands in for Dagster's PipesMessageHandler: keeps messages and framework errors."""

    def __init__(self):
        self.messages, self.errors = [], []

    def handle_message(self, message):
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin, exc_info):
        self.errors.append((origin, exc_info[1]))


def _messages(rng: random.Random, count: int) -> list[dict]:
    return [{"method": "log", "params": {"message": "é" * rng.randrange(1, 5000), "level": "info"}}
            for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_lines_reassembles_lines_cut_at_random_places(seed):
    rng = random.Random(seed)
    text = "".join(json.dumps(m) + "\n" for m in _messages(rng, 20))
    cuts = sorted(rng.sample(range(1, len(text)), 60))
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    # Interleave "nothing new yet" answers, as a tail of a file being written gives.
    feed = [c for chunk in chunks for c in (chunk, "")]
    lines = list(whole_lines(lambda: feed.pop(0) if feed else "", lambda: not feed))
    assert lines == text.splitlines()


def test_whole_lines_yields_an_unterminated_remainder_once_stopped():
    feed = iter(['{"a": 1}\n{"b"', ': 2}'])
    assert list(whole_lines(lambda: next(feed, ""), lambda: True)) == ['{"a": 1}', '{"b": 2}']


def test_reader_delivers_a_message_written_in_pieces_with_pauses():
    handler = RecordingHandler()
    sent = _messages(random.Random(3), 4)
    with WholeLineTempFileMessageReader().read_messages(handler) as params:
        line = "".join(json.dumps(m) + "\n" for m in sent)

        def write_slowly():
            with open(params["path"], "a", encoding="utf-8") as f:
                for start in range(0, len(line), 1500):
                    f.write(line[start:start + 1500])
                    f.flush()
                    time.sleep(0.03)  # longer than the reader's poll: it sees half-written lines

        writer = threading.Thread(target=write_slowly)
        writer.start()
        writer.join()
    assert handler.errors == []
    assert handler.messages == sent
