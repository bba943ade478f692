"""bench.profile's summary of py-spy's collapsed stacks."""

from bench.profile import summary

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
