"""config.apply_overrides: the benchmarks' --set FIELD=VALUE."""
import pytest

from advsemiseg_jax.config import apply_overrides, load_config, parse_value


@pytest.fixture
def config():
  return load_config("configs/voc.py:quick")


def test_values_take_the_type_of_the_field_they_replace(config):
  apply_overrides(config, ["optim.sequential_passes=true", "optim.lr_g=0.5",
                           "model.remat_stages=3,4", "model.conv_impl=xla",
                           "data.batch_size=6", "optim.nesterov=no"])
  assert config.optim.sequential_passes is True
  assert config.optim.lr_g == 0.5 and isinstance(config.optim.lr_g, float)
  assert tuple(config.model.remat_stages) == (3, 4)
  assert config.model.conv_impl == "xla"
  assert config.data.batch_size == 6 and isinstance(config.data.batch_size, int)
  assert config.optim.nesterov is False
  apply_overrides(config, ["model.remat_stages=", "optim.sequential_passes=auto"])
  assert tuple(config.model.remat_stages) == ()
  assert config.optim.sequential_passes is None


def test_an_unset_placeholder_takes_true_false_or_auto():
  assert parse_value("auto", None) is None
  assert parse_value("False", None) is False
  assert parse_value("1", None) is True
  with pytest.raises(ValueError, match="'maybe' is none of"):
    parse_value("maybe", None)


@pytest.mark.parametrize("item, message", [
    ("model.nope=1", "the config has no field 'model.nope'"),
    ("nope.deeper=1", "the config has no field 'nope.deeper'"),
    ("model.width=wide", "'model.width=wide': invalid literal"),
    ("optim.nesterov=sometimes", "'sometimes' is none of 1, true, yes, 0, false, no"),
    ("model.remat_stages=3,x", "'model.remat_stages=3,x'"),
    ("model.width", "expected FIELD=VALUE"),
])
def test_a_bad_item_is_named(config, item, message):
  before = config.to_dict()
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    apply_overrides(config, [item])
  assert config.to_dict() == before


def test_a_string_holds_items_separated_by_spaces(config):
  apply_overrides(config, "data.batch_size=6  checkpoint_write_mib=0")
  assert config.data.batch_size == 6 and config.checkpoint_write_mib == 0
  with pytest.raises(ValueError, match="'model.width': expected FIELD=VALUE"):
    apply_overrides(config, "model.width")
