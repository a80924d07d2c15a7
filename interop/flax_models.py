"""Flax (``flax.linen``) twins of :mod:`interop.models`, with the same module paths.

Their params are what ``interop.from_torch(sd, layout="flax")`` produces from the torch models' state_dicts
(``params["layer1"]["0"]["conv1"]["kernel"]``, ``batch_stats["bn1"]["mean"]``), so a converted torch checkpoint runs
here unchanged. Inputs are NHWC, Flax's convention: pass ``x.permute(0, 2, 3, 1)`` of torch's NCHW input.

BatchNorm uses torch's defaults (epsilon 1e-5, momentum 0.1, i.e. Flax's 0.9); ``train=False`` normalises with the
running statistics, like torch's ``eval()``.
"""
from __future__ import annotations

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp

_BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


class LeNet(nn.Module):
  """The pruning tutorial's LeNet; input (N, 32, 32, 1)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="VALID", name="conv1")(x)), (2, 2), strides=(2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)), (2, 2), strides=(2, 2))
    # torch flattens (C, H, W); flattening NHWC directly would scramble fc1's input order.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(120, name="fc1")(x))
    x = nn.relu(nn.Dense(84, name="fc2")(x))
    return nn.Dense(10, name="fc3")(x)


class Downsample(nn.Module):
  """torch's ``nn.Sequential(conv1x1, BatchNorm2d)``: submodules named ``"0"`` and ``"1"``."""
  planes: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.planes, (1, 1), strides=self.stride, use_bias=False, name="0")(x)
    return _BatchNorm(use_running_average=not train, name="1")(x)


class BasicBlock(nn.Module):
  """ResNet's two-conv residual block."""
  planes: int
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    identity = Downsample(self.planes, self.stride, name="downsample")(x, train) if self.downsample else x
    out = nn.Conv(self.planes, (3, 3), strides=self.stride, padding=1, use_bias=False, name="conv1")(x)
    out = nn.relu(_BatchNorm(use_running_average=not train, name="bn1")(out))
    out = nn.Conv(self.planes, (3, 3), padding=1, use_bias=False, name="conv2")(out)
    out = _BatchNorm(use_running_average=not train, name="bn2")(out)
    return nn.relu(out + identity)


class Stage(nn.Module):
  """torch's ``nn.Sequential`` of blocks: blocks named ``"0"``, ``"1"``, ..."""
  planes: int
  stride: int
  downsample: bool
  blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = BasicBlock(self.planes, self.stride, self.downsample, name="0")(x, train)
    for i in range(1, self.blocks):
      x = BasicBlock(self.planes, name=str(i))(x, train)
    return x


class ResNet18(nn.Module):
  """torchvision's ``resnet18``; input (N, H, W, 3)."""
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(64, (7, 7), strides=2, padding=3, use_bias=False, name="conv1")(x)
    x = nn.relu(_BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    inplanes = 64
    for i, planes in enumerate((64, 128, 256, 512)):
      stride = 1 if i == 0 else 2
      x = Stage(planes, stride, stride != 1 or inplanes != planes, name=f"layer{i + 1}")(x, train)
      inplanes = planes
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))
