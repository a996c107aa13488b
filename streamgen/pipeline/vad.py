"""Voice activity: silero-vad (its weights ship in its package) ends a session's input after trailing silence."""

from __future__ import annotations

import torch


class Vad:
    """silero-vad (its weights ship in its package): the input ends after `silence_ms` of silence
    that follows speech."""

    def __init__(self, sample_rate: int = 16000, silence_ms: int = 700, threshold: float = 0.5):
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise RuntimeError("VAD needs silero-vad: pip install 'streamgen[vad]'") from None
        if sample_rate != 16000:
            raise ValueError("the VAD runs at 16 kHz")
        self.model = load_silero_vad()
        self.window = 512
        self.silence = int(silence_ms * sample_rate / 1000)
        self.threshold = threshold
        self.state: dict[str, dict] = {}

    @torch.no_grad()
    def ended(self, session: str, samples: torch.Tensor) -> bool:
        st = self.state.setdefault(session, {"buf": torch.zeros(0), "speech": False, "quiet": 0})
        buf = torch.cat([st["buf"], samples])
        while len(buf) >= self.window:
            # one model per process, sessions interleave: reset its recurrent state per session window
            # (each 32 ms window is scored on its own, which is how the speech/silence decision is used here)
            self.model.reset_states()
            p = float(self.model(buf[: self.window], 16000))
            buf = buf[self.window :]
            if p >= self.threshold:
                st["speech"], st["quiet"] = True, 0
            elif st["speech"]:
                st["quiet"] += self.window
        st["buf"] = buf
        return st["speech"] and st["quiet"] >= self.silence

    def close(self, session: str) -> None:
        self.state.pop(session, None)
