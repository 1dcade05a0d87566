"""Cut streamed text at the first stop string without ever sending part of one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopScanner:
    """Feed text pieces; get back what is safe to send, and whether a stop string was reached."""

    stops: tuple[str, ...]
    _held: str = field(default="", init=False)
    stopped: bool = field(default=False, init=False)

    def feed(self, text: str) -> str:
        """Text that can be sent now; after a stop string, nothing more."""
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        pending = self._held + text
        cut = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return pending[:cut]
        keep = self._longest_stop_prefix_suffix(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """Whatever was held back, once the generation ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        # The longest tail of `text` that could still grow into a stop string.
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[-n:]):
                    best = n
                    break
        return best
