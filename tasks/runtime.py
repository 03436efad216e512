"""One MindSpore model at a time in a flow's process, and its memory given back when it is done."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from llama.eval.loading import release_warm_model, warm_models
from tasks.cache import MINDSPORE_LOCK


@contextmanager
def one_model(warm: bool = False):
    """Hold the MindSpore lock (see tasks.cache) for a task that builds and runs a model.

    `warm` (evaluations): reuse the previous evaluation's model and its compiled graphs when the checkpoint
    has the same config (llama.eval.loading), and keep MindSpore's runtime memory, which those graphs need:
    after `ms_memory_recycle` every graph compiles again (a 30-layer model's prefill and decode graphs take
    about 25 s). Any other task lets the warm model go first and recycles that memory when it is done:
    MindSpore keeps it for every model a process has run, so a pipeline that evaluates a base and a
    finetuned model would otherwise grow by gigabytes per task (four squad + perplexity evaluations of
    stories260K with a fresh model each reach 11.6 GB without it, 1.7 GB with it)."""
    import mindspore

    with MINDSPORE_LOCK:
        if not warm:
            release_warm_model()
        try:
            with warm_models() if warm else nullcontext():
                yield
        finally:
            if not warm:
                mindspore.ms_memory_recycle()
