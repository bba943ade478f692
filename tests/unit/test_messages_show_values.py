"""How messages show the caller's values."""

from maas.errors import InvalidArgument
from maas.events import printable, shown
from maas.text.sampling import SamplingParams


def test_a_value_shown_in_a_message_is_cut_to_its_limit_saying_how_long_it_was() -> None:
    assert shown("short") == "'short'"
    long = shown("7" * 5000)
    assert len(long) < 100 and long.endswith("(4942 more characters)")


def test_a_huge_logit_bias_key_is_not_echoed_whole() -> None:
    try:
        SamplingParams.from_request({"logit_bias": {"9" * 5000: 1}})
    except InvalidArgument as exc:
        assert "logit_bias key" in exc.message and len(exc.message) < 400
    else:
        raise AssertionError("a 5000-digit token id was accepted")


def test_text_for_a_terminal_has_its_control_characters_escaped() -> None:
    assert printable("job-\x1b[2J-1") == "job-\\x1b[2J-1"
    assert printable("ok-name") == "ok-name"


def test_a_long_text_for_a_terminal_is_escaped_up_to_its_limit_only() -> None:
    # A data-plane client's job id (up to the message limit) was echoed with its escapes raw.
    shown_id = printable("\x1b[2J" + "A" * 1_000_000, 20)
    assert shown_id.startswith("\\x1b[2JAAAAAAAAAAAAA…")
    assert shown_id.endswith("more characters)") and len(shown_id) < 60
