"""pipelines/memory.py: per-stage peaks of the machine's used memory."""
import time

from latentpref.pipelines.memory import MemoryWatch, used_mb


def test_stage_peak_sees_an_allocation():
    assert used_mb() > 0
    with MemoryWatch(interval_s=0.05) as watch:
        with watch.stage("idle"):
            time.sleep(0.2)
        with watch.stage("alloc"):
            block = bytearray(300 * 1024 * 1024)     # 300 MB, touched so it is resident
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(0.2)
            del block
    assert set(watch.peaks_mb) == {"idle", "alloc"}
    # other processes move the box's figure too: only a lower bound on the difference is safe
    assert watch.peaks_mb["alloc"] >= watch.baseline_mb + 100
