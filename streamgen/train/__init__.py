"""Corpora, unit extraction and training (prompts, backbone, unit encoder, vocoder)."""
