"""bench.profile's summaries of py-spy's collapsed stacks and of perf's shared objects."""

from bench.profile import by_library, summary

SERVER = 'process 11:"python -m services.inference"'
CHILD = 'process 12:"python -B -c from multiprocessing.forkserver import main"'


def test_samples_are_counted_for_the_innermost_process_of_each_stack() -> None:
    collapsed = "\n".join(
        [
            f"{SERVER};main (services/inference/__main__.py:3);send (oip_stream.py:9) 3",
            f"{SERVER};{CHILD};decode_loop (services/inference/decode_worker.py:7) 5",
            "no_process_frame (x.py:1) 2",
        ]
    )

    result = summary(collapsed)

    assert result["samples"] == 10
    assert result["samples_by_process"] == {"12 forkserver child": 5, "11 services.inference": 3}
    assert result["top_self_pct"][0] == ("decode_loop (services/inference/decode_worker.py)", 50.0)


def test_perf_samples_are_grouped_by_what_their_library_is() -> None:
    report = "\n".join(
        [
            "# Overhead  Shared Object",
            "    38.88%  libpython3.11.so.1.0",
            "    13.18%  cygrpc.cpython-311-x86_64-linux-gnu.so",
            "     6.95%  libtorch_cpu.so",
            "     1.01%  libc10.so",
            "    28.29%  [kernel.kallsyms]",
            "     0.40%  libfoo.so",
        ]
    )

    shares = by_library(report)

    assert shares == {
        "python interpreter": 38.9,
        "kernel": 28.3,
        "grpc": 13.2,
        "torch": 8.0,
        "other": 0.4,
    }
    # largest first
    assert list(shares) == ["python interpreter", "kernel", "grpc", "torch", "other"]
