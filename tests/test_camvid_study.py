"""The CamVid study script: its report and its behaviour without data."""
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def study():
  return load_benchmark("camvid_study")


def test_report_means_spreads_and_plot(study, tmp_path):
  records = [{"fraction": f, "arm": a, "seed": s, "miou": m}
             for f, a, s, m in [("1/8", "baseline", 0, 30.0), ("1/8", "baseline", 1, 34.0),
                                ("1/4", "baseline", 0, 40.0), ("1/8", "semi", 0, 33.0)]]
  table = study.report(records, str(tmp_path))
  assert "| L_ce | 32.0 ± 2.8 (n=2) | 40.0 (n=1) |" in table
  assert "| + L_adv + L_semi | 33.0 (n=1) | - |" in table
  assert (tmp_path / "camvid_study.png").stat().st_size > 1000
  assert (tmp_path / "camvid_study.md").read_text().strip() == table


def test_missing_data_exits_cleanly(study, tmp_path, capsys):
  assert study.main([f"--data={tmp_path / 'absent'}", f"--out={tmp_path}"]) == 0
  assert "no data folder" in capsys.readouterr().out


def test_config_variants_build(study, tmp_path):
  args = study.parse_args([f"--data={tmp_path}", "--steps=12"])
  config = study.make_config(args, "1/4", "adv", 2)
  assert config.data.labeled_fraction == 0.25 and config.data.split_seed == 2
  assert config.loss.lambda_semi == 0 and config.loss.lambda_adv > 0
  assert config.num_steps == 12 and config.loss.semi_start <= 4


def test_retraining_elsewhere_says_whether_it_reproduces(study, tmp_path, monkeypatch, capsys):
  """A run retrained in other workdirs is compared with the stored record,
  which stays the study's."""
  import json
  (tmp_path / "data").mkdir()
  stored = {"fraction": "1/8", "arm": "adv", "seed": 1, "steps": 12, "miou": 24.5,
            "per_class_iou": {}, "workdir": "/study/1-8_adv_seed1", "seconds": 1.0}
  (tmp_path / "camvid_study.json").write_text(json.dumps({"1/8|adv|1": stored}))
  for miou, verdict in ((24.5, "reproduces"), (25.0, "DIFFERS FROM")):
    monkeypatch.setattr(study, "run_one", lambda args, f, a, s, miou=miou: dict(
        stored, miou=miou, workdir=f"{args.workdirs}/x"))
    study.main([f"--data={tmp_path / 'data'}", f"--out={tmp_path}", "--arms=adv",
                "--fractions=1/8", "--seeds=1", f"--workdirs={tmp_path / 'rerun'}"])
    assert f"mIoU {miou:.4f} {verdict} the stored 24.5000" in capsys.readouterr().out
    assert json.loads((tmp_path / "camvid_study.json").read_text()) == {"1/8|adv|1": stored}
