"""llama.cpp's code-completion stop conditions, applied to the text as it streams out of the engine.

``n_indent``: after the first line, a line indented by fewer than ``n_indent`` spaces or tabs ends the
completion, which is cut at the start of that line (the model left the block being completed). The
whitespace that starts a line is held back until the line's first other character decides.
``t_max_predict_ms``: once generating has taken longer than this (from the first token) and a newline
was generated, the completion ends there (a slow completion still returns whole lines).
Both stop with llama.cpp's ``stop_type`` "limit"; the API aborts the engine request.
"""

from __future__ import annotations


class LocalStops:
    def __init__(self, n_indent: int = 0, t_max_predict_ms: int = 0) -> None:
        self.n_indent = n_indent
        self.t_max_s = t_max_predict_ms / 1000.0
        self.text = ""  # everything generated so far (released + held back)
        self.released = 0  # characters of self.text handed out
        self.first_token_s: float | None = None
        self.stopped = False

    def feed(self, delta: str, now_s: float) -> str:
        """Add generated text; return what may be sent now. Sets ``stopped`` when a condition is met."""
        if self.stopped:
            return ""
        if self.first_token_s is None:
            self.first_token_s = now_s
        self.text += delta
        end = len(self.text)
        if self.n_indent:
            end = self._indent_cut()
        if not self.stopped and self.t_max_s and now_s - self.first_token_s > self.t_max_s and "\n" in self.text:
            self.stopped = True
        return self._release(end)

    def flush(self) -> str:
        """What is left to send once the engine finished the request."""
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, end: int) -> str:
        if self.stopped:
            self.text = self.text[:end]
        out = self.text[self.released:end]
        self.released = max(self.released, end)
        return out

    def _indent_cut(self) -> int:
        """Where the text may be released up to; stops (and cuts) at a line indented too little."""
        start = self.text.find("\n") + 1
        if start == 0:
            return len(self.text)  # still the first line: its indentation is the prompt's business
        while True:
            nl = self.text.find("\n", start)
            line = self.text[start:] if nl < 0 else self.text[start:nl]
            indent = len(line) - len(line.lstrip(" \t"))
            if indent == len(line):  # blank so far: undecided until another character (or a newline) comes
                if nl < 0:
                    return start
            elif indent < self.n_indent:
                self.stopped = True
                return start
            if nl < 0:
                return len(self.text)
            start = nl + 1
