"""One spawned gloo group per world size runs every check of ``dist_checks``.

The groups run in the order 2, 3, 1 because they hand a checkpoint on: the 2-rank
group saves, the 3-rank group loads it and saves again, the 1-rank group loads that.
"""

import pytest

import dist_checks
from dist_launcher import run_ranks


def _run_group(world_size, checkpoint_in, checkpoint_out):
    per_rank = run_ranks(world_size, dist_checks.suite,
                         None if checkpoint_in is None else str(checkpoint_in),
                         None if checkpoint_out is None else str(checkpoint_out))
    outcomes = {name: [r["checks"][name] for r in per_rank] for name in dist_checks.CHECKS}
    return {"checks": outcomes, "checkpoint": per_rank[0]["checkpoint"]}


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("partial_fc_checkpoints")


@pytest.fixture(scope="session")
def group_of_2(checkpoint_root):
    return _run_group(2, None, checkpoint_root / "saved_on_2")


@pytest.fixture(scope="session")
def group_of_3(group_of_2, checkpoint_root):
    return _run_group(3, checkpoint_root / "saved_on_2", checkpoint_root / "saved_on_3")


@pytest.fixture(scope="session")
def group_of_1(group_of_3, checkpoint_root):
    return _run_group(1, checkpoint_root / "saved_on_3", None)


@pytest.fixture
def group(request):
    """The results of the group whose world size the test is parametrized with."""
    return request.getfixturevalue(f"group_of_{request.param}")
