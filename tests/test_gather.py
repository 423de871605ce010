"""BatchGatherer: stacking the arms' outputs by batch id, and its bookkeeping checks.

Run: pytest tests/test_gather.py
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from brain.gather import BatchGatherer, GatherError

STREAM = "val:1"
BATCH = 4
DIM = 3
CLASSES = 5


def arm_output(
    arm_id: int, batch_id: int = 0, stream_id: str = STREAM, first_index: int = 0
) -> dict:
    """A decoded `arm_output` message whose values identify the arm and the batch."""
    return {
        "type": "arm_output",
        "arm_id": arm_id,
        "stream_id": stream_id,
        "batch_id": batch_id,
        "indices": np.arange(first_index, first_index + BATCH, dtype=np.int64),
        "features": np.full((BATCH, DIM), 10 * arm_id + batch_id, dtype=np.float32),
        "logits": np.full((BATCH, CLASSES), -10 * arm_id - batch_id, dtype=np.float32),
    }


@pytest.mark.parametrize("arrival", list(itertools.permutations((0, 1, 2))), ids=str)
def test_stacks_arms_in_order(arrival):
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1, 2))

    results = [gatherer.add(arm_output(arm_id, batch_id=5)) for arm_id in arrival]

    assert results[0] is None
    assert results[1] is None
    batch = results[2]
    assert batch.batch_id == 5
    assert batch.features.shape == (BATCH, 3, DIM)
    assert batch.logits.shape == (BATCH, 3, CLASSES)
    assert np.array_equal(batch.indices, np.arange(BATCH))
    for position, arm_id in enumerate((0, 1, 2)):
        assert (batch.features[:, position] == 10 * arm_id + 5).all(), f"arm {arm_id}"
        assert (batch.logits[:, position] == -10 * arm_id - 5).all(), f"arm {arm_id}"


def test_stacks_in_arm_ids_order():
    # Stacking follows the order of arm_ids, not the arms' numbers.
    gatherer = BatchGatherer(STREAM, arm_ids=(3, 1))

    assert gatherer.add(arm_output(1)) is None
    batch = gatherer.add(arm_output(3))

    assert (batch.features[:, 0] == 30).all()
    assert (batch.features[:, 1] == 10).all()


def test_interleaved_batches():
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))

    assert gatherer.add(arm_output(0, batch_id=0)) is None
    assert gatherer.add(arm_output(0, batch_id=1, first_index=4)) is None
    second = gatherer.add(arm_output(1, batch_id=1, first_index=4))
    first = gatherer.add(arm_output(1, batch_id=0))

    assert second.batch_id == 1
    assert first.batch_id == 0
    assert np.array_equal(second.indices, np.arange(4, 8))
    assert gatherer.pending == {}


def test_single_arm():
    gatherer = BatchGatherer(STREAM, arm_ids=(2,))

    batch = gatherer.add(arm_output(2))

    assert batch.features.shape == (BATCH, 1, DIM)


def test_rejects_unknown_arm():
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))

    with pytest.raises(GatherError, match="unknown arm 7"):
        gatherer.add(arm_output(7))


def test_rejects_wrong_stream():
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))

    with pytest.raises(GatherError, match="'val:0'"):
        gatherer.add(arm_output(0, stream_id="val:0"))


def test_rejects_duplicate_batch():
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))
    gatherer.add(arm_output(0, batch_id=3))

    with pytest.raises(GatherError, match="batch 3 twice"):
        gatherer.add(arm_output(0, batch_id=3))


def test_rejects_mismatched_indices():
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))
    gatherer.add(arm_output(0, batch_id=2))

    with pytest.raises(GatherError, match="other images"):
        gatherer.add(arm_output(1, batch_id=2, first_index=1))


@pytest.mark.parametrize("name", ["features", "logits"])
def test_rejects_mismatched_shapes(name):
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))
    gatherer.add(arm_output(0))
    message = arm_output(1)
    message[name] = message[name][:, :-1]

    with pytest.raises(GatherError, match=f"{name} shape"):
        gatherer.add(message)


def test_finish_unknown_arm():
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))

    with pytest.raises(GatherError, match="unknown arm 4"):
        gatherer.finish(4, batches=1)


def gathered_stream(batches: int) -> BatchGatherer:
    """A gatherer for arms 0 and 1 after both sent `batches` batches."""
    gatherer = BatchGatherer(STREAM, arm_ids=(0, 1))
    for batch_id in range(batches):
        gatherer.add(arm_output(0, batch_id))
        gatherer.add(arm_output(1, batch_id))
    return gatherer


def test_check_complete_passes():
    gatherer = gathered_stream(batches=3)
    gatherer.finish(0, batches=3)

    assert not gatherer.done
    gatherer.finish(1, batches=3)

    assert gatherer.done
    gatherer.check_complete(gathered=3)


def test_check_complete_missing_batch():
    gatherer = gathered_stream(batches=2)
    gatherer.add(arm_output(0, batch_id=2))  # arm 1 never sends batch 2
    gatherer.finish(0, batches=3)
    gatherer.finish(1, batches=3)

    with pytest.raises(GatherError, match="incomplete") as err:
        gatherer.check_complete(gathered=2)
    assert "{2: [0]}" in str(err.value)


def test_check_complete_counts_disagree():
    gatherer = gathered_stream(batches=2)
    gatherer.finish(0, batches=2)
    gatherer.finish(1, batches=3)

    with pytest.raises(GatherError, match="incomplete"):
        gatherer.check_complete(gathered=2)


def test_check_complete_gathered_count():
    gatherer = gathered_stream(batches=2)
    gatherer.finish(0, batches=2)
    gatherer.finish(1, batches=2)

    with pytest.raises(GatherError, match="incomplete"):
        gatherer.check_complete(gathered=1)


def test_check_complete_unfinished_arm():
    gatherer = gathered_stream(batches=2)
    gatherer.finish(0, batches=2)

    with pytest.raises(GatherError, match="incomplete"):
        gatherer.check_complete(gathered=2)
