"""One MindSpore model at a time in a flow's process, and its memory given back when it is done."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from llama.eval.loading import release_warm_model, warm_models
from tasks.cache import MINDSPORE_LOCK


@contextmanager
def one_model(warm: bool = False):
    """Hold the MindSpore lock (see tasks.cache) for a task that builds and runs a model; on leaving, recycle
    MindSpore's cached runtime memory. MindSpore keeps it for every model a process has run, so a pipeline
    that evaluates a base and a finetuned model (eight evaluations and a training) would otherwise grow by
    gigabytes per task: four squad + perplexity evaluations of stories260K in one process reach 11.6 GB
    without it, 1.7 GB with it.

    `warm` (evaluations): reuse the previous evaluation's model and its compiled graphs when the checkpoint
    has the same config (llama.eval.loading). Any other task lets the warm model go first: training needs
    the memory."""
    import mindspore

    with MINDSPORE_LOCK:
        try:
            if not warm:
                release_warm_model()
            with warm_models() if warm else nullcontext():
                yield
        finally:
            mindspore.ms_memory_recycle()
