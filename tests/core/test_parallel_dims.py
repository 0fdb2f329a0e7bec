"""ParallelDims: validation against the world size, rank coordinates and groups."""

from __future__ import annotations

import pytest

from fedge.errors import ConfigError
from fedge.parallel import MeshAxis, ParallelDims


def test_product_not_world_size_lists_every_factor():
    with pytest.raises(ConfigError) as err:
        ParallelDims(dp=3, tp=2, pp=1, world_size=4)
    msg = str(err.value)
    assert "dp=3" in msg and "tp=2" in msg and "pp=1" in msg and "world size 4" in msg
    assert "\n" not in msg


def test_infer_dp_rejects_tp_pp_not_dividing():
    with pytest.raises(ConfigError, match="does not divide the world size 4"):
        ParallelDims.infer_dp(world_size=4, tp=3)


def test_rejects_sizes_below_one():
    with pytest.raises(ConfigError, match="tp=0"):
        ParallelDims(dp=1, tp=0, pp=1)


def test_tp_is_innermost_and_groups_partition_ranks():
    # Prepare
    dims = ParallelDims(dp=2, tp=2, pp=2, world_size=8)
    # Execute
    tp, dp, pp = dims.groups(MeshAxis.TP), dims.groups(MeshAxis.DP), dims.groups(MeshAxis.PP)
    # Assert
    assert tp == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pp == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.coords(6) == {MeshAxis.PP: 1, MeshAxis.DP: 1, MeshAxis.TP: 0}
    for rank in range(8):
        assert dims.rank_of(**{a.value: i for a, i in dims.coords(rank).items()}) == rank
        assert rank in dims.group_of(rank, MeshAxis.DP)
        assert dims.group_of(rank, MeshAxis.TP) in tp
