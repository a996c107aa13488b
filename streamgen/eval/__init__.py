"""Metrics, ASR and the evaluation runner (and a SimulEval agent)."""
