"""Property tests: what must hold for every input, not just the ones we thought of."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charlm.corpus import decode_corpus
from charlm.streams import make_streams

from conftest import invoke

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.text(min_size=1, max_size=300))
def test_vocabulary_round_trips_any_unicode(text):
    expected = text.replace("\r\n", "\n")
    if "\x00" in text:  # a NUL byte marks a binary file: refused, not decoded
        return
    corpus = decode_corpus(text.encode("utf-8"), "x.txt")
    assert corpus.vocab.decode(corpus.ids) == expected
    assert corpus.vocab.chars == "".join(sorted(set(expected)))
    assert np.array_equal(corpus.vocab.encode(expected), corpus.ids.astype(np.int64))


@FAST
@given(n=st.integers(2, 400), rows=st.integers(1, 70), seq_len=st.integers(1, 50), burn=st.integers(0, 20))
def test_streams_score_every_target_exactly_once(n, rows, seq_len, burn):
    ids = np.arange(n, dtype=np.int32)  # id = position, so each target names where it came from
    streams = make_streams(ids, rows, burn_in=burn)
    targets = []
    for k in range(streams.num_chunks(seq_len)):
        x, y = streams.chunk(k, seq_len)
        keep = y >= 0
        assert (y[keep] == x[keep] + 1).all()  # each target is the character right after its input
        targets += y[keep].tolist()
    assert sorted(targets) == list(range(1, n))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(-2, 30), temperature=st.one_of(st.floats(-1, 3), st.just(float("nan"))), top_k=st.integers(-1, 200),
       top_p=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))), greedy=st.booleans(), num=st.integers(-1, 4),
       prime=st.one_of(st.none(), st.text(max_size=12)))
def test_sample_options_never_raise_a_traceback(runner, trained_run, length, temperature, top_k, top_p, greedy,
                                                  num, prime):
    args = ["sample", "-c", trained_run, "--length", length, "--temperature", temperature, "--top-k", top_k,
            "--top-p", top_p, "--num-samples", num, "--seed", "1", "--unknown", "skip"]
    if greedy:
        args.append("--greedy")
    if prime is not None:
        args += ["--prime", prime]
    result = invoke(runner, *args)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    else:
        assert result.stdout
