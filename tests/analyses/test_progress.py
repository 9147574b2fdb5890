"""One switch silences every analysis progress bar; per-call progress=False still works."""
from hooked_vlm.analyses import set_progress
from hooked_vlm import progress as _progress


def test_global_switch_and_per_call_flag():
    previous = set_progress(False)
    try:
        assert _progress.progress_bar(range(3), progress=True).disable
        set_progress(True)
        assert not _progress.progress_bar(range(3), progress=True).disable
        assert _progress.progress_bar(range(3), progress=False).disable
    finally:
        set_progress(previous)
