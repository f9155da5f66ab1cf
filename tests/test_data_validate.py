"""Start-up checks of the data fields: one clear line before any data read."""
import pytest

from advsemiseg_jax.config import base_config
from advsemiseg_jax.validate import ConfigError, validate_config


def config(**data):
  c = base_config()
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.mark.parametrize("data,message", [
    (dict(name="coco"), "data.name must be one of"),
    (dict(name="voc", num_classes=21), "needs --config.data.root"),
    (dict(name="tfds"), "needs data.tfds.name"),
    (dict(resize=(512,)), "data.resize=.* must be"),
    (dict(cache="disk"), "data.cache must be"),
    (dict(split_file="/nonexistent/train_id.pkl"), "split_file not found"),
    (dict(label_map="11-255"), "not SRC:DST"),
])
def test_bad_data_fields_are_named(data, message):
  with pytest.raises(ConfigError, match=message):
    validate_config(config(**data))


def test_good_data_fields_pass(tmp_path):
  validate_config(config(name="folder", root=str(tmp_path), label_map="11:255",
                         resize=(64, 128)))
  validate_config(config(label_map="cityscapes", num_classes=19))
