"""Configuration: schema, composition of YAML and overrides, packaged presets."""

from voxgen.config.compose import compose, from_dict, to_dict, to_json, to_yaml
from voxgen.config.schema import Config

__all__ = ["Config", "compose", "from_dict", "to_dict", "to_json", "to_yaml"]
