"""The progress line (recon.progress): its arithmetic against a fake clock, its throttling, the
training stage's line, and a real loop (reconstruct on two photos) printing it."""
from __future__ import annotations

import re

import pytest

from recon.progress import Progress, format_duration, format_rate


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(total: int = 480, **kw) -> tuple[Progress, Clock, list[str]]:
    clock, lines = Clock(), []
    return Progress("preprocess", total, "images", clock=clock, emit=lines.append, **kw), \
        clock, lines


def test_rate_and_eta_from_the_items_done_and_the_time_taken():
    p, clock, lines = make(every_s=10)
    clock.t += 24.0  # 120 images in 24 s: 5/s, 360 left -> 72 s
    assert p.update(120)
    assert lines == ["preprocess: 120/480 images, 5.0/s, ETA 1m12s"]


def test_at_most_one_line_per_interval_and_always_the_last():
    p, clock, lines = make(total=100, every_s=10)
    printed = []
    for done in range(1, 101):  # one image every 0.5 s: 50 s in all
        clock.t += 0.5
        printed.append(p.update(done))
    # at 10, 20, 30, 40 s and the end (50 s, also 10 s after the last line)
    assert [i + 1 for i, x in enumerate(printed) if x] == [20, 40, 60, 80, 100]
    assert lines[-1] == "preprocess: 100/100 images, 2.0/s, done in 50s"
    assert not p.update(100)  # the end is printed once


def test_the_end_is_printed_even_right_after_a_line():
    p, clock, lines = make(total=3, every_s=10)
    clock.t += 10
    assert p.update(2)
    clock.t += 0.1
    assert p.update(3)
    assert len(lines) == 2 and lines[1].startswith("preprocess: 3/3 images, 0.3/s, done in 10s")


def test_a_resumed_run_counts_its_rate_from_where_it_started():
    p, clock, lines = make(total=1000, start=400, every_s=5)
    clock.t += 60.0  # 150 steps of this run in 60 s: 2.5/s, 450 left -> 180 s
    p.update(550, "loss 0.1234")
    assert lines == ["preprocess: 550/1000 images, 2.5/s, ETA 3m00s, loss 0.1234"]


def test_no_rate_before_anything_is_done():
    p, clock, lines = make(every_s=0)
    p.update(0)
    assert lines == ["preprocess: 0/480 images"]


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (9.4, "9s"), (75, "1m15s"),
                                           (3725, "1h02m05s"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(0.0433, "0.043"), (5.06, "5.1"), (123.4, "123")])
def test_format_rate(rate, text):
    assert format_rate(rate) == text


def test_training_line_every_n_steps():
    from recon.training.trainer import ProgressLog

    t = [50.0]
    lines: list[str] = []
    log = ProgressLog("coarse", 6, every_steps=2, emit=lines.append, clock=lambda: t[0])
    for step in range(1, 7):
        t[0] += 0.5  # each step 0.5 s, reported after it ran
        log.on_step(None, step, {"loss": 0.5 / step, "step_time_s": 0.5})  # reads no trainer
    assert lines == ["coarse: 2/6 steps, 2.0/s, ETA 2s, loss 0.2500",
                     "coarse: 4/6 steps, 2.0/s, ETA 1s, loss 0.1250",
                     "coarse: 6/6 steps, 2.0/s, done in 3s, loss 0.0833"]


def test_reconstruct_prints_the_progress_line(tmp_path, capsys):
    """A real loop: reconstruct two annotated synthetic photos with an untrained tiny model."""
    from flows.reconstruct import run_batch
    from reconstruct_fixtures import make_synth, tiny_config, untrained_checkpoint

    photos = make_synth(tmp_path / "synth", identities=2, images=1) / "images"
    ckpt = untrained_checkpoint(tmp_path / "detail-000000000.pt")
    summary = run_batch([str(photos)], str(tmp_path / "out"), str(ckpt), tiny_config())
    assert summary["counts"] == {"ok": 2}
    out = capsys.readouterr().out
    assert re.search(r"^reconstruct: 2/2 inputs, [0-9.]+/s, done in \d+s$", out, re.M), out
