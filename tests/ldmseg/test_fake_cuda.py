"""The coco recipe's training and sampling steps on fake CUDA tensors (issue #20).

Every module and batch lives on ``cuda:0`` as a ``FakeTensor`` (shapes, dtypes and devices, no
data, no compute), at the shapes of ``conf/coco.yaml``: 512x512 images, 128 id slots (7 bit
planes), the mask AE of widths [32, 64, 128, 256] (64x64x4 latents), the SD v1.x VAE as image
encoder and the SD v1.x UNet (815 M parameters) as denoiser, built from ``sd_config: sd-v1``
without loading pretrained weights. Every op refuses to mix devices the way CUDA kernels do
(FakeTensorMode checks most ops, :func:`check_devices` all of them: FakeTensorMode lets e.g. a
convolution of CUDA weights on a CPU input through), so a code path that leaves a tensor on the
CPU, or draws with a generator on the wrong device, fails here as it would on a GPU;
:func:`test_the_harness_catches_a_wrong_device` shows that it does.

What this CPU-only torch build cannot do, the test stands in for, and only that:

- **CUDA device guard**: Python bindings such as indexing, ``float(t)``, ``t.nonzero()`` or
  ``t.to("cuda")`` switch the current device through a device guard, which a CPU build does not
  have for CUDA. A 20-line C++ guard that does nothing (one fake GPU, one default stream) is
  compiled and registered while the tests run, and the previous entry is put back afterwards.
  This is what PyTorch itself adopted for fake CUDA on CPU-only machines (pytorch#160532).
- **Data-dependent scalars**: ``float(loss)``, ``int(mask.sum())`` or ``t.nonzero()`` need
  values that fake tensors do not have. :class:`FakeCudaMode` answers with stand-ins (1 / 1.0 /
  True, every element non-zero), and the GradScaler's overflow check finds no inf, so the step
  is applied as a healthy step would be.
- **Backward**: the CPU build's autograd engine asks the CUDA runtime for streams as soon as a
  gradient lives on ``cuda``. :func:`stand_in_backward` walks the autograd graph instead and gives
  every leaf it reaches a zero gradient on that leaf's own device (which is where a real backward
  puts it); the forward pass, gradient clipping, the GradScaler, AdamW and the EMA then run on
  fake CUDA tensors as they would on a GPU. The count of reached leaves is checked, so the loss
  provably depends on every trainable parameter.
- **CUDA availability**: ``GradScaler("cuda")`` and ``torch.autocast("cuda")`` turn themselves
  off when CUDA is unavailable, and ``torch.cuda.is_bf16_supported()`` has no GPU to ask; both
  are patched so that ``mixed_precision: auto`` resolves as on an Ampere GPU (bf16) or an older
  one (fp16 with a GradScaler).
- **CUDA generators**: ``torch.Generator(device="cuda")`` needs the CUDA library; while
  ``TrainState.seed_generator`` runs, ``torch.Generator`` makes :class:`StandInCudaGenerator`, a
  CPU generator that reports ``cuda:0``. :class:`GeneratorDeviceCheck` then refuses any random
  op whose output is not on its generator's device, as CUDA's kernels do.

Backward's own kernels (and gradient checkpointing's recomputation) therefore do not run here;
everything the project's code does around them does.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.cpp_extension as cpp_extension
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

from paths import COCO_YAML
from ldmseg.config import load_config, with_sampling
from ldmseg.diffusion.sampling import decode_latents, sample_latents
from ldmseg.models.build import build_components
from ldmseg.models.mask_losses import mask_ae_loss
from ldmseg.segmenter import Segmenter
from ldmseg.training.build import Stage
from ldmseg.training.losses import LDMComponents
from ldmseg.training.optim import make_ema, make_optimizer, make_scaler
from ldmseg.training.state import TrainState
from ldmseg.training.steps import ldm_train_step, train_step

CUDA = torch.device("cuda:0")
aten = torch.ops.aten

GUARD_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {
using c10::Device;
using c10::DeviceType;
using c10::Stream;

// One fake GPU (cuda:0) with one default stream; switching devices or streams does nothing.
struct FakeCudaGuard final : c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return DeviceType::CUDA; }
  Device exchangeDevice(Device) const override { return Device(DeviceType::CUDA, 0); }
  Device getDevice() const override { return Device(DeviceType::CUDA, 0); }
  void setDevice(Device) const override {}
  void uncheckedSetDevice(Device) const noexcept override {}
  Stream getStream(Device) const noexcept override { return Stream(Stream::DEFAULT, Device(DeviceType::CUDA, 0)); }
  Stream exchangeStream(Stream s) const noexcept override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return 1; }
};
FakeCudaGuard fake_cuda_guard;
}  // namespace

// Put `impl` (nullptr: none) in the CUDA slot of c10's device guard registry; returns the previous entry.
extern "C" const void* swap_cuda_guard(const void* impl) {
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(DeviceType::CUDA)];
  return slot.exchange(static_cast<const c10::impl::DeviceGuardImplInterface*>(impl));
}

extern "C" const void* fake_cuda_guard_impl() { return &fake_cuda_guard; }
"""


def build_guard_library(folder: Path) -> ctypes.CDLL:
    """Compile :data:`GUARD_SOURCE` against torch's c10 (about a second) and load it."""
    source, library = folder / "fake_cuda_guard.cpp", folder / "fake_cuda_guard.so"
    source.write_text(GUARD_SOURCE)
    lib_dirs = cpp_extension.library_paths()
    command = [os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-std=c++17", "-O0",
               *(f"-I{d}" for d in cpp_extension.include_paths()), str(source),
               *(f"-L{d}" for d in lib_dirs), *(f"-Wl,-rpath,{d}" for d in lib_dirs), "-lc10", "-o", str(library)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.fail(f"the fake-CUDA test compiles a small C++ device guard and needs a C++ compiler "
                    f"({command[0]!r} not found; set CXX)", pytrace=False)
    if result.returncode != 0:
        pytest.fail(f"compiling the fake CUDA device guard failed:\n{result.stderr[-3000:]}", pytrace=False)
    lib = ctypes.CDLL(str(library))
    lib.swap_cuda_guard.argtypes = [ctypes.c_void_p]
    lib.swap_cuda_guard.restype = ctypes.c_void_p
    lib.fake_cuda_guard_impl.restype = ctypes.c_void_p
    return lib


DEVICE_MOVES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
                aten._copy_from_and_resize.default, aten.copy.default}
"""Ops that take tensors across devices (what ``.to()`` and ``copy_`` dispatch to)."""

INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
            aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
"""Ops whose index tensors may stay on the CPU when the indexed tensor is on CUDA."""


def check_devices(func, args, kwargs) -> None:
    """Raise as a CUDA kernel does when an op's tensors are on different devices.

    A 0-dim CPU tensor may meet a CUDA one (a scalar); device moves take two devices; CPU index
    tensors may index a CUDA tensor. FakeTensorMode checks this for most ops but not all (e.g. not
    ``convolution``), so every op is checked here.
    """
    if func in DEVICE_MOVES:
        return
    flat = []
    for arg in (*args, *kwargs.values()):
        flat.extend(arg if isinstance(arg, (list, tuple)) else (arg,))
    if func in INDEXING and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
        indices = {id(t) for t in args[1] if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        flat = [t for t in flat if id(t) not in indices]
    devices = {t.device for t in flat
               if isinstance(t, torch.Tensor) and not (t.ndim == 0 and t.device.type == "cpu")}
    if len(devices) > 1:
        found = ", ".join(sorted(str(d) for d in devices))
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{found}! (when calling {func})")


class FakeCudaMode(FakeTensorMode):
    """``FakeTensorMode`` that checks devices on every op (:func:`check_devices`), with
    stand-ins for the values fake tensors do not have.

    ``.item()`` / ``float()`` / ``int()`` / ``bool()`` of a non-constant fake tensor give True, 1 or
    1.0 (a finite loss, an in-range slot id, a finite gradient norm); ``nonzero`` reports every
    element as non-zero; the GradScaler's ``found_inf`` reads 0.0 after its overflow check.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # ``module.to(device)`` swaps each fake parameter for a moved one, which torch refuses for a
        # tensor that something holds a weak reference to, and the converter's memo (tensor id ->
        # fake tensor) is a WeakValueDictionary holding one to every parameter. A plain dict keeps
        # the same entries without weak references (the fakes then live as long as the mode).
        self.fake_tensor_converter.meta_converter.tensor_memo = {}
        self.memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        check_devices(func, args, kwargs)
        if func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor) \
                and args[0].constant is None:
            arg = args[0]
            if arg in self.memo:
                return self.memo[arg]
            if arg.dtype == torch.bool:
                return True
            return 1.0 if arg.dtype.is_floating_point or arg.dtype.is_complex else 1
        if func is aten.nonzero.default:
            arg = args[0]
            with self:
                return torch.zeros((arg.numel(), arg.ndim), dtype=torch.long, device=arg.device)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func is aten._amp_foreach_non_finite_check_and_unscale_.default:
            self.memo[args[1]] = 0.0  # found_inf: the scaled gradients had no inf or NaN
        return out


class StandInCudaGenerator(torch.Generator):
    """A CPU ``torch.Generator`` that reports ``device`` cuda:0 (the CPU build has no CUDA generator).

    Fake random ops never read it; :class:`GeneratorDeviceCheck` holds it to its reported device.
    """

    def __new__(cls, device=None):
        return super().__new__(cls, "cpu")

    def __init__(self, device=None) -> None:
        self.nominal_device = torch.device(device)
        if self.nominal_device.type != "cuda":
            raise AssertionError(f"the stand-in generator is for CUDA only, got device {device!r}")

    @property
    def device(self) -> torch.device:
        return self.nominal_device


class GeneratorDeviceCheck(TorchFunctionMode):
    """Refuse a random op whose output is not on its ``generator``'s device, as CUDA does
    ("Expected a 'cuda' device type for generator but found 'cpu'"); fake kernels do not check it.
    ``checked`` counts the random ops seen with a generator."""

    def __init__(self) -> None:
        super().__init__()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            self.checked += 1
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            for tensor in outputs:
                if isinstance(tensor, torch.Tensor) and tensor.device.type != generator.device.type:
                    raise RuntimeError(f"Expected a '{tensor.device.type}' device type for generator but found "
                                       f"'{generator.device.type}' ({getattr(func, '__name__', func)})")
        return out


REACHED_LEAVES: list[int] = []
"""How many leaves each stand-in backward gave a gradient (see :func:`stand_in_backward`)."""


def stand_in_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None,
                      allow_unreachable=True, accumulate_grad=True):
    """``torch.autograd``'s engine call, for ``loss.backward()``: a zero gradient, on the leaf's own
    device, for every leaf the autograd graph of ``tensors`` reaches (accumulated like a real one)."""
    if not accumulate_grad or inputs:
        raise NotImplementedError("the fake-CUDA backward stands in for tensor.backward() only")
    pending = [t.grad_fn for t in tensors if t.grad_fn is not None]
    seen, leaves = set(), []
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf that requires grad
            leaves.append(node.variable)
        else:
            pending.extend(fn for fn, _ in node.next_functions)
    for leaf in leaves:
        grad = torch.zeros_like(leaf)
        leaf.grad = grad if leaf.grad is None else leaf.grad + grad
    REACHED_LEAVES.append(len(leaves))


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_cuda(tmp_path_factory):
    """The fake-CUDA mode, with the guard registered and the CPU-build stand-ins patched in (module-wide)."""
    guard = build_guard_library(tmp_path_factory.mktemp("fake_cuda_guard"))
    mode = FakeCudaMode(allow_non_fake_inputs=True)  # real CPU inputs (numpy images) become fake ones
    with pytest.MonkeyPatch.context() as mp:
        # GradScaler("cuda") and autocast("cuda") switch themselves off without a CUDA runtime
        mp.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
        # the engine asks the CUDA runtime for streams; see stand_in_backward
        mp.setattr(torch.autograd, "_engine_run_backward", stand_in_backward)
        previous = guard.swap_cuda_guard(guard.fake_cuda_guard_impl())
        try:
            yield mode
        finally:
            guard.swap_cuda_guard(previous)


@pytest.fixture(scope="module")
def coco_cfg():
    return load_config(COCO_YAML)


@pytest.fixture(scope="module")
def coco_models(fake_cuda, coco_cfg):
    """The three coco components on fake cuda:0 (no pretrained weights)."""
    started = time.monotonic()
    parts = fake_components(fake_cuda, coco_cfg, CUDA)
    parts["mask_autoencoder"].eval().requires_grad_(False)
    for name, module in parts.items():
        devices = {p.device for p in module.parameters()} | {b.device for b in module.buffers()}
        assert devices == {CUDA}, f"{name} has parameters on {devices}"
        assert all(isinstance(p, FakeTensor) for p in module.parameters())
    assert sum(p.numel() for p in parts["denoiser"].parameters()) > 800e6  # the SD v1.x UNet
    assert time.monotonic() - started < 120
    return parts


def fake_components(mode: FakeCudaMode, cfg, device: torch.device) -> dict[str, torch.nn.Module]:
    """The components of ``cfg`` as fake tensors on ``device``: built on the meta device (as
    ``ldmseg model-summary`` does), then given fake storage with ``to_empty`` inside ``mode``.

    (Building inside the fake mode works too, but ``widen_conv_in``'s ``weight[:, :n] = ...`` then
    leaves the fake parameter with extra references and a later ``module.to()``, which swaps fake
    parameters, refuses it: a fake-tensor quirk, not a device error.)
    """
    with torch.device("meta"):
        parts = build_components(cfg, load_pretrained=False)
    with mode:
        for module in parts.values():
            module.to_empty(device=device)
    return parts


def coco_batch(b: int = 2, res: int = 512) -> dict:
    """A training batch of ``b`` coco-sized images on fake cuda:0 (call inside the mode)."""
    return {"image": torch.zeros(b, 3, res, res, device=CUDA),
            "slot_map": torch.zeros(b, res, res, dtype=torch.long, device=CUDA),
            "valid": torch.ones(b, res, res, dtype=torch.bool, device=CUDA)}


def seed_on_cuda(state: TrainState, monkeypatch, seed: int = 7) -> None:
    """``state.seed_generator(seed)`` with ``torch.Generator`` making :class:`StandInCudaGenerator`s."""
    with monkeypatch.context() as m:
        m.setattr(torch, "Generator", StandInCudaGenerator)
        state.seed_generator(seed)
    assert isinstance(state.generator, StandInCudaGenerator) and state.generator.device == CUDA


def assert_on_cuda(tensors, what: str) -> None:
    for tensor in tensors:
        assert tensor.device == CUDA, f"{what}: a tensor on {tensor.device}"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_the_harness_catches_a_wrong_device(fake_cuda, coco_cfg):
    """Not vacuous: a CPU tensor meeting a CUDA one, a CPU generator drawing CUDA noise, a CPU
    batch fed to CUDA modules all raise under the fake-CUDA harness."""
    with fake_cuda, GeneratorDeviceCheck():
        with pytest.raises(RuntimeError, match="device"):
            torch.ones(4, device=CUDA) + torch.ones(4)
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(4, generator=torch.Generator(), device=CUDA)
        logits = torch.zeros(1, 8, 16, 16, device=CUDA)
        slot_map = torch.zeros(1, 16, 16, dtype=torch.long, device=CUDA)
        valid = torch.ones(1, 16, 16, dtype=torch.bool, device=CUDA)
        with pytest.raises(RuntimeError, match="generator"):  # point sampling with a CPU generator
            mask_ae_loss(logits, slot_map, valid, coco_cfg.mask_ae, generator=torch.Generator())
        ae = torch.nn.Conv2d(7, 4, 3, padding=1, device=CUDA)
        with pytest.raises(RuntimeError, match="device"):  # a CPU batch through CUDA weights
            ae(torch.zeros(1, 7, 16, 16))
        # the stand-ins: the same calls on one device pass
        torch.randn(4, generator=StandInCudaGenerator(CUDA), device=CUDA)
        mask_ae_loss(logits, slot_map, valid, coco_cfg.mask_ae, generator=StandInCudaGenerator(CUDA))


@pytest.mark.parametrize("gpu_bf16, precision, scaled", [(True, "bf16", False), (False, "fp16", True)],
                         ids=["auto-ampere-bf16", "auto-older-gpu-fp16"])
def test_ldm_train_step_on_fake_cuda(fake_cuda, coco_cfg, coco_models, monkeypatch, gpu_bf16, precision, scaled):
    """One LDM step of the coco recipe (``mixed_precision: auto``, EMA, self-conditioning,
    Min-SNR, grad clipping) through ``TrainState`` and ``train_step`` on fake cuda:0: bf16 autocast
    on a bf16 GPU, fp16 autocast with a GradScaler on an older one. No device error; the UNet's
    forward runs in the autocast dtype; every trainable UNet parameter gets a gradient, an AdamW
    state and an EMA copy, all on cuda:0."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: gpu_bf16)
    cfg = coco_cfg
    assert cfg.train_ldm.mixed_precision == "auto"
    denoiser = coco_models["denoiser"]
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    unet_dtypes = []
    hook = denoiser.unet.conv_in.register_forward_hook(lambda mod, inp, out: unet_dtypes.append(out.dtype))
    try:
        with fake_cuda, GeneratorDeviceCheck() as generators:
            comps = LDMComponents(denoiser=denoiser, mask_ae=coco_models["mask_autoencoder"],
                                  image_encoder=coco_models["image_encoder"], latent_scale=1.3)
            optimizer, lr_scheduler = make_optimizer(denoiser.parameters(), cfg.train_ldm)
            ema = make_ema(denoiser, cfg.train_ldm.ema_decay)
            comps.ema = ema
            state = TrainState(Stage("ldm", denoiser, comps), cfg, optimizer, lr_scheduler, CUDA,
                               scaler=make_scaler(cfg.train_ldm.mixed_precision, CUDA), ema=ema)
            assert (state.scaler is not None) == scaled
            if scaled:
                assert state.scaler.is_enabled()
            seed_on_cuda(state, monkeypatch)
            REACHED_LEAVES.clear()
            metrics = train_step(state, coco_batch())
            assert_on_cuda([p.grad for p in trainable], "gradients")
            assert_on_cuda([s for p in trainable for s in optimizer.state[p].values() if s.ndim], "AdamW state")
            assert_on_cuda(ema.shadow_params, "EMA weights")
    finally:
        hook.remove()
    assert metrics["skipped"] == 0.0 and state.step == 1
    assert REACHED_LEAVES == [len(trainable)]  # the loss reaches every trainable parameter
    assert generators.checked >= 3  # timesteps, noise and self-conditioning draws used the cuda generator
    assert unet_dtypes and set(unet_dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float16}
    assert ("loss_scale" in metrics) == scaled


def test_ldm_train_step_in_float32_on_fake_cuda(fake_cuda, coco_cfg, coco_models):
    """``mixed_precision: no`` on cuda: float32 throughout, no scaler, no generator (global RNG on cuda)."""
    denoiser = coco_models["denoiser"]
    dtypes = []
    hook = denoiser.unet.conv_in.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    cfg = load_config(COCO_YAML, ["train_ldm.mixed_precision='no'"])  # quoted: YAML reads a bare no as False
    try:
        with fake_cuda:
            comps = LDMComponents(denoiser=denoiser, mask_ae=coco_models["mask_autoencoder"],
                                  image_encoder=coco_models["image_encoder"], latent_scale=1.3)
            optimizer, lr_scheduler = make_optimizer(denoiser.parameters(), cfg.train_ldm)
            assert make_scaler(cfg.train_ldm.mixed_precision, CUDA) is None
            metrics = ldm_train_step(comps, coco_batch(), optimizer, cfg, lr_scheduler=lr_scheduler)
    finally:
        hook.remove()
    assert metrics["skipped"] == 0.0 and set(dtypes) == {torch.float32}


@pytest.mark.parametrize("overrides", [[], ["mask_ae.latent_noise=0.1"]], ids=["coco", "latent-noise"])
def test_ae_train_step_on_fake_cuda(fake_cuda, coco_cfg, monkeypatch, overrides):
    """One mask-AE step of the coco recipe (128 slots, 12 544 loss points per image) through
    ``TrainState.create("ae", device=cuda:0)`` (built, then moved to cuda:0) and ``train_step``:
    the bit planes, the latent noise and the point sampling draw on cuda:0 with the state's cuda
    generator; gradients and AdamW state stay on cuda:0."""
    cfg = load_config(COCO_YAML, overrides)
    with fake_cuda, GeneratorDeviceCheck() as generators:
        state = TrainState.create("ae", cfg, device=CUDA)
        assert_on_cuda(list(state.model.parameters()), "mask AE")
        seed_on_cuda(state, monkeypatch)
        REACHED_LEAVES.clear()
        metrics = train_step(state, coco_batch())
        params = list(state.model.parameters())
        assert_on_cuda([p.grad for p in params], "gradients")
        assert_on_cuda([s for p in params for s in state.optimizer.state[p].values() if s.ndim], "AdamW state")
    assert metrics["skipped"] == 0.0 and state.step == 1
    assert REACHED_LEAVES == [len(params)]
    assert generators.checked >= (3 if overrides else 2)  # point sampling (+ latent noise)


@pytest.mark.parametrize("autocast", ["no", "auto"])
def test_two_sampling_steps_on_fake_cuda(fake_cuda, coco_cfg, monkeypatch, autocast):
    """The serving path of a coco model: its components built on the CPU, then ``Segmenter`` moves
    them to cuda:0; images go from numpy to cuda:0, the SD VAE encodes them, two DDIM steps with
    self-conditioning run (``sample_latents``: initial noise drawn on the CPU, then moved;
    ``sampling.autocast`` off or ``auto``, bf16 here) and the AE decoder gives 128 slot logits at
    each image's own size, all on cuda:0; then the same with ``sample_latents`` and
    ``decode_latents`` directly, and once more inpainting known latent cells.

    Post-processing (:func:`ldmseg.postprocess.postprocess`) is not run: it reads the logits'
    values into numpy, which fake tensors do not have."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cfg = with_sampling(coco_cfg, {"steps": 2, "autocast": autocast})
    images = [np.zeros((480, 640, 3), np.uint8), np.zeros((512, 384, 3), np.uint8)]
    calls, dtypes = [], set()
    parts = fake_components(fake_cuda, cfg, torch.device("cpu"))  # as loaded on the CPU
    parts["denoiser"].register_forward_hook(lambda mod, inp, out: calls.append((inp[0].device, out.device)))
    parts["denoiser"].unet.conv_in.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    with fake_cuda, GeneratorDeviceCheck():
        seg = Segmenter(cfg, parts["mask_autoencoder"], parts["image_encoder"], parts["denoiser"],
                        latent_scale=1.3, device=CUDA)
        for name, module in parts.items():
            assert_on_cuda(list(module.parameters()), name)
        prepared = [seg.prepare(image) for image in images]
        x0 = seg._sample([p[0] for p in prepared], [0, 1], cfg.sampling)
        assert x0.shape == (2, 4, 64, 64) and x0.device == CUDA and x0.dtype == torch.float32
        logits = [seg._logits(z, info) for z, (_, info) in zip(x0, prepared)]
        assert [tuple(t.shape) for t in logits] == [(128, 480, 640), (128, 512, 384)]
        assert_on_cuda(logits, "slot logits")
        # the same through the public functions, on a batch of image latents
        image_latent = seg.image_encoder.encode(torch.zeros(2, 3, 512, 512, device=CUDA))
        x0 = sample_latents(seg.denoiser, image_latent, diffusion_cfg=cfg.diffusion,
                            sampling_cfg=cfg.sampling, seeds=[3, 4], latent_channels=4)
        decoded = decode_latents(seg.mask_ae, x0, 1.3)
        assert decoded.shape == (2, 128, 512, 512) and decoded.device == CUDA
        # inpainting: known latent cells kept, their noise schedule indexed on cuda:0
        known_mask = torch.zeros(2, 1, 64, 64, dtype=torch.bool, device=CUDA)
        x0 = sample_latents(seg.denoiser, image_latent, diffusion_cfg=cfg.diffusion, sampling_cfg=cfg.sampling,
                            seeds=[3, 4], latent_channels=4, known_latent=x0, known_mask=known_mask)
        assert x0.shape == (2, 4, 64, 64) and x0.device == CUDA
    assert calls == [(CUDA, CUDA)] * 6  # two denoiser calls per sampling run
    assert dtypes == {torch.bfloat16 if autocast == "auto" else torch.float32}
