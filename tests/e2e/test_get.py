"""The first vertical slice: get through Kafka and the gateway from the demo IOC, CA and PVA."""
import pytest

from k2eg import OperationError

from ..stacks import app_with_a_small_reply_topic

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_get_scalar_has_the_epics_structure(k, proto):
    v = k.get(f"{proto}://variable:a", timeout=10)
    assert isinstance(v["value"], float)
    assert set(v["alarm"]) >= {"severity", "status"}
    assert v["timeStamp"]["secondsPastEpoch"] > 1_600_000_000
    assert "display" in v and "control" in v


@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_get_signed_short_waveform_stays_signed(k, proto):
    v = k.get(f"{proto}://channel:short", timeout=10)
    assert list(v["value"])[:3] == [-3, -2, -1]


@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_get_enum_has_index_and_choices(k, proto):
    v = k.get(f"{proto}://channel:enum", timeout=10)
    assert isinstance(v["value"]["index"], int) and len(v["value"]["choices"]) >= 3


def test_get_ca_field_suffix_is_part_of_the_channel(k):
    egu = k.get("ca://variable:a.EGU", timeout=10)
    assert isinstance(egu["value"], str) and egu["value"]


def test_get_pva_table(k):
    v = k.get("pva://pva:table", timeout=10)
    assert v["labels"] and set(v["value"]) == set(v["labels"])


@pytest.mark.parametrize("proto", ["pva", "ca"])
def test_get_unknown_pv_is_an_error_reply_after_the_connection_timeout(k, proto):
    with pytest.raises(OperationError) as e:
        k.get(f"{proto}://no:such:pv", timeout=20)
    assert e.value.error == -3 and "no:such:pv" in e.value.args[0]


def test_get_bad_uri_is_refused_by_the_client(k):
    with pytest.raises(ValueError, match="invalid PV URI"):
        k.get("variable:a")


def test_a_reply_larger_than_its_topic_accepts_is_an_error_reply(stack, app_name):
    """The broker refuses the value reply for its size; the client hears why instead of timing out."""
    from k2eg.dml import dml

    small = app_with_a_small_reply_topic(stack, app_name)
    with dml(stack.environment, small) as k:
        with pytest.raises(OperationError) as e:
            k.get("pva://pva:image", timeout=20)
        assert e.value.error == -2 and "max.message.bytes" in e.value.args[0] and f"{small}-reply" in e.value.args[0]
        assert k.get("pva://variable:a", timeout=10)["value"] is not None  # small replies still come
