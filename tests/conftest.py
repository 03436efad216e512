"""Shared test set-up: a hermetic Prefect and MLflow home, and paths to bundled and shared data.

The environment is set at import time, before any test imports Prefect, so no test touches the user's
Prefect profile, database or MLflow store.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from llama.cli import run as cli

_HOME = Path(tempfile.mkdtemp(prefix="llama2-pipeline-tests-"))
os.environ.pop("PREFECT_API_URL", None)
os.environ.update(
    PREFECT_HOME=str(_HOME / "prefect"),
    PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{_HOME}/prefect.db",
    PREFECT_LOCAL_STORAGE_PATH=str(_HOME / "prefect-results"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    MLFLOW_TRACKING_URI=f"sqlite:///{_HOME}/mlflow.db",
    LLAMA2_PIPELINE_MIRROR="",
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture
def processes(tmp_path):
    """Start real servers for a test (tests/servers.py); all are stopped when it ends."""
    from servers import Processes

    running = Processes(tmp_path)
    yield running
    running.stop()


@pytest.fixture
def graphs_never_fit(monkeypatch):
    """Call it to make every model built after it run eagerly, as one whose compiled graphs would not fit
    (llama.device): it asks for more memory than any machine has free."""
    import llama.device

    return lambda: monkeypatch.setattr(llama.device, "GRAPH_EXTRA_PER_WEIGHT_BYTE", 1e15)


@pytest.fixture
def compiles(monkeypatch) -> list:
    """A list that gains an entry each time MindSpore compiles a graph (its `_check_recompile` hook, called only
    when it is about to compile): tests clear it and check that warm or reused graphs compile nothing."""
    from mindspore.graph import api

    seen = []
    check_recompile = api._check_recompile
    monkeypatch.setattr(api, "_check_recompile", lambda *args: seen.append(args) or check_recompile(*args))
    return seen


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip: full-size tests run only where it exists (CI has it)."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not here")
    return path


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """../shared/fixtures (reference outputs of transformers and MindFormers), or skip."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip("../shared/fixtures is not here")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1) named by LLAMA2_PIPELINE_SMOLLM2_GGUF, or skip.
    `make test` downloads it (a checksummed source) and sets the variable."""
    path = Path(os.environ.get("LLAMA2_PIPELINE_SMOLLM2_GGUF", "/nonexistent"))
    if not path.is_file():
        pytest.skip("SmolLM2-135M-Instruct GGUF not available (LLAMA2_PIPELINE_SMOLLM2_GGUF)")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer(shared_data) -> Path:
    return shared_data / "llama2_tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def tok512() -> Path:
    return FIXTURES / "tok512.model"


# Training and merge inputs: tiny records made by the real preprocess stage, and a tiny base checkpoint.

def _preprocessed(tmp_path_factory, kind: str, source: Path, seq_length: int) -> Path:
    """`llama2-pipeline preprocess KIND` of a bundled file with tok512, through the real CLI."""
    out = tmp_path_factory.mktemp("records") / f"{kind}{seq_length}"
    assert cli(["preprocess", kind, "--input", str(source), "--tokenizer", str(FIXTURES / "tok512.model"),
                "--seq-length", str(seq_length), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def wiki_records(tmp_path_factory, fixtures):
    """WikiText-2 slice as rows of 129 tokens."""
    return _preprocessed(tmp_path_factory, "wiki", fixtures / "wiki_slice.tokens", 128)


@pytest.fixture(scope="session")
def alpaca_records(tmp_path_factory, fixtures):
    """The Alpaca seed tasks as input_ids + labels rows of 385 tokens."""
    return _preprocessed(tmp_path_factory, "alpaca", fixtures / "alpaca_seed_tasks.json", 384)


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """A tiny model with seeded random weights, saved as a verified checkpoint folder."""
    import mindspore as ms
    from llama.config.model import ModelConfig
    from llama.model import LlamaForCausalLM
    from llama.weights.load import save_checkpoint

    ms.set_seed(7)
    config = ModelConfig.named("tiny")
    out = tmp_path_factory.mktemp("base") / "tiny"
    save_checkpoint(LlamaForCausalLM(config), out, config)
    return out
