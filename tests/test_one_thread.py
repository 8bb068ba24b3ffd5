"""A one-process CPU run held to one thread by OMP_NUM_THREADS=1 (what `accelerate launch` sets where it is unset) is
told how to use every core; no other run is, and no thread count is changed."""

from __future__ import annotations

import pytest
import torch

from axolotl_blob.compat import one_thread_warning, warn_if_one_thread

ACCELERATE_DEFAULT = {"OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}


def test_one_process_on_one_thread_of_many_cores_is_told_the_command():
    message = one_thread_warning(ACCELERATE_DEFAULT, cores=16, threads=1, gpu=False)
    assert "1 CPU thread of 16" in message and "axolotl train CONFIG --launcher python" in message


@pytest.mark.parametrize(
    "environ, cores, threads, gpu",
    [
        ({"OMP_NUM_THREADS": "4"}, 16, 4, False),  # the user's thread count
        ({}, 16, 16, False),  # torch's default: every core
        (ACCELERATE_DEFAULT, 1, 1, False),  # one core: nothing to gain
        (ACCELERATE_DEFAULT, 16, 1, True),  # a GPU run
        ({**ACCELERATE_DEFAULT, "WORLD_SIZE": "2"}, 16, 1, False),  # several processes share the cores
        (ACCELERATE_DEFAULT, 16, 8, False),  # threads set in code after the variable
    ],
    ids=["user-set", "unset", "one-core", "gpu", "multi-process", "set-in-code"],
)
def test_every_other_run_is_left_alone(environ, cores, threads, gpu):
    assert one_thread_warning(environ, cores, threads, gpu) is None


def test_the_warning_changes_no_thread_count(monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("axolotl_blob.compat.cpu_only", lambda: True)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level("WARNING", logger="axolotl_blob.compat"):
            warn_if_one_thread()
        assert torch.get_num_threads() == 1
        assert "1 CPU thread of 4" in caplog.text
    finally:
        torch.set_num_threads(threads)
