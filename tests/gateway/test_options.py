"""Gateway options (PROTOCOL 9): a C++ gateway's launch line, environment or file must run ours unchanged."""
from __future__ import annotations

import logging

import pytest

from k2eg.gateway import options as O

REQUIRED = ["--cmd-input-topic", "cmd", "--sub-server-address", "k:9092", "--pub-server-address", "k:9093"]


def parse(*argv: str, env: dict | None = None) -> O.Options:
    return O.parse(list(argv), environ=env or {})


def test_cpp_launch_line_is_accepted_with_cpp_defaults():
    o = parse(*REQUIRED)
    assert (o.cmd_input_topic, o.sub_server_address, o.pub_server_address) == ("cmd", "k:9092", "k:9093")
    assert o.sub_group_id == "k2eg-default-group" and o.log_level == "info"
    assert o.nc_monitor_expiration_timeout == 3600 and o.nc_purge_queue_on_exp_timeout is True
    assert o.metric_enable is False and o.metric_server_http_port == 8080 and o.node_type == "gateway"
    assert o.sub_impl_kv == () and o.nc_monitor_consumer_filterout_regex == ()
    assert o.state_topic == "cmd-gateway-state"


def test_every_documented_option_by_its_cpp_name():
    o = parse(*REQUIRED, "--sub-group-id", "g", "--log-level", "debug", "--nc-monitor-expiration-timeout", "60",
              "--nc-purge-queue-on-exp-timeout", "false", "--nc-monitor-consumer-filterout-regex", "^tools-.*",
              "--metric-enable", "true", "--metric-server-http-port", "9100", "--node-type", "gateway")
    assert o.sub_group_id == "g" and o.log_level == "debug" and o.nc_monitor_expiration_timeout == 60
    assert o.nc_purge_queue_on_exp_timeout is False and o.nc_monitor_consumer_filterout_regex == ("^tools-.*",)
    assert o.metric_enable is True and o.metric_server_http_port == 9100


@pytest.mark.parametrize("key", ["EPICS_K2EG_CMD_INPUT_TOPIC", "EPICS_k2eg_cmd-input-topic"])
def test_environment_in_our_and_in_the_cpp_spelling(key):
    """The C++ gateway reads EPICS_k2eg_<option-name>; deployments set it that way."""
    o = parse("--sub-server-address", "a", "--pub-server-address", "b", env={key: "from-env"})
    assert o.cmd_input_topic == "from-env"


def test_our_environment_spelling_wins_over_the_cpp_one():
    env = {"EPICS_k2eg_sub-group-id": "cpp", "EPICS_K2EG_SUB_GROUP_ID": "ours"}
    assert parse(*REQUIRED, env=env).sub_group_id == "ours"
    assert parse(*REQUIRED, env=dict(reversed(list(env.items())))).sub_group_id == "ours"


def test_environment_alone_is_enough():
    env = {"EPICS_K2EG_CMD_INPUT_TOPIC": "c", "EPICS_K2EG_SUB_SERVER_ADDRESS": "s",
           "EPICS_K2EG_PUB_SERVER_ADDRESS": "p", "EPICS_K2EG_METRIC_ENABLE": "yes",
           "EPICS_K2EG_PV_CONNECTION_TIMEOUT": "2.5"}
    o = parse(env=env)
    assert (o.cmd_input_topic, o.sub_server_address, o.pub_server_address) == ("c", "s", "p")
    assert o.metric_enable is True and o.pv_connection_timeout == 2.5


def _conf(tmp_path, text: str):
    path = tmp_path / "k2eg.conf"
    path.write_text(text)
    return str(path)


def test_configuration_file(tmp_path):
    path = _conf(tmp_path, """
# a C++ gateway configuration file (boost program_options format)
cmd-input-topic=file-cmd
sub-server-address=file:9092   # trailing comments are comments
pub-server-address = file:9093
sub-impl-kv=security.protocol:SASL_SSL
sub-impl-kv=sasl.mechanism:PLAIN
log-level=error
""")
    o = parse("--conf-file", "--conf-file-name", path)
    assert (o.cmd_input_topic, o.sub_server_address, o.pub_server_address) == ("file-cmd", "file:9092", "file:9093")
    assert o.kv("sub") == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}
    assert o.log_level == "error"


def test_configuration_file_with_an_explicit_true_and_from_the_environment(tmp_path):
    path = _conf(tmp_path, "cmd-input-topic=c\nsub-server-address=s\npub-server-address=p\n")
    assert parse("--conf-file", "true", "--conf-file-name", path).cmd_input_topic == "c"
    assert parse(env={"EPICS_K2EG_CONF_FILE": "true", "EPICS_K2EG_CONF_FILE_NAME": path}).cmd_input_topic == "c"
    assert parse(env={"EPICS_k2eg_conf-file": "true", "EPICS_k2eg_conf-file-name": path}).cmd_input_topic == "c"


def test_configuration_file_switched_off_is_not_read(tmp_path):
    path = _conf(tmp_path, "cmd-input-topic=from-file\n")
    o = parse(*REQUIRED, "--conf-file", "false", "--conf-file-name", path)
    assert o.cmd_input_topic == "cmd"


def test_precedence_command_line_then_environment_then_file(tmp_path):
    path = _conf(tmp_path, "cmd-input-topic=file\nsub-server-address=file\npub-server-address=file\n"
                           "sub-group-id=file\n")
    env = {"EPICS_K2EG_SUB_SERVER_ADDRESS": "env", "EPICS_K2EG_PUB_SERVER_ADDRESS": "env"}
    o = parse("--conf-file", "--conf-file-name", path, "--pub-server-address", "cli", env=env)
    assert o.pub_server_address == "cli"      # CLI beats env and file
    assert o.sub_server_address == "env"      # env beats file
    assert o.cmd_input_topic == "file" and o.sub_group_id == "file"


def test_repeatable_options_keep_every_value_and_the_highest_source_replaces(tmp_path):
    o = parse(*REQUIRED, "--pub-impl-kv", "acks:all", "--pub-impl-kv", "compression.type:lz4",
              "--nc-monitor-consumer-filterout-regex", "a.*", "--nc-monitor-consumer-filterout-regex", "b.*")
    assert o.kv("pub") == {"acks": "all", "compression.type": "lz4"}
    assert o.nc_monitor_consumer_filterout_regex == ("a.*", "b.*")
    path = _conf(tmp_path, "pub-impl-kv=acks:1\npub-impl-kv=linger.ms:5\n")
    from_file = parse(*REQUIRED, "--conf-file", "--conf-file-name", path)
    assert from_file.kv("pub") == {"acks": "1", "linger.ms": "5"}
    cli_wins = parse(*REQUIRED, "--conf-file", "--conf-file-name", path, "--pub-impl-kv", "acks:all")
    assert cli_wins.kv("pub") == {"acks": "all"}


def test_repeatable_option_from_the_environment_takes_one_entry_per_line():
    """A one-line value is one entry, as in the C++ gateway, so values may hold commas."""
    env = {"EPICS_K2EG_NC_MONITOR_CONSUMER_FILTEROUT_REGEX": "^a{1,3}$",
           "EPICS_K2EG_SUB_IMPL_KV": "security.protocol:SSL\nssl.cipher.suites:A,B\n"}
    o = parse(*REQUIRED, env=env)
    assert o.nc_monitor_consumer_filterout_regex == ("^a{1,3}$",)
    assert o.kv("sub") == {"security.protocol": "SSL", "ssl.cipher.suites": "A,B"}


def test_impl_kv_parsing_into_librdkafka_config():
    o = parse(*REQUIRED, "--sub-impl-kv", "sasl.username: alice ", "--sub-impl-kv", "sasl.jaas.config:a:b:c",
              "--sub-impl-kv", "fetch.wait.max.ms:5", "--sub-impl-kv", "fetch.wait.max.ms:7")
    assert o.kv("sub") == {"sasl.username": "alice", "sasl.jaas.config": "a:b:c", "fetch.wait.max.ms": "7"}
    assert o.kv("pub") == {}


@pytest.mark.parametrize("bad", ["no-colon", ":value", " :value"])
def test_impl_kv_without_a_key_is_refused_at_startup(bad):
    with pytest.raises(O.OptionError, match=r"--sub-impl-kv: expected key:value"):
        parse(*REQUIRED, "--sub-impl-kv", bad)


def test_impl_kv_reaches_the_kafka_clients(monkeypatch):
    """--pub-impl-kv/--sub-impl-kv end up in the producer's and the consumer's librdkafka configuration."""
    import time

    from k2eg.gateway import kafka

    made: dict[str, dict] = {}

    class FakeProducer:
        def __init__(self, conf):
            made["producer"] = conf

        def poll(self, timeout):
            time.sleep(timeout)

        def flush(self, timeout):
            return 0

    monkeypatch.setattr(kafka, "Producer", FakeProducer)
    monkeypatch.setattr(kafka, "TopicAdmin", lambda conf: made.setdefault("admin", conf))
    o = parse(*REQUIRED, "--pub-impl-kv", "security.protocol:SSL", "--pub-impl-kv", "linger.ms:50",
              "--sub-impl-kv", "session.timeout.ms:30000")
    io = kafka.KafkaIO(o)
    io.stop()
    assert made["producer"]["security.protocol"] == "SSL" and made["producer"]["linger.ms"] == "50"
    assert made["producer"]["bootstrap.servers"] == "k:9093"
    assert made["admin"]["security.protocol"] == "SSL"
    assert io._sub_config["session.timeout.ms"] == "30000" and io._sub_config["group.id"] == "k2eg-default-group"
    assert io._sub_config["bootstrap.servers"] == "k:9092"


@pytest.mark.parametrize("extra", [
    ["--scheduler-thread-number", "4"], ["--log-on-console"], ["--log-on-syslog", "--syslog-server", "s"],
    ["--storage-path", "/var/k2eg.sqlite"], ["--cmd-max-fecth-element", "10"], ["--cmd-max-fecth-time-out", "10"],
    ["--epics-monitor-thread-count", "2"], ["--configuration-server-host", "consul"],
    ["--configuration-reset-on-start", "true"], ["--pub-flush-trimeout-ms", "500"],
    ["--monitor-worker-cron-schedule", "* * * * * *"], ["--debug-info-in-log"],
])
def test_cpp_internal_options_are_accepted_and_ignored_with_a_warning(extra):
    o = parse(*REQUIRED, *extra)
    name = extra[0].lstrip("-")
    assert name in o.ignored
    assert any(name in w and "ignored" in w for w in o.warnings)


def test_cpp_internal_options_in_file_and_environment_are_ignored_with_a_warning(tmp_path):
    path = _conf(tmp_path, "scheduler-thread-number=2\nlog-on-console=true\n[storage]\nbackend-type=sqlite\n")
    o = parse(*REQUIRED, "--conf-file", "--conf-file-name", path, env={"EPICS_k2eg_epics-monitor-thread-count": "3"})
    assert {"scheduler-thread-number", "log-on-console", "storage.backend-type",
            "epics-monitor-thread-count"} <= set(o.ignored)
    assert len(o.warnings) >= 4


def test_ignored_flag_without_value_does_not_swallow_the_next_option():
    o = parse("--log-on-console", *REQUIRED)
    assert o.cmd_input_topic == "cmd" and "log-on-console" in o.ignored


def test_ignored_options_are_logged_as_warnings_at_startup(monkeypatch, caplog):
    """main() logs each warning before it connects anywhere."""
    from k2eg.gateway import __main__ as main_mod

    monkeypatch.setattr(main_mod, "setup_logging", lambda level, fmt: None)
    import k2eg.scheduling  # main() in the test process: the test runner keeps its privileges
    monkeypatch.setattr(k2eg.scheduling, "epics_scheduling", lambda realtime: (logging.DEBUG, "not changed"))

    class Stop(Exception):
        pass

    def no_kafka(opts):
        raise Stop

    import k2eg.gateway.kafka as kafka
    import k2eg.transport as transport
    monkeypatch.setattr(transport, "check_credentials", lambda *configs: None)
    monkeypatch.setattr(kafka, "KafkaIO", no_kafka)
    with caplog.at_level("WARNING", logger="k2eg.gateway"), pytest.raises(Stop):
        main_mod.main([*REQUIRED, "--scheduler-thread-number", "4"])
    assert "scheduler-thread-number" in caplog.text and "ignored" in caplog.text


@pytest.mark.parametrize("missing", ["--cmd-input-topic", "--sub-server-address", "--pub-server-address"])
def test_missing_required_option_is_a_clear_error(missing):
    argv = list(REQUIRED)
    i = argv.index(missing)
    del argv[i:i + 2]
    with pytest.raises(O.OptionError) as e:
        parse(*argv)
    name = missing.lstrip("-")
    assert f"missing required option {missing}" in str(e.value)
    assert "EPICS_K2EG_" + name.upper().replace("-", "_") in str(e.value)


def test_missing_required_option_makes_main_exit_2_with_the_message(capsys):
    from k2eg.gateway.__main__ import main

    assert main(["--sub-server-address", "a", "--pub-server-address", "b"]) == 2
    assert "missing required option --cmd-input-topic" in capsys.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    (["--metric-server-http-port", "eighty"], "--metric-server-http-port"),
    (["--metric-server-http-port", "70000"], "TCP port"),
    (["--nc-purge-queue-on-exp-timeout", "maybe"], "true or false"),
    (["--log-level", "loud"], "trace, debug, info"),
    (["--node-type", "storage"], "not supported"),
    (["--pv-connection-timeout", "0"], "greater than 0"),
    (["--nc-monitor-consumer-filterout-regex", "(unclosed"], "regular expression"),
    (["--no-such-option", "1"], "unrecognized arguments: --no-such-option"),
    (["--cmd-input-topic", ""], "must not be empty"),
])
def test_bad_values_are_clear_errors(argv, fragment):
    with pytest.raises(O.OptionError, match=None) as e:
        parse(*REQUIRED, *argv)
    assert fragment in str(e.value)


def test_environment_value_errors_name_the_variable():
    with pytest.raises(O.OptionError, match="environment EPICS_K2EG_METRIC_SERVER_HTTP_PORT"):
        parse(*REQUIRED, env={"EPICS_K2EG_METRIC_SERVER_HTTP_PORT": "x"})


def test_conf_file_problems_are_clear_errors(tmp_path):
    with pytest.raises(O.OptionError, match="needs --conf-file-name"):
        parse(*REQUIRED, "--conf-file")
    with pytest.raises(O.OptionError, match="cannot read configuration file"):
        parse(*REQUIRED, "--conf-file", "--conf-file-name", str(tmp_path / "absent.conf"))
    with pytest.raises(O.OptionError, match="unknown option 'cmd-topic'"):
        parse(*REQUIRED, "--conf-file", "--conf-file-name", _conf(tmp_path, "cmd-topic=x\n"))
    with pytest.raises(O.OptionError, match=r"k2eg.conf:2: expected name=value"):
        parse(*REQUIRED, "--conf-file", "--conf-file-name", _conf(tmp_path, "# ok\njust words\n"))


def test_unknown_environment_variables_are_warned_about():
    o = parse(*REQUIRED, env={"EPICS_K2EG_CMD_INPUT_TOPC": "typo"})
    assert any("cmd-input-topc" in w for w in o.warnings)


def test_abbreviations_are_not_guessed():
    with pytest.raises(O.OptionError):
        parse(*REQUIRED, "--log", "debug")


def test_version_needs_no_other_option(capsys):
    from k2eg.gateway.__main__ import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("k2eg-gateway ")


def test_a_kafka_setting_the_python_client_reads_itself_becomes_a_bool_or_a_clear_error():
    assert parse(*REQUIRED, "--pub-impl-kv", "delivery.report.only.error:true").kv("pub") == {
        "delivery.report.only.error": True}
    with pytest.raises(O.OptionError, match="--pub-impl-kv delivery.report.only.error: expected true or false"):
        parse(*REQUIRED, "--pub-impl-kv", "delivery.report.only.error:maybe")


def test_monitor_rate_cap_refresh_and_channel_idle_options():
    o = parse(*REQUIRED)
    assert (o.monitor_max_events_per_second, o.monitor_refresh_period, o.channel_idle_timeout) == (0.0, 0.0, 300.0)
    o = parse(*REQUIRED, "--monitor-max-events-per-second", "2.5", "--monitor-refresh-period", "60",
              "--channel-idle-timeout", "30")
    assert (o.monitor_max_events_per_second, o.monitor_refresh_period, o.channel_idle_timeout) == (2.5, 60.0, 30.0)
    for bad in (["--monitor-max-events-per-second", "-1"], ["--monitor-refresh-period", "-5"],
                ["--channel-idle-timeout", "0"]):
        with pytest.raises(O.OptionError, match=bad[0]):
            parse(*REQUIRED, *bad)
