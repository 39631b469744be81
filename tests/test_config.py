"""Settings.from_env: the capsule limits a createCapsule without limits gets."""

from __future__ import annotations

import re

import pytest

from app.config import ConfigError, Settings
from app.domain import CapsuleLimits, InputLimits


class TestDefaultCapsuleLimits:
    def test_unset_is_256_processes_and_no_other_limit(self) -> None:
        assert Settings.from_env({}).capsule_limits == CapsuleLimits(max_processes=256)

    def test_read_from_the_environment(self) -> None:
        env = {
            "CAPSULE_DEFAULT_MAX_PROCESSES": "64",
            "CAPSULE_DEFAULT_MEMORY_MIB": "512",
            "CAPSULE_DEFAULT_CPUS": "1.5",
        }
        assert Settings.from_env(env).capsule_limits == CapsuleLimits(
            max_processes=64, memory_mib=512, cpus=1.5
        )

    def test_empty_is_unset(self) -> None:
        env = {"CAPSULE_DEFAULT_MEMORY_MIB": "", "CAPSULE_DEFAULT_CPUS": ""}
        assert Settings.from_env(env).capsule_limits == CapsuleLimits(max_processes=256)

    @pytest.mark.parametrize(
        ("env", "words"),
        [
            ({"CAPSULE_DEFAULT_MAX_PROCESSES": "0"}, "limits.maxProcesses is 0: pass 1 to 65536"),
            (
                {"CAPSULE_DEFAULT_MAX_PROCESSES": "many"},
                "CAPSULE_DEFAULT_MAX_PROCESSES='many' is not a number",
            ),
            ({"CAPSULE_DEFAULT_MEMORY_MIB": "1.5"}, "CAPSULE_DEFAULT_MEMORY_MIB='1.5' is not a whole number"),
            ({"CAPSULE_DEFAULT_MEMORY_MIB": "8"}, "limits.memoryMiB is 8: pass 64 to 1048576 MiB"),
            ({"CAPSULE_DEFAULT_CPUS": "-1"}, "CAPSULE_DEFAULT_CPUS='-1' is negative"),
            ({"CAPSULE_DEFAULT_CPUS": "nan"}, "limits.cpus is not a number"),
            ({"CAPSULE_DEFAULT_CPUS": "0"}, "limits.cpus is 0.0: pass 0.01 to 1024 cores"),
        ],
    )
    def test_bad_values_stop_the_start(self, env: dict[str, str], words: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(words)) as caught:
            Settings.from_env(env)
        if "limits." in words:
            assert "CAPSULE_DEFAULT_" in str(caught.value)


class TestKeyRecheck:
    def test_every_5_seconds_unless_set(self) -> None:
        assert Settings.from_env({}).key_recheck_interval_sec == 5.0
        assert Settings.from_env({"CAPSULE_KEY_RECHECK_SEC": "0.5"}).key_recheck_interval_sec == 0.5

    def test_zero_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="CAPSULE_KEY_RECHECK_SEC must be more than 0"):
            Settings.from_env({"CAPSULE_KEY_RECHECK_SEC": "0"})


class TestRequestLimits:
    def test_defaults(self) -> None:
        settings = Settings.from_env({})
        assert (settings.max_body_bytes, settings.max_ws_message_bytes) == (1024 * 1024, 1024 * 1024)
        assert settings.input_limits == InputLimits()

    def test_read_from_the_environment(self) -> None:
        env = {
            "CAPSULE_MAX_BODY_BYTES": "4096",
            "CAPSULE_MAX_WS_MESSAGE_BYTES": "8192",
            "CAPSULE_MAX_CMD_BYTES": "1",
            "CAPSULE_MAX_ARGS": "2",
            "CAPSULE_MAX_ARG_BYTES": "3",
            "CAPSULE_MAX_ENVS": "4",
            "CAPSULE_MAX_ENV_NAME_BYTES": "5",
            "CAPSULE_MAX_ENV_VALUE_BYTES": "6",
            "CAPSULE_MAX_CWD_BYTES": "7",
            "CAPSULE_MAX_INPUT_BYTES": "8",
        }
        settings = Settings.from_env(env)
        assert (settings.max_body_bytes, settings.max_ws_message_bytes) == (4096, 8192)
        assert settings.input_limits == InputLimits(1, 2, 3, 4, 5, 6, 7, 8)

    @pytest.mark.parametrize(
        ("env", "words"),
        [
            ({"CAPSULE_MAX_BODY_BYTES": "10"}, "CAPSULE_MAX_BODY_BYTES=10: pass 1024 to 33554432 bytes"),
            ({"CAPSULE_MAX_WS_MESSAGE_BYTES": str(64 * 1024 * 1024)}, "pass 1024 to 33554432 bytes"),
            ({"CAPSULE_MAX_ARGS": "-1"}, "CAPSULE_MAX_ARGS='-1' is negative"),
            ({"CAPSULE_MAX_INPUT_BYTES": "1.5"}, "CAPSULE_MAX_INPUT_BYTES='1.5' is not a whole number"),
        ],
    )
    def test_bad_values_stop_the_start(self, env: dict[str, str], words: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(words)):
            Settings.from_env(env)


class TestWebSocketCompression:
    def test_off_unless_asked_for(self) -> None:
        assert Settings.from_env({}).ws_per_message_deflate is False
        assert Settings.from_env({"CAPSULE_WS_PER_MESSAGE_DEFLATE": "true"}).ws_per_message_deflate is True
        assert Settings.from_env({"CAPSULE_WS_PER_MESSAGE_DEFLATE": "0"}).ws_per_message_deflate is False

    def test_a_value_that_is_no_boolean_stops_the_start(self) -> None:
        with pytest.raises(ConfigError, match="CAPSULE_WS_PER_MESSAGE_DEFLATE='maybe': use true or false"):
            Settings.from_env({"CAPSULE_WS_PER_MESSAGE_DEFLATE": "maybe"})
