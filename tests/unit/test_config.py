"""The config loader: YAML + `a.b=value` overrides through one strict pydantic model."""

from __future__ import annotations

import pytest

from workloads.common.config import ConfigError, describe_fields, load_config
from workloads.data.dedup.exact import ExactDedupConfig

BASE = """
input:
  path: data/in
output:
  path: out/x
num_partitions: 8
"""


@pytest.fixture()
def yaml_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(BASE)
    return path


def test_yaml_loads_into_typed_model(yaml_file):
    cfg = load_config(ExactDedupConfig, yaml_file)
    assert cfg.input.path == "data/in"
    assert cfg.num_partitions == 8
    assert cfg.normalize.collapse_whitespace is True  # default filled in


def test_overrides_are_typed_by_yaml_and_nested(yaml_file):
    cfg = load_config(
        ExactDedupConfig,
        yaml_file,
        [
            "num_partitions=32",
            "normalize.lowercase=true",
            "output.path=s3://b/k",
            "input.id_field=null",
        ],
    )
    assert cfg.num_partitions == 32
    assert cfg.normalize.lowercase is True
    assert cfg.output.path == "s3://b/k"
    assert cfg.input.id_field is None


def test_override_can_create_a_section(tmp_path):
    path = tmp_path / "min.yaml"
    path.write_text("input: {path: a}\noutput: {path: b}\n")
    cfg = load_config(ExactDedupConfig, path, ["ray.num_cpus=3"])
    assert cfg.ray.num_cpus == 3


def test_misspelt_key_names_the_key_and_suggests(yaml_file):
    with pytest.raises(ConfigError) as err:
        load_config(ExactDedupConfig, yaml_file, ["normalize.lowercse=true"])
    assert "normalize.lowercse" in str(err.value)
    assert "did you mean 'normalize.lowercase'" in str(err.value)


def test_misspelt_key_in_file_is_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(BASE + "num_partitons: 4\n")
    with pytest.raises(ConfigError, match=r"num_partitons: .*did you mean 'num_partitions'"):
        load_config(ExactDedupConfig, path)


def test_wrong_type_names_the_key_and_value(yaml_file):
    with pytest.raises(ConfigError) as err:
        load_config(ExactDedupConfig, yaml_file, ["num_partitions=many"])
    assert "num_partitions" in str(err.value) and "'many'" in str(err.value)


def test_out_of_range_is_rejected(yaml_file):
    with pytest.raises(ConfigError, match="num_partitions"):
        load_config(ExactDedupConfig, yaml_file, ["num_partitions=0"])


def test_missing_required_key(tmp_path):
    path = tmp_path / "noout.yaml"
    path.write_text("input: {path: a}\n")
    with pytest.raises(ConfigError, match="output: required key is missing"):
        load_config(ExactDedupConfig, path)


def test_override_through_a_value_is_an_error(yaml_file):
    with pytest.raises(ConfigError, match="num_partitions is a value"):
        load_config(ExactDedupConfig, yaml_file, ["num_partitions.x=1"])


def test_override_without_equals(yaml_file):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ExactDedupConfig, yaml_file, ["num_partitions"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(ExactDedupConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(ExactDedupConfig, bad)


def test_fingerprint_ignores_where_not_what(yaml_file):
    a = load_config(ExactDedupConfig, yaml_file)
    b = load_config(ExactDedupConfig, yaml_file, ["output.path=elsewhere", "ray.num_cpus=7"])
    c = load_config(ExactDedupConfig, yaml_file, ["normalize.lowercase=true"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_describe_fields_lists_every_leaf_key():
    keys = [row[0] for row in describe_fields(ExactDedupConfig)]
    assert {
        "input.path",
        "output.path",
        "normalize.lowercase",
        "num_partitions",
        "ray.address",
    } <= set(keys)
    assert all(row[3] for row in describe_fields(ExactDedupConfig) if row[0].startswith("input."))
