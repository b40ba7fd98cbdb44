"""Device choice for jobs and loaders (recon/devices.py) and its config field."""
from __future__ import annotations

import os

import pytest
import torch

from recon.devices import cpu_threads_within, default_cpu_threads, pick_device


def test_auto_is_the_gpu_when_there_is_one():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == want and pick_device(None).type == want
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")


def test_a_device_the_process_cannot_see_is_a_clear_error():
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=rf"device '{missing}': this process sees "
                                         rf"{torch.cuda.device_count()} CUDA device\(s\)"):
        pick_device(missing)
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        pick_device("gpu")


def test_reconstruct_device_is_checked_with_the_config():
    from flows.config import ConfigError, load_config

    assert load_config(None, []).reconstruct.device == "auto"
    assert load_config(None, ["reconstruct.device=cuda:1"]).reconstruct.device == "cuda:1"
    with pytest.raises(ConfigError, match="reconstruct.device"):
        load_config(None, ["reconstruct.device=gpu"])


def test_thread_count_within_a_block_is_put_back_after_it_even_on_error():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with cpu_threads_within(other) as n:
        assert n == other == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), cpu_threads_within(other):
        assert torch.get_num_threads() == other
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value, expected", [("3", 3), ("4,2", 4), (" 2 ", 2), ("0", None),
                                             ("", None), ("many", None), (None, None)])
def test_default_threads_follow_omp_num_threads_else_the_cores(monkeypatch, value, expected):
    # OMP_NUM_THREADS as OpenMP reads it: a count, or a list of counts per nesting level.
    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert default_cpu_threads() == (expected or len(os.sched_getaffinity(0)))
