"""One parity suite: every backend and export against the reference model (dpfit.model.reference).

Paths: ``reference`` itself (checked against the DeePMD-kit fixtures); the fast model's backends
(dpfit.model.backends): ``compact`` (PyTorch on CPU, deriving its index facts from the neighbour
list), ``kernels`` (the C++ op library; skipped where it cannot be built), ``static`` (every slot
embedded: the GPU and torch.compile layout, on CPU) and ``cuda`` (static on a GPU; skipped without one);
and TorchScript exports saved and loaded back, ``script`` (PyTorch only), ``script_kernels`` (calling
the op library) and ``script_static`` (a frozen file's GPU path, here on CPU). All but ``compact`` take the batch's index facts as the data pipeline computes them
(:func:`dpfit.data.index_facts.index_facts`). Each is compared with the reference on the same
weights: energy, forces, virial, atomic energies, atomic virials (inference), and (not for the exports,
whose parameters carry no gradient) the parameter gradients of an energy + force + virial training loss.

Tolerances, relative to each quantity's largest magnitude: float64 1e-10. Float32 models are compared
with the float64 reference of the same weights: 2e-5 for outputs and 5e-5 for the loss gradients
(observed on the tiny models: at most 1.6e-6 and 2.5e-6; float32's epsilon is 1.2e-7).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch

from dpfit.data.index_facts import index_facts
from dpfit.data.neighbor import build_neighbor_list
from dpfit.io.export import frozen_copy
from dpfit.model import EnergyModel, ReferenceEnergyModel, build_model, convert
from dpfit.model.kernels import load_library
from dpfit.model.kernels.registration import backward_node

pytestmark = pytest.mark.usefixtures("single_torch_thread")

KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial")
PATHS = ("reference", "compact", "kernels", "static", "cuda", "script", "script_kernels", "script_static")
WITH_FACTS = {"kernels", "static", "cuda", "script", "script_kernels", "script_static"}
#: TorchScript of a frozen file's paths: CPU without / with the op library, and the GPU path (static)
EXPORTS = {"script": "compact", "script_kernels": "kernels", "script_static": "static"}
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5)}  # (outputs, loss gradients)

#: the options of the model, one case each (tiny models; batches of three frames)
OPTIONS = {
    "one_side": {},
    "pair_nets": {"type_one_side": False},
    "exclude_types": {"exclude_types": [[0, 1]]},
    "resnet_dt": {"resnet_dt": True},
    "fparam_aparam": {"numb_fparam": 2, "numb_aparam": 1},
    "pair_nets_exclude_self": {"type_one_side": False, "exclude_types": [[1, 1]], "resnet_dt": True},
    # davg/dstd differing from slot to slot (not DeePMD's statistics): no embedding row is shared
    "slot_dependent_stats": {"slot_dependent_stats": True},
    "float32": {"precision": "float32"},
    "float32_pair_nets": {"precision": "float32", "type_one_side": False, "numb_aparam": 1},
}


def on_path(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A copy of the model (weights, statistics) as the implementation ``path``, or skip the test."""
    model = copy.deepcopy(model)  # (the fixtures' models are shared between tests)
    if path == "reference":
        return convert(model, "reference")
    fast = convert(model, "fast")
    if path in ("kernels", "script_kernels") and load_library(required=False) is None:
        pytest.skip("the op library is unavailable (no compiler)")
    if path in EXPORTS:
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(frozen_copy(fast, EXPORTS[path])), buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)
    if path == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return fast.to("cuda").use_backend("static")
    return fast.use_backend(path)


def batch_inputs(model, frames, fparam=None, aparam=None, device="cpu", facts=False) -> dict:
    """Model inputs of frames ``[(coord, atype, box or None), ...]`` with the same atom count (atom
    types may differ from frame to frame: a mixed-system batch); ``facts``: with the index facts."""
    nls = [build_neighbor_list(c, t, b, model.rcut, model.sel, warn=False) for c, t, b in frames]
    assert all(nl.n_dropped == 0 for nl in nls)
    inputs = {
        "coord": torch.from_numpy(np.stack([c for c, _, _ in frames])),
        "atype": torch.from_numpy(np.stack([t for _, t, _ in frames]).astype(np.int64)),
        "nlist": torch.from_numpy(np.stack([nl.nlist for nl in nls])),
    }
    if frames[0][2] is not None:
        inputs["box"] = torch.from_numpy(np.stack([b for _, _, b in frames]))
        inputs["shift"] = torch.from_numpy(np.stack([nl.shift for nl in nls]))
    if fparam is not None:
        inputs["fparam"] = torch.as_tensor(fparam, dtype=torch.float64)
    if aparam is not None:
        inputs["aparam"] = torch.as_tensor(aparam, dtype=torch.float64)
    if facts:
        inputs.update(index_facts(inputs["nlist"], inputs.get("shift"), inputs["atype"], model.sel))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def outputs(model, inputs: dict, mode=torch.no_grad) -> dict[str, torch.Tensor]:
    """Inference: every output, under ``torch.no_grad`` (the path used by test.py and ASE)."""
    with mode():
        out = model(**inputs, do_force=True, do_virial=True, do_atomic_virial=True)
    return {k: out[k].detach().cpu().double() for k in KEYS}


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``tensor``."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.add(fn.name())
            stack.extend(f for f, _ in fn.next_functions)
    return names


def loss_gradients(model, inputs: dict, labels: dict) -> dict[str, torch.Tensor]:
    """Training: the parameter gradients of an energy + force + virial loss (forces with their graph)."""
    model.train()
    model.zero_grad()
    out = model(**inputs, do_force=True, do_virial=True, create_graph=True)
    compiled = backward_node("fitting") in graph_nodes(out["force"])
    chosen = isinstance(model, EnergyModel) and model.backend == "kernels"
    assert compiled == chosen, "the compiled kernels ran where not chosen, or not at all"
    loss = ((out["energy"] - labels["energy"].to(out["energy"])) ** 2).mean()
    loss = loss + ((out["force"] - labels["force"].to(out["force"])) ** 2).mean() * 10.0
    loss = loss + ((out["virial"] - labels["virial"].to(out["virial"])) ** 2).mean() * 0.1
    loss.backward()
    model.eval()
    return {n: p.grad.detach().cpu().double() for n, p in model.named_parameters()}


def assert_close_to(got: dict, want: dict, rtol: float, what: str) -> None:
    for key, ref in want.items():
        scale = float(ref.abs().max())
        torch.testing.assert_close(got[key], ref, rtol=rtol, atol=rtol * max(scale, 1e-30),
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


def random_labels(inputs: dict, seed: int = 5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    nf, nloc = inputs["atype"].shape
    return {"energy": torch.randn(nf, generator=gen, dtype=torch.float64) - 20.0,
            "force": torch.randn(nf, nloc, 3, generator=gen, dtype=torch.float64),
            "virial": torch.randn(nf, 9, generator=gen, dtype=torch.float64)}


def _tiny_case(tiny_model, random_frame, option: str, periodic: bool, mixed: bool):
    overrides = dict(OPTIONS[option])
    per_slot = overrides.pop("slot_dependent_stats", False)
    model = tiny_model(overrides.pop("precision", "float64"), **overrides)
    if per_slot:
        gen = torch.Generator().manual_seed(0)
        desc = model.descriptor
        with torch.no_grad():
            desc.davg.add_(0.05 * torch.randn(desc.davg.shape, generator=gen, dtype=desc.davg.dtype))
            desc.dstd.mul_(1.0 + 0.1 * torch.rand(desc.dstd.shape, generator=gen, dtype=desc.dstd.dtype))
    frames = [random_frame(seed=20 + k, natoms=7, periodic=periodic) for k in range(3)]
    if mixed:  # other atom types per frame: the second frame's types reversed, the third's all type 1
        frames[1] = (frames[1][0], frames[1][1][::-1].copy(), frames[1][2])
        frames[2] = (frames[2][0], np.ones_like(frames[2][1]), frames[2][2])
    rng = np.random.default_rng(3)
    fparam = rng.normal(size=(3, model.fitting.numb_fparam)) if model.fitting.numb_fparam else None
    aparam = rng.normal(size=(3, 7, model.fitting.numb_aparam)) if model.fitting.numb_aparam else None
    return model, frames, fparam, aparam


@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("periodic", [True, False], ids=["pbc", "nopbc"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_tiny_model_outputs_and_gradients_equal_reference(tiny_model, random_frame, option, periodic, path):
    model, frames, fparam, aparam = _tiny_case(tiny_model, random_frame, option, periodic, mixed=False)
    device = "cuda" if path == "cuda" else "cpu"
    impl = on_path(model, path)
    reference = convert(model, "reference").double()
    out_tol, grad_tol = TOL[model.dtype]
    inputs = batch_inputs(model, frames, fparam, aparam)
    want = outputs(reference, inputs)
    assert float(want["force"].abs().max()) > 1e-2, "forces too small for a meaningful check"
    assert_close_to(outputs(impl, batch_inputs(model, frames, fparam, aparam, device, path in WITH_FACTS)), want, out_tol, path)
    if option == "one_side":  # also under torch.inference_mode (Lightning's default for validation)
        with torch.inference_mode():
            inference_inputs = batch_inputs(model, frames, fparam, aparam, device, path in WITH_FACTS)
        assert_close_to(outputs(impl, inference_inputs, torch.inference_mode), want, out_tol, f"{path} inference")
        assert_close_to(outputs(reference, inference_inputs, torch.inference_mode), want, out_tol, "reference")
    if path in EXPORTS:
        return
    labels = random_labels(inputs)
    want_grads = loss_gradients(reference, inputs, labels)
    assert max(float(g.abs().max()) for g in want_grads.values()) > 1e-3
    got_grads = loss_gradients(impl, batch_inputs(model, frames, fparam, aparam, device, path in WITH_FACTS), labels)
    assert_close_to(got_grads, want_grads, grad_tol, f"{path} loss gradient")


@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("option", ["one_side", "pair_nets", "float32"])
def test_mixed_system_batch_equals_reference(tiny_model, random_frame, option, path):
    """Frames whose atom types differ within one batch (the fast path sorts atoms by type)."""
    model, frames, fparam, aparam = _tiny_case(tiny_model, random_frame, option, True, mixed=True)
    device = "cuda" if path == "cuda" else "cpu"
    impl = on_path(model, path)
    reference = convert(model, "reference").double()
    out_tol, grad_tol = TOL[model.dtype]
    inputs = batch_inputs(model, frames, fparam, aparam)
    assert_close_to(outputs(impl, batch_inputs(model, frames, fparam, aparam, device, path in WITH_FACTS)), outputs(reference, inputs),
                    out_tol, path)
    if path in EXPORTS:
        return
    labels = random_labels(inputs)
    assert_close_to(loss_gradients(impl, batch_inputs(model, frames, fparam, aparam, device, path in WITH_FACTS), labels),
                    loss_gradients(reference, inputs, labels), grad_tol, f"{path} loss gradient")


# ----------------------------------------------------------------------------------------------------------------
# the DeePMD-kit fixtures: the reference reproduces them; every path equals the reference
# ----------------------------------------------------------------------------------------------------------------


def _npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def water_case(water_fixture):
    from dpfit.io.deepmd_checkpoint import load_deepmd_checkpoint

    model = load_deepmd_checkpoint(water_fixture / "model.ckpt.pt")
    ref = _npz(water_fixture / "reference_data_3.npz")
    frames = [(ref["coord"][k].reshape(-1, 3).astype(np.float64), ref["atype"], ref["box"][k].reshape(3, 3))
              for k in (0, 1)]
    return model, frames, None, None, {k: ref[k][:2] for k in KEYS}


@pytest.fixture(scope="module")
def cho_case(cho_fixture):
    from dpfit.io.deepmd_checkpoint import load_deepmd_checkpoint

    model = load_deepmd_checkpoint(cho_fixture / "model.ckpt.pt")
    ref = _npz(cho_fixture / "reference_C4H3O1.npz")
    frames = [(ref["coord"][k].reshape(-1, 3).astype(np.float64), ref["atype"], None) for k in (0, 1, 2)]
    return model, frames, ref["fparam"][:3], ref["aparam"][:3].reshape(3, len(ref["atype"]), -1), \
        {k: ref[k][:3] for k in KEYS}


@pytest.mark.parametrize("fixture", ["water_case", "cho_case"])
def test_reference_reproduces_deepmd_fixtures(request, fixture):
    model, frames, fparam, aparam, deepmd = request.getfixturevalue(fixture)
    reference = convert(model, "reference")
    got = outputs(reference, batch_inputs(model, frames, fparam, aparam))
    for key in KEYS:
        want = torch.from_numpy(deepmd[key]).reshape(got[key].shape)
        torch.testing.assert_close(got[key], want, rtol=1e-10, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("path", PATHS[1:])
@pytest.mark.parametrize("fixture", ["water_case", "cho_case"])
def test_fixture_models_equal_reference(request, fixture, path):
    model, frames, fparam, aparam, _ = request.getfixturevalue(fixture)
    device = "cuda" if path == "cuda" else "cpu"
    impl = on_path(model, path)
    reference = convert(model, "reference")
    inputs = batch_inputs(model, frames, fparam, aparam)
    assert_close_to(outputs(impl, batch_inputs(model, frames, fparam, aparam, device, path in WITH_FACTS)), outputs(reference, inputs),
                    1e-10, path)
    if path in EXPORTS:
        return
    if fixture == "water_case":  # gradients on one frame (192 atoms: the reference's double backward is slow)
        inputs = {k: v[:1] for k, v in inputs.items()}
    labels = random_labels(inputs)
    impl_inputs = {k: v.to(device) for k, v in inputs.items()}
    assert_close_to(loss_gradients(impl, impl_inputs, labels), loss_gradients(reference, inputs, labels), 1e-10,
                    f"{path} loss gradient")


# ----------------------------------------------------------------------------------------------------------------
# one model, two implementations: configs, checkpoints and training
# ----------------------------------------------------------------------------------------------------------------


def test_same_seed_same_initial_weights():
    """Both implementations draw the same initial weights from a seed and have the same state_dict."""
    from conftest import tiny_config

    config = tiny_config(type_one_side=False, resnet_dt=True, numb_fparam=1)
    fast = build_model({**config, "impl": "fast"})
    reference = build_model({**config, "impl": "reference"})
    assert isinstance(fast, EnergyModel) and isinstance(reference, ReferenceEnergyModel)
    a, b = fast.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="model.impl='slow'"):
        build_model({**config, "impl": "slow"})


def test_training_with_the_reference_equals_fast(tmp_path):
    """``model.impl=reference`` trains (Lightning, Hydra config) to the same weights as the fast model
    from the same seed and data; its checkpoint loads as either implementation, and ``test.py
    impl=...`` gives the same errors with both."""
    from hydra_utils import FAST, compose_train

    from dpfit.cli.train import train
    from dpfit.io.checkpoint import load_model

    weights = {}
    for impl in ("reference", "fast"):
        cfg = compose_train([*FAST, f"model.impl={impl}", "model.kernels=off"], tmp_path / impl)
        train(cfg)
        weights[impl] = torch.load(tmp_path / impl / "checkpoints" / "last.ckpt", map_location="cpu",
                                   weights_only=False)["state_dict"]
    assert weights["fast"].keys() == weights["reference"].keys()
    for key, value in weights["fast"].items():
        torch.testing.assert_close(weights["reference"][key], value, rtol=1e-8, atol=1e-10, msg=key)
    ckpt = tmp_path / "reference" / "checkpoints" / "last.ckpt"
    assert isinstance(load_model(ckpt), ReferenceEnergyModel)
    assert isinstance(load_model(ckpt, impl="fast"), EnergyModel)

    from omegaconf import OmegaConf

    from dpfit.cli.test import run
    from dpfit.data.demo import default_cache_dir

    summaries = {}
    for impl in ("reference", "fast"):
        cfg = OmegaConf.create({"ckpt_path": str(ckpt), "systems": [str(default_cache_dir())], "batch_size": 45,
                                "detail_file": None, "precision": None, "impl": impl, "device": "cpu",
                                "kernels": "off", "plots": False})
        summaries[impl] = run(cfg)["average"]
    assert summaries["fast"].keys() == summaries["reference"].keys() and "rmse_f" in summaries["fast"]
    for key, value in summaries["fast"].items():
        assert summaries["reference"][key] == pytest.approx(value, rel=1e-9), key
