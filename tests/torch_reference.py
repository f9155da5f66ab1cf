"""An independent PyTorch implementation of the authors' networks, losses and
training iteration, written from docs/REFERENCE.md, for parity tests.

Everything here follows the authors' code as REFERENCE.md describes it, in
torch 2.x semantics: the Caffe-style DeepLab-v2 (stride on the first 1x1 conv,
frozen BN affine parameters, the ASPP early-return bug switchable), the
fully convolutional discriminator, the masked cross-entropy and BCE losses,
their optimiser groups (parameters listed once per enclosing module) and one
training iteration (unlabeled batch, labeled batch, D on fake and real).
Sizes are parameters (``width``, ``blocks``) so tests can run it small.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = 255


class Bottleneck(nn.Module):
  """1x1 (stride) - 3x3 (dilation) - 1x1, frozen-affine BN, identity or projection."""

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample
    for bn in (self.bn1, self.bn2, self.bn3):
      bn.weight.requires_grad_(False)
      bn.bias.requires_grad_(False)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class ClassifierModule(nn.Module):
  """ASPP: dilated 3x3 convs with bias, outputs summed.

  ``early_return=True`` reproduces the authors' forward, whose loop returns
  after adding the second branch.
  """

  def __init__(self, in_channels, dilations, num_classes, early_return=True):
    super().__init__()
    self.early_return = early_return
    self.conv2d_list = nn.ModuleList(
        nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True)
        for d in dilations)
    for conv in self.conv2d_list:
      conv.weight.data.normal_(0, 0.01)

  def forward(self, x):
    out = self.conv2d_list[0](x)
    for conv in self.conv2d_list[1:]:
      out = out + conv(x)
      if self.early_return:
        return out
    return out


class ResNetDeepLab(nn.Module):
  """The authors' Res_Deeplab with ``width`` stem channels and ``blocks`` per layer."""

  def __init__(self, num_classes, blocks=(3, 4, 23, 3), width=64, early_return=True):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.bn1.weight.requires_grad_(False)
    self.bn1.bias.requires_grad_(False)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
    self.layer1 = self._make_layer(width, blocks[0], 1, 1)
    self.layer2 = self._make_layer(width * 2, blocks[1], 2, 1)
    self.layer3 = self._make_layer(width * 4, blocks[2], 1, 2)
    self.layer4 = self._make_layer(width * 8, blocks[3], 1, 4)
    self.layer5 = ClassifierModule(width * 32, (6, 12, 18, 24), num_classes,
                                   early_return)

  def _make_layer(self, planes, blocks, stride, dilation):
    # A projection on the first block of every layer (channel change, stride
    # or dilation), BN affine frozen.
    downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * 4))
    downsample[1].weight.requires_grad_(False)
    downsample[1].bias.requires_grad_(False)
    layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
    self.inplanes = planes * 4
    layers += [Bottleneck(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.layer5(x)

  def params_1x(self):
    """The authors' 1x group: every trainable parameter of each module found by
    walking ``modules()`` of the stem and layer1..4 (so listed repeatedly)."""
    for part in (self.conv1, self.bn1, self.layer1, self.layer2, self.layer3,
                 self.layer4):
      for module in part.modules():
        for p in module.parameters():
          if p.requires_grad:
            yield p

  def params_10x(self):
    for p in self.layer5.parameters():
      yield p

  def optim_parameters(self, lr):
    return [{"params": list(self.params_1x()), "lr": lr},
            {"params": list(self.params_10x()), "lr": 10 * lr}]


class FCDiscriminator(nn.Module):
  """Four 4x4/2 convs with LeakyReLU(0.2), then a 4x4/2 classifier conv."""

  def __init__(self, num_classes, ndf=64):
    super().__init__()
    self.conv1 = nn.Conv2d(num_classes, ndf, 4, stride=2, padding=1)
    self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, stride=2, padding=1)
    self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 4, stride=2, padding=1)
    self.conv4 = nn.Conv2d(ndf * 4, ndf * 8, 4, stride=2, padding=1)
    self.classifier = nn.Conv2d(ndf * 8, 1, 4, stride=2, padding=1)

  def forward(self, x):
    for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
      x = F.leaky_relu(conv(x), 0.2)
    return self.classifier(x)


def interp(x, size):
  """Bilinear upsampling to (height, width), align_corners=True."""
  return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def cross_entropy_2d(pred, label):
  """CrossEntropy2d: mean softmax CE over pixels with 0 <= label != 255.

  pred (N, C, H, W), label (N, H, W) long.
  """
  keep = (label >= 0) & (label != IGNORE)
  if not keep.any():
    return pred.sum() * 0.0
  pred = pred.permute(0, 2, 3, 1)[keep]
  return F.cross_entropy(pred, label[keep])


def bce_2d(pred, target_value, ignore_mask):
  """BCEWithLogitsLoss2d against a constant target, ``ignore_mask`` pixels out.

  pred (N, 1, H, W), ignore_mask (N, H, W) bool.
  """
  pred = pred[:, 0]
  keep = ~ignore_mask
  if not keep.any():
    return pred.sum() * 0.0
  pred = pred[keep]
  return F.binary_cross_entropy_with_logits(pred, torch.full_like(pred, target_value))


def one_hot(labels, num_classes):
  """(N, H, W) labels -> (N, C, H, W) float; 255 becomes the zero vector."""
  out = torch.zeros((labels.shape[0], num_classes) + tuple(labels.shape[1:]),
                    device=labels.device)
  for c in range(num_classes):
    out[:, c] = (labels == c).float()
  return out


def lr_poly(base, step, num_steps, power):
  return base * ((1 - float(step) / num_steps) ** power)


def make_optimizers(model, model_d, lr_g, lr_d, momentum=0.9, weight_decay=5e-4,
                    nesterov=False, betas=(0.9, 0.99)):
  """The authors' SGD over their two groups and Adam for D.

  ``foreach=False`` pins torch's single-tensor SGD (its CPU default): each
  appearance of a repeated parameter is updated in turn.
  """
  sgd = torch.optim.SGD(model.optim_parameters(lr_g), lr=lr_g, momentum=momentum,
                        weight_decay=weight_decay, nesterov=nesterov, foreach=False)
  adam = torch.optim.Adam(model_d.parameters(), lr=lr_d, betas=betas, foreach=False)
  return sgd, adam


def to_nchw(x, device="cpu"):
  """(N, H, W, C) numpy -> (N, C, H, W) tensor on ``device`` (the authors
  copy each batch to the GPU in the iteration, as here)."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(device)


def to_labels(x, device="cpu"):
  return torch.from_numpy(np.asarray(x, np.int64)).to(device)


def train_iteration(model, model_d, opt_g, opt_d, batch, step, cfg):
  """One iteration of the authors' training loop (iter_size 1).

  ``batch``: numpy ``image``/``unlabeled_image`` (N, H, W, 3) float32,
  ``label``/``gt_label`` (N, H, W) int. ``cfg``: dict with lr_g, lr_d,
  num_steps, power, lambda_adv, lambda_semi_adv, lambda_semi, t_semi,
  semi_start, semi_start_adv, num_classes. Returns the loss values (and D's
  confidence map of the unlabeled batch, ``d_sigmoid_unlabeled``). Runs on
  the device the models are on.
  """
  device = next(model.parameters()).device
  model.train()
  model_d.train()
  opt_g.zero_grad()
  opt_d.zero_grad()
  lr = lr_poly(cfg["lr_g"], step, cfg["num_steps"], cfg["power"])
  opt_g.param_groups[0]["lr"] = lr
  opt_g.param_groups[1]["lr"] = 10 * lr
  opt_d.param_groups[0]["lr"] = lr_poly(cfg["lr_d"], step, cfg["num_steps"], cfg["power"])
  size = batch["image"].shape[1:3]
  out = {}

  # S: D's parameters take no gradient.
  for p in model_d.parameters():
    p.requires_grad_(False)
  pred_remain = ignore_remain = None
  if ((cfg["lambda_semi"] > 0 or cfg["lambda_semi_adv"] > 0)
      and step >= cfg["semi_start_adv"]):
    pred = interp(model(to_nchw(batch["unlabeled_image"], device)), size)
    pred_remain = pred.detach()
    d_out = interp(model_d(F.softmax(pred, dim=1)), size)
    d_sigmoid = torch.sigmoid(d_out).detach()[:, 0]
    out["d_sigmoid_unlabeled"] = d_sigmoid.cpu().numpy()
    ignore_remain = torch.zeros_like(d_sigmoid, dtype=torch.bool)
    loss_semi_adv = cfg["lambda_semi_adv"] * bce_2d(d_out, 1.0, ignore_remain)
    out["loss_semi_adv"] = loss_semi_adv.item() / max(cfg["lambda_semi_adv"], 1e-30)
    if cfg["lambda_semi"] <= 0 or step < cfg["semi_start"]:
      loss_semi_adv.backward()
    else:
      semi_ignore = d_sigmoid < cfg["t_semi"]
      semi_gt = pred.detach().argmax(dim=1)
      semi_gt[semi_ignore] = IGNORE
      out["semi_ratio"] = 1.0 - float(semi_ignore.float().mean())
      if out["semi_ratio"] > 0:  # Otherwise nothing at all is back-propagated.
        loss_semi = cfg["lambda_semi"] * cross_entropy_2d(pred, semi_gt)
        out["loss_semi"] = loss_semi.item() / cfg["lambda_semi"]
        (loss_semi + loss_semi_adv).backward()

  labels = to_labels(batch["label"], device)
  pred = interp(model(to_nchw(batch["image"], device)), size)
  loss_seg = cross_entropy_2d(pred, labels)
  ignore = labels == IGNORE
  d_out = interp(model_d(F.softmax(pred, dim=1)), size)
  loss_adv = bce_2d(d_out, 1.0, ignore)
  (loss_seg + cfg["lambda_adv"] * loss_adv).backward()
  out["loss_ce"], out["loss_adv"] = loss_seg.item(), loss_adv.item()

  # D: fake = S's predictions (detached), real = one-hot ground truth.
  for p in model_d.parameters():
    p.requires_grad_(True)
  fake = pred.detach()
  fake_ignore = ignore
  if pred_remain is not None:
    fake = torch.cat([fake, pred_remain])
    fake_ignore = torch.cat([fake_ignore, ignore_remain])
  d_out = interp(model_d(F.softmax(fake, dim=1)), size)
  loss_d_fake = bce_2d(d_out, 0.0, fake_ignore) / 2
  loss_d_fake.backward()
  gt = to_labels(batch["gt_label"], device)
  d_out = interp(model_d(one_hot(gt, cfg["num_classes"])), size)
  loss_d_real = bce_2d(d_out, 1.0, gt == IGNORE) / 2
  loss_d_real.backward()
  out["loss_d"] = loss_d_fake.item() + loss_d_real.item()

  opt_g.step()
  opt_d.step()
  return out


def randomize_bn_stats(model, generator):
  """Random running statistics (so that conversion of them is visible)."""
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
      m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
      m.weight.data.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
      m.bias.data.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
