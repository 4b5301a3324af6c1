"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite.

    The tests use tiny tensors; on a small shared machine (2 cores, other jobs running) OpenMP
    spinning makes two threads many times slower than one. Restored at the end of the session.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """chip's on-disk caches (sensitivity measurements) go to a temporary directory."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CHIP_CACHE_DIR", str(tmp_path_factory.mktemp("chip-cache")))
    yield
    patch.undo()
