"""docs/reproducing.md: every `python main.py` command in it starts.

Each command is parsed as the shell would (its variables from the doc's own
assignments, backslash continuations joined) and as main.py does (absl flags
with ml_collections' config_file flag, locked config): its config spec loads
with and without the `quick` variant, every `--config.X=Y` override applies,
and the start-up checks (validate_config) pass. Nothing is trained.
"""
import ast
import re
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from advsemiseg_jax.config import load_config
from advsemiseg_jax.validate import validate_config
from conftest import ROOT

DOC = ROOT / "docs" / "reproducing.md"
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def bash_blocks(text: str):
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def logical_lines(block: str):
  """Lines with backslash continuations joined."""
  return re.sub(r"\\\n\s*", " ", block).splitlines()


def doc_variables(text: str) -> dict:
  """NAME=value assignments at the start of a line in the doc's bash blocks."""
  out = {}
  for block in bash_blocks(text):
    for line in logical_lines(block):
      m = re.match(r"([A-Z_][A-Z0-9_]*)=(\S+)", line.strip())
      if m:
        out[m.group(1)] = m.group(2)
  return out


def main_commands(text: str):
  """Every `python main.py ...` command line, variables substituted."""
  variables = doc_variables(text)
  commands = []
  for block in bash_blocks(text):
    for line in logical_lines(block):
      if "python main.py" not in line:
        continue
      cmd = line[line.index("python main.py"):]

      def sub(m):
        assert m.group(1) in variables, f"${m.group(1)} is not set in the doc: {line}"
        return variables[m.group(1)]

      commands.append(VARIABLE.sub(sub, cmd))
  return commands


def with_quick(spec: str) -> str:
  path, _, variants = spec.partition(":")
  return f"{path}:{variants},quick" if variants else f"{path}:quick"


def parse_like_main(argv):
  """(config, workdir) as main.py's flags would give them."""
  argv = ["main.py"] + argv
  fv = flags.FlagValues()
  # sys_argv: where the config flag finds its --config.X overrides (main.py:
  # sys.argv).
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv,
                                   lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir


def field(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def expected_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


TEXT = DOC.read_text()
COMMANDS = main_commands(TEXT)


def test_doc_has_the_papers_cells():
  """Tables 1 and 2 (fraction x arm), Table 5's values, Table 6's no-FCD rows."""
  specs = [re.search(r"--config=(\S+)", c).group(1) for c in COMMANDS]
  for config in ("voc", "cityscapes"):
    for fraction in ("1/8", "1/4", "1/2", "full"):
      assert f"configs/{config}.py:{fraction},baseline" in specs
      assert f"configs/{config}.py:{fraction},adv" in specs
      if fraction != "full":
        assert f"configs/{config}.py:{fraction}" in specs
  for value in ("0.0", "0.05", "0.1", "0.2"):
    assert any(c.endswith(f"--config.loss.lambda_semi={value}") for c in COMMANDS), value
  for value in ("0.0", "0.1", "0.2", "0.3", "1.0"):
    assert any(c.endswith(f"--config.loss.t_semi={value}") for c in COMMANDS), value
  nofcd = [c for c in COMMANDS if "--config.model.discriminator=image" in c]
  assert {re.search(r"--config=(\S+)", c).group(1) for c in nofcd} == {
      "configs/voc.py:full,adv", "configs/voc.py:1/8,adv"}
  for number in ("66.0", "73.6", "74.9", "69.5", "55.5", "67.7", "65.7", "68.4", "67.2"):
    assert f"paper {number}" in TEXT, number
  # Which time is measured (one H200 row) and which are scaled estimates.
  assert "**21.6 min in bf16 and 43.0 min in float32**" in TEXT
  assert "so it is an **estimate**" in TEXT
  assert "resnet101COCO-41f33a49.pth" in TEXT


def test_every_command_uses_the_coco_weights_and_a_split_seed():
  assert len(COMMANDS) >= 40
  for cmd in COMMANDS:
    assert "--config.init_from=" in cmd and "--config.data.split_seed=" in cmd, cmd


@pytest.mark.parametrize("command", COMMANDS)
def test_command_starts(command, tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  argv = shlex.split(command)[2:]  # drop "python main.py"
  spec = next(a for a in argv if a.startswith("--config=")).split("=", 1)[1]
  overrides = [a[len("--config."):].split("=", 1) for a in argv
               if a.startswith("--config.")]
  assert all(a.startswith(("--config", "--workdir=")) for a in argv), argv
  full = load_config(spec)  # the command as written
  quick_spec = with_quick(spec)
  quick = load_config(quick_spec)
  argv = [f"--config={quick_spec}" if a.startswith("--config=") else a for a in argv]
  argv = [f"--workdir={tmp_path / 'run'}" if a.startswith("--workdir=") else a for a in argv]
  config, workdir = parse_like_main(argv)
  for name, value in overrides:
    assert field(config, name) == expected_value(value), (name, value)
    full_field = full
    for part in name.split(".")[:-1]:
      full_field = full_field[part]
    full_field[name.split(".")[-1]] = field(config, name)  # same override, full size
  assert config.model.backbone == quick.model.backbone == "tiny"
  validate_config(config, workdir)
  validate_config(full)
