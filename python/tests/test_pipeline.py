"""Pipeline schedules from Python: the reference's worked example, and typed errors."""

import pytest

import phalanx


def test_the_worked_example():
    one = phalanx.pipeline_schedule("1f1b", 4, 8)
    assert one["bubble"] == 9.0 and one["iteration"] == 33.0
    assert one["peak_memory"] == [4.0, 3.0, 2.0, 1.0]
    assert one["orders"][3][:4] == [("F", 0, 0), ("BW", 0, 0), ("F", 1, 0), ("BW", 1, 0)]
    zb = phalanx.pipeline_schedule("zbh1", 4, 8)
    assert zb["bubble"] == 3.0
    v = phalanx.pipeline_schedule("zbv", 4, 8)
    assert v["bubble"] == 0.0 and v["peak_memory"] == [4.0] * 4
    assert {chunk for _, _, chunk in v["orders"][0]} == {0, 1}
    inter = phalanx.pipeline_schedule("interleaved", 4, 8, chunks=2, costs=(1, 2, 1, 0))
    assert inter["bubble"] == 3 * 4 / 2
    assert len(inter["timeline"][0]) == len(inter["orders"][0])


def test_the_automatic_scheduler_and_the_v_schedules():
    zb = phalanx.pipeline_schedule("zb2p", 4, 8)
    assert zb["name"] == "ZB-2p" and zb["bubble"] == 0.0
    assert zb["peak_memory"] == [7.0, 5.0, 3.0, 1.0]
    auto = phalanx.pipeline_schedule("auto", 4, 8, memory_limit=4)
    assert max(auto["peak_memory"]) <= 4
    half = phalanx.pipeline_schedule("vhalf", 4, 8)
    assert half["bubble"] == 2.5 and half["peak_memory"] == [3.0] * 4
    low = phalanx.pipeline_schedule("vmin", 4, 8)
    assert low["bubble"] == 5.5 and low["peak_memory"] == [2.0] * 4
    with pytest.raises(ValueError, match="needs a memory limit"):
        phalanx.pipeline_schedule("auto", 4, 8)
    with pytest.raises(ValueError, match="memory limit 0.5 is below"):
        phalanx.pipeline_schedule("auto", 4, 8, memory_limit=0.5)


def test_errors_name_the_limit():
    with pytest.raises(ValueError, match="2 stages"):
        phalanx.pipeline_schedule("1f1b", 1, 8)
    with pytest.raises(ValueError, match="stage 0 holds 4"):
        phalanx.pipeline_schedule("1f1b", 4, 8, memory_limit=3)
    with pytest.raises(ValueError, match="unknown schedule"):
        phalanx.pipeline_schedule("gpipe", 4, 8)
