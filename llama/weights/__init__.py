"""Readers of model-weight formats that carry more than tensors (today GGUF: weights, config and vocabulary).

Each reader returns tensors as `llama.checkpoint.Entry` objects under MindFormers names, so the one writer in
llama/checkpoint.py streams them into a verified folder.
"""
