"""A Dagster Pipes message reader that only ever parses whole lines.

Dagster's ``PipesFileMessageReader`` tails the message file with ``readline()``, which at end of file returns whatever
part of a line has landed so far. A reader that catches the training process mid-write (a long materialization
report straddling a page boundary) parses half a JSON line, its thread dies, and every later message of the run —
the materialization included — is lost. This reader keeps an unterminated tail until its newline arrives.
"""

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg
from dagster_pipes import PipesDefaultMessageWriter

_POLL_S = 0.01


def whole_lines(read_chunk: Callable[[], str], should_stop: Callable[[], bool]) -> Iterator[str]:
    """Yield newline-terminated lines (newline stripped) from ``read_chunk`` (``''`` = nothing new yet).

    A partial line is held back until its newline arrives. Once ``should_stop()`` is true and the source is drained,
    a final unterminated remainder (the writer died mid-line) is yielded as is.
    """
    pending = ""
    while True:
        chunk = read_chunk()
        if chunk:
            pending += chunk
            *complete, pending = pending.split("\n")
            yield from (line for line in complete if line)
        elif should_stop():
            if pending:
                yield pending
            return
        else:
            time.sleep(_POLL_S)


class WholeLineTempFileMessageReader(dg.PipesMessageReader):
    """Pipes messages through a temporary file, one JSON message per line, parsed only once the line is complete."""

    @contextmanager
    def read_messages(self, handler) -> Iterator[dict]:
        with tempfile.TemporaryDirectory(prefix="pipes-messages-") as tempdir:
            path = os.path.join(tempdir, "messages")
            open(path, "w", encoding="utf-8").close()
            session_closed = threading.Event()
            thread = threading.Thread(target=self._read, args=(path, handler, session_closed), daemon=True)
            thread.start()
            try:
                yield {PipesDefaultMessageWriter.FILE_PATH_KEY: path,
                       PipesDefaultMessageWriter.INCLUDE_STDIO_IN_MESSAGES_KEY: False}
            finally:
                session_closed.set()
                thread.join()

    @staticmethod
    def _read(path: str, handler, session_closed: threading.Event) -> None:
        try:
            with open(path, encoding="utf-8") as stream:
                for line in whole_lines(lambda: stream.read(), session_closed.is_set):
                    handler.handle_message(json.loads(line))
        except Exception:
            handler.report_pipes_framework_exception("WholeLineTempFileMessageReader reader thread", sys.exc_info())
            raise

    def no_messages_debug_text(self) -> str:
        return "Attempted to read messages from a local temporary file."
