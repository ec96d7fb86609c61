"""PartialFC on 1, 2 and 3 gloo ranks against the single-process op (see dist_checks)."""

import pytest

import dist_checks
from dist_checks import WORLD_SIZES


@pytest.mark.parametrize("group", WORLD_SIZES, indirect=True, ids=lambda n: f"ranks={n}")
@pytest.mark.parametrize("name", list(dist_checks.CHECKS))
def test_check(group, name):
    outcomes = group["checks"][name]
    failures = [f"--- rank {rank} ---\n{o}" for rank, o in enumerate(outcomes)
                if o is not None and not o.startswith("skip:")]
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)
    if all(o is not None for o in outcomes):
        pytest.skip(outcomes[0][len("skip:"):].strip())
