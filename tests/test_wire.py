"""The output batches a capsule's supervisor serializes by hand are protobuf's, byte for byte."""

from __future__ import annotations

import signal
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from app import domain, wire
from app.pb import agent_pb2 as pb

SEQS = st.integers(min_value=0, max_value=2**63 - 1)
SIGNALS = st.none() | st.sampled_from([signal.SIGKILL, signal.SIGTERM, signal.SIGINT])

EVENTS = st.one_of(
    st.builds(
        domain.OutputChunk,
        seq=SEQS,
        stream=st.sampled_from(domain.Stream),
        data=st.binary(max_size=300) | st.sampled_from([b"", b"x" * 70_000, b"\0" * 2_000_000]),
    ),
    st.builds(domain.OutputGap, seq=SEQS, lost_events=SEQS, lost_bytes=SEQS),
    st.builds(
        domain.ProcessExit,
        seq=SEQS,
        exit_code=st.none() | st.integers(min_value=-255, max_value=255),
        signal=SIGNALS,
        timed_out=st.booleans(),
        ended_at=st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ),
        oom_killed=st.booleans(),
    ),
    st.builds(
        domain.ProcessRestarted,
        seq=SEQS,
        pid=st.integers(min_value=1, max_value=2**22),
        restarts=st.integers(min_value=0, max_value=10_000),
        exit_code=st.none() | st.integers(min_value=-255, max_value=255),
        signal=SIGNALS,
        oom_killed=st.booleans(),
    ),
)


@given(st.lists(EVENTS, max_size=8))
def test_a_batch_serialized_by_hand_is_protobufs_own(events: list[domain.OutputEvent]) -> None:
    serialized = wire.serialized_output_batch(events)
    assert serialized == wire.output_batch(events).SerializeToString()
    assert wire.output_events(pb.OutputBatch.FromString(serialized)) == events


def test_a_negative_seq_takes_protobufs_ten_bytes() -> None:
    events: list[domain.OutputEvent] = [domain.OutputChunk(seq=-1, stream=domain.Stream.STDERR, data=b"e")]
    assert wire.serialized_output_batch(events) == wire.output_batch(events).SerializeToString()
