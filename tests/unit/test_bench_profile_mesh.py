"""bench.profile_mesh's reading of `perf script` output (the sampling itself needs perf and a mesh)."""

from __future__ import annotations

from bench.profile_mesh import parse_perf_script

# `perf script -F comm,tid,ip,sym,dso` of a recording without call graphs: one line per sample.
FLAT = """\
          python  5961      7f27a5be0193 [unknown] (/venv/lib/python3.11/site-packages/grpc/_cython/cygrpc.so)
          python  5961      7f27a80fcb28 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)
          python  5974  ffffffff813ae293 finish_task_switch.isra.0 ([kernel.kallsyms])
    event_engine  5977      7f27a7f28ae7 __libc_recvmsg (/usr/lib/x86_64-linux-gnu/libc.so.6)
          python  5961  ffffffff813ae293 finish_task_switch.isra.0 ([kernel.kallsyms])
"""

# The same fields of a recording with `-g`: a `comm tid` line, then the frames, leaf first.
WITH_CALL_GRAPHS = """\
meshserve 25168
\t           9a860 free@plt (/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30)
\t               1 [unknown] ([unknown])

event_engine 25174
\tffffffff813ae293 finish_task_switch.isra.0 ([kernel.kallsyms])
\tffffffff81f2c0a1 __schedule ([kernel.kallsyms])
\tffffffff81f2c6d3 schedule ([kernel.kallsyms])

meshserve 25168
\t          13fee1 PyObject_GetIter (/usr/lib/libpython3.11.so.1.0)
"""


def test_each_sample_counts_once_by_thread_library_and_function() -> None:
    profile = parse_perf_script(FLAT, pid=5961)

    assert profile.total == 5
    assert profile.threads == {"main": 3, "python 5974": 1, "event_engine 5977": 1}
    assert profile.libraries == {
        "cygrpc.so": 1,
        "libpython3.11.so.1.0": 1,
        "[kernel.kallsyms]": 2,
        "libc.so.6": 1,
    }
    assert profile.functions["finish_task_switch.isra.0 ([kernel.kallsyms])"] == 2
    assert profile.functions["__libc_recvmsg (libc.so.6)"] == 1


def test_with_call_graphs_only_the_leaf_frame_counts() -> None:
    profile = parse_perf_script(WITH_CALL_GRAPHS, pid=25168)

    assert profile.total == 3
    assert profile.threads == {"main": 2, "event_engine 25174": 1}
    assert profile.functions == {
        "free@plt (libstdc++.so.6.0.30)": 1,
        "finish_task_switch.isra.0 ([kernel.kallsyms])": 1,
        "PyObject_GetIter (libpython3.11.so.1.0)": 1,
    }
