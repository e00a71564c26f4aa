"""The host-side job encoding (no simulator): word counts, segment alignment, descriptor checks."""
import numpy as np
import pytest

from pmkvq_accel.hw.config import DatapathConfig
from pmkvq_accel.hw.jobs import align_segments, job_beats, job_descriptor, job_words
from pmkvq_accel.sim.jobgen import random_job


@pytest.mark.parametrize("W,hd", [(512, 64), (512, 128), (64, 128), (128, 64)])
def test_word_count_is_the_ideal(W, hd):
    cfg = DatapathConfig(word_bits=W, head_dim=hd, groups=2)
    rng = np.random.default_rng(0)
    q, k, v = random_job(rng, 2, hd, 300, 2, 4, split_body=77)
    segs, ks, vs = align_segments(k, v)
    assert [s.count for s in segs] == [16, 77, 191, 16]
    want = 0
    for s in segs:
        want += -(-s.count // cfg.mpw) * 2                                     # key + value metadata
        want += -(-s.count * hd * s.kbits // W) + -(-s.count * hd * s.vbits // W)
    # key code words restart on a word boundary after each metadata group
    assert len(job_words(cfg, k, v)) == want


@pytest.mark.parametrize("W,hd,vbits,tokens,extra", [
    (512, 64, 2, 7, 2),       # 4 + 3 tokens: both words exceed the 2 value slots
    (512, 64, 2, 6, 1),       # 4 + 2: the second word fits one beat
    (512, 64, 2, 37, 9),      # groups of 16 (4 words each, 8 extra) and 5 tokens (4 + 1: 1 extra)
    (512, 64, 4, 37, 0),      # 2 tokens per word = the slots
    (256, 64, 2, 3, 1),       # 2 + 1 tokens, 1 slot
    (128, 64, 2, 9, 0),       # 1 token per word, 1 slot
])
def test_beats_add_a_second_one_for_wide_value_words(W, hd, vbits, tokens, extra):
    cfg = DatapathConfig(word_bits=W, head_dim=hd, groups=1)
    q, k, v = random_job(np.random.default_rng(2), 1, hd, tokens, 16, vbits, sink=0, window=0)
    assert job_beats(cfg, k, v) == len(job_words(cfg, k, v)) + extra


def test_descriptor_limits():
    cfg = DatapathConfig(word_bits=512, head_dim=64, groups=2, max_tokens=100, max_segments=2)
    q, k, v = random_job(np.random.default_rng(1), 2, 64, 50, 2, 2)
    with pytest.raises(ValueError, match="segments"):
        job_descriptor(cfg, q, k, v)
    q, k, v = random_job(np.random.default_rng(1), 2, 64, 200, 2, 2, sink=0, window=0)
    with pytest.raises(ValueError, match="max_tokens"):
        job_descriptor(cfg, q, k, v)
