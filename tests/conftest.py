"""Shared test set-up: a hermetic Prefect and MLflow home, and paths to bundled and shared data.

The environment is set at import time, before any test imports Prefect, so no test touches the user's
Prefect profile, database or MLflow store.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
def llama2_tokenizer(shared_data) -> Path:
    return shared_data / "llama2_tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def tok512() -> Path:
    return FIXTURES / "tok512.model"
