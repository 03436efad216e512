"""Evaluation: perplexity and SQuAD EM/F1 under both conventions, and batch prediction."""
