from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fallwatch.cli import app
from fallwatch.settings import ConfigError, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FALLWATCH_"):
            monkeypatch.delenv(name)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_valid_and_sane() -> None:
    s = load_settings()
    assert s.redis.url is None
    assert s.edge.model == "dandelin/vilt-b32-finetuned-vqa"
    assert s.edge.questions == ["Is the person falling?"]
    assert s.cloud.model == "llava-hf/LLaVA-NeXT-Video-7B-hf"
    assert s.cameras == []


def test_precedence_env_over_file_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"ingest": {"fps": 3.0, "jpeg_quality": 70}, "edge": {"batch_size": 4}})
    s = load_settings(cfg)
    assert (s.ingest.fps, s.ingest.jpeg_quality, s.edge.batch_size) == (3.0, 70, 4)
    assert s.ingest.stream_maxlen == 2000  # default survives beside file values

    monkeypatch.setenv("FALLWATCH_INGEST__FPS", "5")
    s = load_settings(cfg)
    assert s.ingest.fps == 5.0  # env beats file
    assert s.ingest.jpeg_quality == 70  # file value of the same section survives


def test_config_file_from_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"alerts": {"cooldown_s": 5}})
    monkeypatch.setenv("FALLWATCH_CONFIG", str(cfg))
    assert load_settings().alerts.cooldown_s == 5


def test_unknown_key_and_out_of_range_name_the_field(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"ingest": {"fps": 500, "colour": "red"}})
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    paths = [p for p, _ in err.value.errors]
    assert "ingest.fps" in paths
    assert "ingest.colour" in paths


def test_camera_overrides_and_duplicate_ids(tmp_path: Path) -> None:
    cams = [{"id": "room1", "url": "rtsp://cam1/stream", "fps": 1.0, "clip": {"enabled": True, "frames": 4}},
            {"id": "room2", "url": "file:///x.mp4"}]
    s = load_settings(write_yaml(tmp_path / "c.yaml", {"cameras": cams, "ingest": {"fps": 2.5}}))
    eff1, eff2 = s.effective_ingest(s.camera("room1")), s.effective_ingest(s.camera("room2"))
    assert (eff1.fps, eff1.clip.enabled, eff1.clip.frames) == (1.0, True, 4)
    assert (eff2.fps, eff2.clip.enabled) == (2.5, False)
    with pytest.raises(ConfigError, match="duplicate camera id"):
        load_settings(write_yaml(tmp_path / "d.yaml", {"cameras": [cams[0], cams[0]]}))


def test_literal_secrets_in_yaml_are_refused_env_references_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", {"redis": {"password": "hunter2"}})
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    assert err.value.errors[0][0] == "redis.password"
    assert "hunter2" not in str(err.value)

    bad_url = write_yaml(tmp_path / "bad2.yaml", {"cameras": [{"id": "c", "url": "rtsp://admin:pw123@10.0.0.5/s"}]})
    with pytest.raises(ConfigError) as err:
        load_settings(bad_url)
    assert err.value.errors[0][0] == "cameras.0.url"

    good = write_yaml(tmp_path / "good.yaml", {"redis": {"password": "${REDIS_PW}"},
                                               "cameras": [{"id": "c", "url": "rtsp://admin:${CAM_PW}@cam/s"}]})
    monkeypatch.setenv("REDIS_PW", "hunter2")
    monkeypatch.setenv("CAM_PW", "pw123")
    s = load_settings(good)
    assert s.redis.password.get_secret_value() == "hunter2"
    assert s.cameras[0].url.get_secret_value() == "rtsp://admin:pw123@cam/s"
    assert "hunter2" not in json.dumps(s.redacted())
    assert "pw123" not in json.dumps(s.redacted())


def test_missing_env_reference_is_an_error(tmp_path: Path) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", {"redis": {"password": "${NOPE_NOT_SET}"}})
    with pytest.raises(ConfigError, match="NOPE_NOT_SET is not set"):
        load_settings(cfg)


def test_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "fallwatch_redis").write_text(json.dumps({"password": "from-file"}))
    monkeypatch.setenv("FALLWATCH_SECRETS_DIR", str(secrets))
    assert load_settings().redis.password.get_secret_value() == "from-file"


def test_nothing_is_read_at_import_time(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"FALLWATCH_INGEST__FPS": "not-a-number", "PATH": "/usr/bin"}
    code = "import fallwatch.settings, fallwatch.cli, fallwatch.redis, fallwatch.schemas, fallwatch.keys; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with pytest.raises(ConfigError):
        monkeypatch.setenv("FALLWATCH_INGEST__FPS", "not-a-number")
        load_settings()


runner = CliRunner()


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good = write_yaml(tmp_path / "good.yaml", {"ingest": {"fps": 2}})
    res = runner.invoke(app, ["config", "validate", str(good)])
    assert res.exit_code == 0, res.output
    bad = write_yaml(tmp_path / "bad.yaml", {"edge": {"batch_size": 0, "bogus": 1}})
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2
    assert "edge.batch_size" in res.output and "edge.bogus" in res.output


def test_cli_show_redacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALLWATCH_REDIS__URL", "redis://app:s3cr3t-pw@db.example:6379/0")
    monkeypatch.setenv("FALLWATCH_NOTIFICATIONS__URLS", '["tgram://123456:TOKENXYZ/987"]')
    res = runner.invoke(app, ["config", "show"])
    assert res.exit_code == 0, res.output
    assert "s3cr3t-pw" not in res.output and "TOKENXYZ" not in res.output
    shown = json.loads(res.output)
    assert shown["redis"]["url"] == "**********"
    assert shown["ingest"]["fps"] == Settings().ingest.fps


@pytest.mark.parametrize(("sentinel", "url", "says"), [
    ({"addresses": ["127.0.0.1:99999"], "master_name": "fw"}, None, "redis.sentinel.addresses: Value error, "
     "'127.0.0.1:99999' is not host:port (port 1-65535)"),
    ({"addresses": ["no-port"], "master_name": "fw"}, None, "'no-port' is not host:port"),
    ({"addresses": ["h:26379"], "master_name": "bad name"}, None, "redis.sentinel.master_name: String should match"),
    ({"addresses": ["h:26379"], "master_name": "fw"}, "redis://h:6379/0",
     "redis: Value error, set redis.url or redis.sentinel, not both"),
])
def test_cli_validate_rejects_bad_sentinel_settings_in_one_line(tmp_path: Path, sentinel, url, says) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", {"redis": {"sentinel": sentinel, **({"url": url} if url else {})}})
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    [line] = [ln for ln in res.output.splitlines() if ln.strip()]
    assert says in line


def test_sentinel_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALLWATCH_REDIS__SENTINEL__ADDRESSES", '["10.0.0.1:26379", "sentinel-b:26380"]')
    monkeypatch.setenv("FALLWATCH_REDIS__SENTINEL__MASTER_NAME", "fallwatch")
    monkeypatch.setenv("FALLWATCH_REDIS__SENTINEL__PASSWORD", "s3ntinel-pw")
    s = load_settings().redis.sentinel
    assert s is not None and s.pairs() == [("10.0.0.1", 26379), ("sentinel-b", 26380)]
    assert s.password is not None and "s3ntinel-pw" not in repr(s)
