"""Tokenization and MindRecord writing for WikiText-2, Alpaca and SQuAD 1.1."""
