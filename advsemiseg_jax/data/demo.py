"""Procedural demo scenes: a segmentation task that needs shape AND texture.

Three object classes, each a shape with its own texture: striped discs,
dotted squares and plain triangles. Objects have random colours (colour is no
cue), overlap and occlude one another, and sit on a cluttered background
(smooth colour gradients, and thin strokes that carry the same textures, so
texture alone does not tell an object from clutter; Gaussian noise on top).
As in VOC, a one-pixel band around every object boundary is labeled 255.

Every scene is a deterministic function of (seed, index): nothing is stored.
"""
import numpy as np

CLASS_NAMES = ("background", "striped disc", "dotted square", "plain triangle")
SHAPES = (None, "disc", "square", "triangle")
TEXTURES = (None, "stripes", "dots", "plain")
NUM_CLASSES = len(CLASS_NAMES)
PALETTE = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]], np.uint8)
IGNORE = 255
TRAIN_SEED, VAL_SEED = 1, 2


def _texture(rng, yy, xx, texture: str):
  """A boolean two-tone pattern: oriented stripes, a lattice of dots, or none."""
  period = rng.uniform(5.0, 8.0)
  if texture == "plain":
    return np.ones(yy.shape, bool)
  if texture == "dots":
    phase = rng.uniform(0, period, size=2)
    dy = np.mod(yy + phase[0], period) - period / 2
    dx = np.mod(xx + phase[1], period) - period / 2
    return dy**2 + dx**2 < (period * 0.3)**2
  angle = rng.uniform(0, np.pi)
  proj = yy * np.cos(angle) + xx * np.sin(angle)
  return np.mod(proj + rng.uniform(0, period), period) < period / 2


def _shape(rng, yy, xx, size, shape: str):
  cy, cx = rng.uniform(0.15 * size, 0.85 * size, size=2)
  radius = rng.uniform(0.15 * size, 0.3 * size)
  if shape == "square":
    return (np.abs(yy - cy) < radius) & (np.abs(xx - cx) < radius)
  if shape == "triangle":  # apex up, base at cy + radius
    dy = yy - (cy - radius)
    return (dy >= 0) & (yy <= cy + radius) & (np.abs(xx - cx) <= dy / 2 * 1.15)
  return (yy - cy)**2 + (xx - cx)**2 < radius**2


def _paint(rng, image, mask, yy, xx, texture):
  first = rng.uniform(0, 255, size=3)
  if texture == "plain" and mask.any():  # stand out from what lies beneath
    first = 255 - image[mask].mean(0)
  colours = np.stack([first, 255 - first])   # complementary: a visible pattern
  pattern = _texture(rng, yy, xx, texture)
  image[mask] = np.where(pattern[mask][:, None], colours[0], colours[1])


def _boundary(label):
  """Pixels whose 4-neighbourhood holds another label."""
  edge = np.zeros(label.shape, bool)
  edge[1:, :] |= label[1:, :] != label[:-1, :]
  edge[:-1, :] |= label[1:, :] != label[:-1, :]
  edge[:, 1:] |= label[:, 1:] != label[:, :-1]
  edge[:, :-1] |= label[:, 1:] != label[:, :-1]
  return edge


def scene(seed: int, index: int, size: int = 96):
  """One (image uint8 HxWx3, label uint8 HxW) pair."""
  rng = np.random.default_rng([seed, index])
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  # Background: a smooth random gradient.
  corners = rng.uniform(0, 255, size=(2, 2, 3))
  wy, wx = (yy / (size - 1))[..., None], (xx / (size - 1))[..., None]
  image = ((1 - wy) * ((1 - wx) * corners[0, 0] + wx * corners[0, 1])
           + wy * ((1 - wx) * corners[1, 0] + wx * corners[1, 1]))
  # Clutter: thin textured strokes, not objects (label stays background).
  for _ in range(rng.integers(1, 4)):
    y0, x0, y1, x1 = rng.uniform(0, size, size=4)
    t = np.clip(((yy - y0) * (y1 - y0) + (xx - x0) * (x1 - x0))
                / max((y1 - y0)**2 + (x1 - x0)**2, 1e-6), 0, 1)
    dist = np.hypot(yy - (y0 + t * (y1 - y0)), xx - (x0 + t * (x1 - x0)))
    _paint(rng, image, dist < rng.uniform(1.5, 3.0), yy, xx,
           TEXTURES[rng.integers(1, len(TEXTURES))])
  label = np.zeros((size, size), np.uint8)
  # Objects, painted in order: later ones occlude earlier ones.
  for _ in range(rng.integers(1, 4)):
    cls = int(rng.integers(1, NUM_CLASSES))
    mask = _shape(rng, yy, xx, size, SHAPES[cls])
    _paint(rng, image, mask, yy, xx, TEXTURES[cls])
    label[mask] = cls
  image = image + rng.normal(0, 12.0, size=image.shape)
  label[_boundary(label)] = IGNORE
  return np.clip(image, 0, 255).astype(np.uint8), label


def scenes(seed: int, start: int, count: int, size: int = 96):
  """Stacked scenes ``start .. start+count-1``: (N,H,W,3) and (N,H,W) uint8."""
  pairs = [scene(seed, i, size) for i in range(start, start + count)]
  return (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
