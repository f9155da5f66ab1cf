"""PyTorch -> Flax conversion: logits, losses and reports against an
independent torch implementation of the authors' modules (torch_reference.py).

Relative errors are max|jax - torch| / max|torch| over the whole output.
"""
import os
import pickle
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_reference as tr  # noqa: E402
from advsemiseg_jax import convert, losses, models  # noqa: E402
from advsemiseg_jax.config import base_config  # noqa: E402
from advsemiseg_jax.models import DeepLabV2  # noqa: E402

TOL = 1e-4


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def make_config(num_classes=5, backbone="tiny", width=8, branches=2, disc_width=8):
  c = base_config()
  c.data.num_classes = num_classes
  c.model.backbone = backbone
  c.model.width = width
  c.model.aspp_branches = branches
  c.model.disc_width = disc_width
  return c


def torch_generator(num_classes=5, blocks=(1, 1, 1, 1), width=8, branches=2, seed=0):
  torch.manual_seed(seed)
  model = tr.ResNetDeepLab(num_classes, blocks, width, early_return=branches == 2)
  tr.randomize_bn_stats(model, torch.Generator().manual_seed(seed))
  return model.eval()


def fake_init(config, discriminator=False):
  """Variables of the model's shapes, every value 0.5 (a stand-in for a fresh
  init, without compiling one)."""
  if discriminator:
    module, x = models.build_discriminator(config.model), jnp.zeros(
        (1, 64, 64, config.data.num_classes))
  else:
    module = models.build_generator(config.model, config.data.num_classes)
    x = jnp.zeros((1, 33, 33, 3))
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))
  return jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)


def images(size, n=1, seed=0):
  return (np.random.RandomState(seed).randn(n, *size, 3) * 50).astype(np.float32)


def torch_logits(model, x):
  with torch.no_grad():
    return model(tr.to_nchw(x)).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("branches", [2, 4])
def test_generator_logits_match_torch(branches):
  model = torch_generator(branches=branches)
  config = make_config(branches=branches)
  variables, report = convert.load_torch_generator(model.state_dict(), config,
                                                   with_report=True)
  assert not report.left_at_init
  assert set(report.skipped) == {n for n in model.state_dict()
                                 if n.endswith("num_batches_tracked")}
  generator = models.build_generator(config.model, 5)
  for size in ((321, 321), (97, 129)):
    x = images(size)
    out = generator.apply(variables, x)
    ref = torch_logits(model, x)
    assert out.shape == ref.shape == (1, -(-size[0] // 8), -(-size[1] // 8), 5)
    assert rel_err(out, ref) <= TOL, (size, rel_err(out, ref))


def test_branch_mode_matters():
  """The 2-branch and 4-branch outputs differ, so the tests above tell them apart."""
  model = torch_generator(branches=4)
  x = images((65, 65))
  variables = convert.load_torch_generator(model.state_dict(), make_config(branches=2))
  out = models.build_generator(make_config(branches=2).model, 5).apply(variables, x)
  assert rel_err(out, torch_logits(model, x)) > 0.05


def test_resnet101_depth_logits_match_torch():
  """The full ResNet-101 depth (3, 4, 23, 3 blocks) at width 8."""
  for branches, size in ((2, (321, 321)), (4, (129, 97))):
    model = torch_generator(blocks=(3, 4, 23, 3), branches=branches, seed=1)
    config = make_config(backbone="resnet101", branches=branches)
    variables = convert.load_torch_generator(model.state_dict(), config)
    x = images(size, seed=1)
    out = models.build_generator(config.model, 5).apply(variables, x)
    assert rel_err(out, torch_logits(model, x)) <= TOL


def test_full_resnet101_every_tensor_matches_by_name_and_shape():
  """Full width, 21 classes, checked on shapes only (torch's meta device)."""
  with torch.device("meta"):
    model = tr.ResNetDeepLab(21, (3, 4, 23, 3), 64)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  generator = DeepLabV2(21)
  template = jax.eval_shape(lambda: generator.init(jax.random.PRNGKey(0),
                                                   jnp.zeros((1, 33, 33, 3))))
  flat = {k: tuple(v.shape) for k, v in
          flax.traverse_util.flatten_dict(template, sep="/").items()}
  plan, skipped, left = convert.match_names(shapes, flat, "authors-deeplab")
  assert not left
  assert all(n.endswith("num_batches_tracked") for n in skipped)
  assert len(plan) == len(flat)
  # REFERENCE.md's counts: trainable + BN affine parameters, no running stats.
  torch_count = sum(p.numel() for p in model.parameters())
  flax_count = sum(np.prod(v.shape) for v in jax.tree.leaves(template["params"]))
  assert torch_count == flax_count == 44_048_532
  template19 = jax.eval_shape(lambda: DeepLabV2(19).init(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, 33, 33, 3))))
  assert sum(np.prod(v.shape) for v in jax.tree.leaves(template19["params"])) == 43_901_068


def test_discriminator_logits_match_torch():
  torch.manual_seed(0)
  model_d = tr.FCDiscriminator(21, 64).eval()
  assert sum(p.numel() for p in model_d.parameters()) == 2_783_169
  config = make_config(num_classes=21, disc_width=64)
  variables, report = convert.load_torch_discriminator(model_d.state_dict(), config,
                                                       with_report=True)
  assert len(report.copied) == 10 and not report.skipped and not report.left_at_init
  disc = models.build_discriminator(config.model)
  probs = jax.nn.softmax(jnp.asarray(images((321, 289), seed=2)[..., :1] / 50
                                     * np.arange(21)), axis=-1)
  out = disc.apply(variables, probs)
  with torch.no_grad():
    ref = model_d(tr.to_nchw(np.asarray(probs))).numpy().transpose(0, 2, 3, 1)
  assert out.shape == ref.shape == (1, 10, 9, 1)
  assert rel_err(out, ref) <= TOL
  # The upsampled confidence map, as the authors' interp.
  conf = models.confidence_logits(out, (321, 289))
  ref_up = tr.interp(torch.from_numpy(ref.transpose(0, 3, 1, 2)), (321, 289))[:, 0]
  assert rel_err(conf, ref_up.numpy()) <= TOL


def test_losses_match_torch():
  rng = np.random.RandomState(0)
  n, h, w, c = 2, 17, 23, 5
  logits = rng.randn(n, h, w, c).astype(np.float32) * 3
  labels = rng.randint(0, c, (n, h, w))
  labels[rng.rand(n, h, w) < 0.2] = 255
  d_fake = rng.randn(n, h, w).astype(np.float32)
  d_real = rng.randn(n, h, w).astype(np.float32)
  gt = rng.randint(0, c, (n, h, w))
  gt[rng.rand(n, h, w) < 0.2] = 255
  t_logits = torch.from_numpy(logits.transpose(0, 3, 1, 2))
  t_labels = torch.from_numpy(labels)
  d4 = lambda d: torch.from_numpy(d)[:, None]
  ignore = t_labels == 255

  ce = losses.cross_entropy(logits, labels)
  assert rel_err(ce, tr.cross_entropy_2d(t_logits, t_labels).item()) <= TOL
  adv = losses.adversarial_loss(d_fake, labels != 255)
  assert rel_err(adv, tr.bce_2d(d4(d_fake), 1.0, ignore).item()) <= TOL
  # D's loss: fake = labeled (255 ignored) + unlabeled (nothing ignored).
  d_unl = rng.randn(n, h, w).astype(np.float32)
  fake = np.concatenate([d_fake, d_unl])
  fake_mask = np.concatenate([labels != 255, np.ones_like(labels, bool)])
  ours = losses.discriminator_loss(fake, fake_mask, d_real, gt != 255)
  ref = (tr.bce_2d(d4(fake), 0.0, torch.from_numpy(~fake_mask)).item() / 2
         + tr.bce_2d(d4(d_real), 1.0, torch.from_numpy(gt) == 255).item() / 2)
  assert rel_err(ours, ref) <= TOL
  # L_semi: argmax targets where sigmoid(D) >= T.
  semi, ratio = losses.semi_loss(logits, d_fake, 0.5)
  s = torch.sigmoid(torch.from_numpy(d_fake))
  target = t_logits.argmax(1)
  target[s < 0.5] = 255
  assert rel_err(semi, tr.cross_entropy_2d(t_logits, target).item()) <= TOL
  assert ratio == pytest.approx(float((s >= 0.5).float().mean()))
  # One-hot ground truth for D; 255 -> zero vector.
  np.testing.assert_array_equal(losses.one_hot_labels(gt, c),
                                tr.one_hot(torch.from_numpy(gt), c).numpy()
                                .transpose(0, 2, 3, 1))


def test_other_class_count_skips_the_head_and_reports_it():
  model = torch_generator(num_classes=21)
  config = make_config(num_classes=19)
  fresh = fake_init(config)
  variables, report = convert.load_torch_generator(model.state_dict(), config,
                                                   init_variables=fresh, with_report=True)
  head = {f"layer5.conv2d_list.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
  assert head <= set(report.skipped)
  assert "shape (21, 256, 3, 3) in the file, the model needs (19, 256, 3, 3)" == \
      report.skipped["layer5.conv2d_list.0.weight"]
  assert sorted(report.left_at_init) == sorted(
      f"params/layer5/conv2d_list_{i}/{p}" for i in range(4) for p in ("kernel", "bias"))
  np.testing.assert_array_equal(variables["params"]["layer5"]["conv2d_list_0"]["kernel"],
                                fresh["params"]["layer5"]["conv2d_list_0"]["kernel"])
  np.testing.assert_array_equal(
      variables["params"]["conv1"]["kernel"],
      model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["layer2_0"]["downsample_bn"]["var"],
                                model.layer2[0].downsample[1].running_var.numpy())
  assert "layer5.conv2d_list.0.weight" in report.summary()


def test_torchvision_layout():
  """torchvision's names equal the authors' (+ fc, no layer5): copied one to
  one, fc dropped, head left at init, input scale folded into conv1."""
  model = torch_generator(num_classes=5)
  sd = {k: v for k, v in model.state_dict().items() if not k.startswith("layer5.")}
  sd["fc.weight"] = torch.zeros(1000, 256)
  sd["fc.bias"] = torch.zeros(1000)
  config = make_config()
  variables, report = convert.load_torch_generator(sd, config, fake_init(config),
                                                   with_report=True)
  assert report.layout == "torchvision"
  assert "ImageNet classifier" in report.skipped["fc.weight"]
  assert all(k.startswith("params/layer5/") for k in report.left_at_init)
  assert len(report.left_at_init) == 8
  std = 255 * np.asarray(convert.TORCHVISION_STD)
  np.testing.assert_allclose(
      variables["params"]["conv1"]["kernel"],
      model.conv1.weight.detach().numpy().transpose(2, 3, 1, 0) / std[:, None], rtol=1e-6)
  np.testing.assert_array_equal(variables["params"]["layer1_0"]["conv2"]["kernel"],
                                model.layer1[0].conv2.weight.detach().numpy()
                                .transpose(2, 3, 1, 0))
  assert any("stride on the 3x3" in n for n in report.notes)


def test_wrappers_prefixes_and_files(tmp_path):
  model = torch_generator()
  sd = model.state_dict()
  expected = convert.load_torch_generator(sd, make_config())
  wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
  path = tmp_path / "wrapped.pth"
  torch.save(wrapped, path)
  got = convert.load_torch_generator(str(path), make_config())
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  torch.save({"model": dict(sd)}, tmp_path / "model.pth")
  got = convert.load_torch_generator(tmp_path / "model.pth", make_config())
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  # numpy arrays need no torch.
  got = convert.load_torch_generator({k: v.numpy() for k, v in sd.items()}, make_config())
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_refuses_what_is_not_a_state_dict(tmp_path):
  torch.save([torch.zeros(2)], tmp_path / "list.pth")
  with pytest.raises(ValueError, match=r"holds a list of 1 items, not a state dict"):
    convert.load_torch_generator(tmp_path / "list.pth", make_config())
  torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
  with pytest.raises(ValueError, match=r"holds a dict \{'epoch': int, 'lr': float\}"):
    convert.load_torch_generator(tmp_path / "meta.pth", make_config())
  torch.save(tr.FCDiscriminator(5, 8).state_dict(), tmp_path / "d.pth")
  with pytest.raises(ValueError, match="does not look like a generator"):
    convert.load_torch_generator(tmp_path / "d.pth", make_config())
  with pytest.raises(FileNotFoundError):
    convert.load_torch_generator(tmp_path / "missing.pth", make_config())


class _SideEffect:
  """Unpickling this runs code: it writes the marker file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_refuses_a_pickle_that_would_run_code(tmp_path):
  marker = tmp_path / "marker"
  path = tmp_path / "evil.pth"
  torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "x": _SideEffect(marker)}, path)
  with pytest.raises(ValueError, match="refused to load"):
    convert.load_torch_generator(path, make_config())
  assert not marker.exists()
  # The file is live: a full unpickling would have run its code.
  torch.load(path, weights_only=False)
  assert marker.read_text() == "ran"


def test_clear_message_without_torch(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(pickle.dumps({}))
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="requirements-convert.txt"):
    convert.load_torch_generator(path, make_config())


def test_orbax_round_trip_and_init_from(tmp_path):
  model = torch_generator(num_classes=21)
  model_d = tr.FCDiscriminator(21, 8)
  config = make_config(num_classes=21)
  g_vars = convert.load_torch_generator(model.state_dict(), config)
  d_vars = convert.load_torch_discriminator(model_d.state_dict(), config)
  path = convert.save_converted(str(tmp_path / "conv"), g_vars, d_vars)
  loaded = convert.load_orbax(path)
  jax.tree.map(np.testing.assert_array_equal, loaded["generator"], g_vars)
  jax.tree.map(np.testing.assert_array_equal, loaded["discriminator"], d_vars)
  # init_from with a 19-class model: the head stays at init, the rest loads.
  config19 = make_config(num_classes=19)
  g19, d19 = fake_init(config19), fake_init(config19, discriminator=True)
  g_new, d_new = convert.load_init_from(path, g19, d19)
  np.testing.assert_array_equal(g_new["params"]["layer3_0"]["conv2"]["kernel"],
                                g_vars["params"]["layer3_0"]["conv2"]["kernel"])
  np.testing.assert_array_equal(g_new["params"]["layer5"]["conv2d_list_1"]["bias"],
                                g19["params"]["layer5"]["conv2d_list_1"]["bias"])
  np.testing.assert_array_equal(d_new["params"]["conv2"]["kernel"],
                                d_vars["params"]["conv2"]["kernel"])
  # D's first conv sees 19 channels now: skipped.
  np.testing.assert_array_equal(d_new["params"]["conv1"]["kernel"],
                                d19["params"]["conv1"]["kernel"])
  # A .pth generator and a .pth discriminator, comma-separated.
  torch.save(model.state_dict(), tmp_path / "g.pth")
  torch.save(model_d.state_dict(), tmp_path / "d.pth")
  g21, d21 = fake_init(config), fake_init(config, discriminator=True)
  g_new, d_new = convert.load_init_from(f"{tmp_path / 'g.pth'},{tmp_path / 'd.pth'}",
                                        g21, d21)
  jax.tree.map(np.testing.assert_array_equal, g_new, g_vars)
  jax.tree.map(np.testing.assert_array_equal, d_new, d_vars)
  assert os.path.isdir(path)
