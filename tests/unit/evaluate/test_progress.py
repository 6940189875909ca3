"""The progress bar of ``dicomnode evaluate``: one line on its stream, or nothing."""

from __future__ import annotations

from dicomnode.evaluate import Progress


def test_progress_line() -> None:
    class Sink:
        text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    sink = Sink()
    bar = Progress(4, True, sink)  # type: ignore[arg-type]
    bar.advance()
    assert sink.text == "\r[1/4] #####---------------  25% 00:00 elapsed"
    for _ in range(3):
        bar.advance()
    assert sink.text.endswith("[4/4] #################### 100% 00:00 elapsed\n")
    quiet = Sink()
    silent = Progress(4, False, quiet)  # type: ignore[arg-type]
    silent.advance()
    assert quiet.text == "" and silent.done == 1
