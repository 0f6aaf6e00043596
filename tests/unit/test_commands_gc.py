"""`freeze_startup_objects`: start-up objects leave the cyclic GC; what requests create later is still collected."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_startup_objects_are_frozen_and_later_cycles_still_collected() -> None:
    # In a child process: freezing is process-wide and must not leak into the test run.
    script = textwrap.dedent(
        """
        import gc, weakref
        from meshserve.commands import freeze_startup_objects

        class Node:
            pass

        before = Node()
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert not any(obj is before for obj in gc.get_objects())  # out of every generation

        later = Node()
        later.cycle = later
        alive = weakref.ref(later)
        del later
        gc.collect()
        assert alive() is None  # cyclic garbage made after start-up is still found
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
