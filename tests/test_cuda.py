"""The model and the training loop on a CUDA GPU: the DeePMD-kit fixtures reproduced there, the training
gradients equal to the CPU's, a 12288-atom supercell, and Lightning runs with ``trainer=gpu`` / ``trainer=ddp``.

Skipped without a GPU (CI has none); `scripts/gpu_check.sh` runs them on a lent GPU machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra_utils import FAST, SHARED, compose_train

from dpfit.cli.train import train
from dpfit.data.batch import batch_to_device, collate, make_sample, model_inputs
from dpfit.data.system import DeepmdSystem
from dpfit.io.deepmd_checkpoint import load_deepmd_checkpoint
from dpfit.training.loss import EnergyLoss

#: DPFIT_TEST_DEVICE=cpu runs these checks on the CPU (a dry run of the GPU script; the trainer runs stay on GPUs)
CUDA = torch.device(os.environ.get("DPFIT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
KEYS = ("energy", "force", "virial", "atom_energy", "atom_virial")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def water_fixture_dir() -> Path:
    path = SHARED / "fixtures" / "deepmd_water_se_e2_a"
    if not path.is_dir():
        pytest.skip(f"fixture {path} is absent")
    return path


@pytest.fixture(scope="module")
def water_ref(water_fixture_dir):
    return _load_npz(water_fixture_dir / "reference_data_3.npz")


def test_water_fixture_on_gpu_float64(water_fixture_dir, water_ref, run_model):
    """DeePMD-kit's energies, forces, virials and their atomic parts on the 10 reference frames, on the GPU,
    to float64 round-off (the same tolerance as the CPU parity tests)."""
    model = load_deepmd_checkpoint(water_fixture_dir / "model.ckpt.pt").to(CUDA)
    ref = water_ref
    out = run_model(model, ref["coord"], ref["atype"], ref["box"], device=CUDA)
    for key in KEYS:
        np.testing.assert_allclose(out[key].reshape(ref[key].shape), ref[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_water_fixture_on_gpu_float32(water_fixture_dir, water_ref, run_model):
    model = load_deepmd_checkpoint(water_fixture_dir / "model.ckpt.pt", precision="float32").to(CUDA)
    ref = water_ref
    out = run_model(model, ref["coord"], ref["atype"], ref["box"], device=CUDA)
    np.testing.assert_allclose(out["energy"].ravel(), ref["energy"].ravel(), rtol=1e-5)
    np.testing.assert_allclose(out["force"].reshape(ref["force"].shape), ref["force"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(out["virial"].reshape(ref["virial"].shape), ref["virial"], rtol=0, atol=1e-2)


def test_cho_fixture_on_gpu(run_model):
    """Non-periodic molecules with fparam and aparam (type_one_side false: one embedding per type pair)."""
    path = SHARED / "fixtures" / "deepmd_cho_nopbc_fparam"
    if not path.is_dir():
        pytest.skip(f"fixture {path} is absent")
    model = load_deepmd_checkpoint(path / "model.ckpt.pt").to(CUDA)
    for name in ("C3H3O4", "C4H3O1"):
        ref = _load_npz(path / f"reference_{name}.npz")
        out = run_model(model, ref["coord"], ref["atype"], None, ref["fparam"], ref["aparam"], device=CUDA)
        for key in KEYS:
            np.testing.assert_allclose(out[key].reshape(ref[key].shape), ref[key], rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name} {key}")


def _loss_and_grads(model, inp: dict, labels: dict) -> dict:
    """The DeePMD training loss (energy + force, forces with their graph) and every parameter's gradient."""
    model.train()
    out = model(**inp, do_force=True, create_graph=True)
    loss, _ = EnergyLoss()(out, labels, 1.0)
    loss.backward()
    grads = {k: v.grad.detach().cpu().numpy() for k, v in model.named_parameters() if v.grad is not None}
    return {"loss": loss.item(), **grads}


def test_training_gradients_on_gpu_equal_cpu(water_fixture_dir):
    """The loss and the gradient of every parameter (through the closed-form forces, one backward pass) from the same
    weights on a data_0 frame agree between CPU and GPU to 1e-9 of each gradient's largest entry."""
    system = DeepmdSystem(SHARED / "data" / "water" / "data_0", ["O", "H"])
    results = []
    for device in (torch.device("cpu"), CUDA):
        model = load_deepmd_checkpoint(water_fixture_dir / "model.ckpt.pt").to(device)
        for p in model.parameters():
            p.requires_grad_(True)
        batch = batch_to_device(collate([make_sample(system, 7, model.rcut, model.sel)]), device)
        results.append(_loss_and_grads(model, model_inputs(batch), batch))
    cpu, gpu = results
    assert cpu.keys() == gpu.keys() and len(cpu) > 10
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-10)
    for key in cpu:
        scale = np.abs(cpu[key]).max()
        assert scale > 0, key
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=0, atol=1e-9 * scale, err_msg=key)


def test_training_step_on_gpu_makes_no_host_sync(water_fixture_dir):
    """A training step (energy + forces with their graph, the loss, its backward, Adam) on a batch of two
    frames with the index facts from collate runs under ``torch.cuda.set_sync_debug_mode("error")``: no
    device-to-host copy or synchronisation (which would leave the GPU idle and rule out CUDA graphs)."""
    if CUDA.type != "cuda":
        pytest.skip("needs a CUDA device")
    system = DeepmdSystem(SHARED / "data" / "water" / "data_0", ["O", "H"])
    model = load_deepmd_checkpoint(water_fixture_dir / "model.ckpt.pt").to(CUDA)
    model.train()
    samples = [{**make_sample(system, k, model.rcut, model.sel), "sel": model.sel} for k in (3, 4)]
    batch = batch_to_device(collate(samples), CUDA)
    assert "partner" in batch and isinstance(batch["type_counts"], list)
    loss_fn = EnergyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(**model_inputs(batch), do_force=True, do_virial=True, create_graph=True)
        loss, _ = loss_fn(out, batch, 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (cuBLAS handles, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("reps", [4])
def test_supercell_on_gpu_is_extensive(water_fixture_dir, reps, run_model):
    """A reps^3 supercell (12288 atoms for reps=4) of a data_3 frame: reps^3 times the energy and virial,
    each periodic copy of an atom with the same force; float64."""
    model = load_deepmd_checkpoint(water_fixture_dir / "model.ckpt.pt").to(CUDA)
    frame = DeepmdSystem(SHARED / "data" / "water" / "data_3", model.type_map).frame(25)
    coord, atype, box = frame["coord"], frame["atype"], frame["box"]
    single = run_model(model, coord, atype, box, device=CUDA)
    shifts = np.stack(np.meshgrid(*[np.arange(reps)] * 3, indexing="ij"), -1).reshape(-1, 3)
    big_coord = (coord[None] + (shifts @ box)[:, None]).reshape(-1, 3)
    big = run_model(model, big_coord, np.tile(atype, len(shifts)), box * reps, device=CUDA)
    ncopies, n = len(shifts), len(atype)
    np.testing.assert_allclose(big["energy"], ncopies * single["energy"], rtol=1e-11)
    np.testing.assert_allclose(big["force"].reshape(ncopies, n, 3), np.broadcast_to(single["force"], (ncopies, n, 3)),
                               rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(big["virial"], ncopies * single["virial"], rtol=1e-9, atol=1e-9)


def test_train_cli_on_gpu(tmp_path):
    """`python train.py trainer=gpu` on the built-in demo data: runs, validates, writes checkpoints that
    load on the CPU."""
    cfg = compose_train(["trainer=gpu", *FAST], tmp_path)
    value = train(cfg)
    assert value is not None and math.isfinite(value)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())
    assert (tmp_path / "lcurve.out").read_text().startswith("#")


def test_water_experiment_on_gpu_with_workers_and_ddp(tmp_path):
    """The water experiment under DDP (NCCL, one GPU), neighbor lists built by DataLoader workers into pinned
    memory (data.num_workers=auto on a GPU)."""
    if not (SHARED / "data" / "water").is_dir():
        pytest.skip("../shared/data/water not available")
    cfg = compose_train(["experiment=water_se_e2_a", f"paths.data_root={SHARED / 'data' / 'water'}", "trainer=ddp",
                         "trainer.devices=1", "trainer.max_steps=20", "trainer.val_check_interval=10",
                         "data.data_stat_nbatch=2", "~callbacks.progress_bar"], tmp_path)
    value = train(cfg)
    assert math.isfinite(value)
    rows = [r for r in (tmp_path / "lcurve.out").read_text().splitlines() if not r.startswith("#")]
    assert len(rows) == 2
