import os
from pathlib import Path

import pytest

# Offline: LiteLLM must not fetch its price map; no test touches a hub.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mapd_cache_dir(tmp_path_factory) -> Path:
    """One cache for the converted embedded model per test session (or $MAPD_CACHE_DIR if set)."""
    cache_dir = Path(os.environ.get("MAPD_CACHE_DIR") or tmp_path_factory.mktemp("mapd_cache"))
    os.environ["MAPD_CACHE_DIR"] = str(cache_dir)  # runs started by tests resolve the same folder
    return cache_dir


@pytest.fixture(scope="session")
def embedded_student_dir(mapd_cache_dir) -> str:
    from mapd_dspy.models import resolve_model

    return resolve_model("embedded:smollm2-135m-instruct", cache_dir=mapd_cache_dir)
