"""ASE calculator: agreement with the model, stress, neighbor-list reuse, NVE energy conservation, md_demo."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.md.verlet import VelocityVerlet
from hydra_utils import FAST, REPO, compose_train

from dpfit.calculators import DPCalculator
from dpfit.data.neighbor import build_neighbor_list

pytestmark = pytest.mark.usefixtures("single_torch_thread")

#: largest |E_tot(t) - E_tot(0)| per atom (eV) allowed over 200 velocity-Verlet steps of 1 fs from 300 K
#: (measured: 1.4e-7 eV/atom with the random model below)
NVE_TOLERANCE_EV_PER_ATOM = 1e-5


def _cuni(model_factory, rcut=4.4, sel=(40, 40), **kw):
    """Tiny random (smooth) model whose types are Cu and Ni."""
    model = model_factory(sel=list(sel), rcut=rcut, **kw)
    model.type_map = ["Cu", "Ni"]
    return model


def _cell(seed=0, rattle=0.1, size=2) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((size, size, size))
    rng = np.random.default_rng(seed)
    symbols = np.array(atoms.get_chemical_symbols())
    symbols[rng.choice(len(atoms), len(atoms) // 2, replace=False)] = "Ni"
    atoms.set_chemical_symbols(symbols.tolist())
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(scale=0.02, size=(3, 3))), scale_atoms=True)
    atoms.rattle(rattle, seed=seed + 1)
    return atoms


def _thermalize(atoms, temperature_K, seed):
    rng = np.random.default_rng(seed)
    masses = atoms.get_masses()[:, None]
    momenta = rng.normal(size=(len(atoms), 3)) * np.sqrt(masses * units.kB * temperature_K)
    momenta -= momenta.sum(axis=0) / len(atoms)  # no centre-of-mass drift
    atoms.set_momenta(momenta)


def test_matches_model_and_stress_is_minus_virial_over_volume(tiny_model, run_model, random_frame):
    model = _cuni(tiny_model, rcut=4.0, sel=[24, 24])
    coord, atype, box = random_frame(seed=3, natoms=12)
    atoms = Atoms(symbols=[model.type_map[t] for t in atype], positions=coord, cell=box, pbc=True)
    atoms.calc = DPCalculator(model)
    ref = run_model(model, coord, atype, box)
    np.testing.assert_allclose(atoms.get_potential_energy(), ref["energy"], rtol=1e-13, atol=0)
    np.testing.assert_allclose(atoms.calc.get_property("free_energy", atoms), ref["energy"], rtol=1e-13)
    np.testing.assert_allclose(atoms.get_forces(), ref["force"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energies(), ref["atom_energy"], rtol=0, atol=1e-12)
    stress = -ref["virial"].reshape(3, 3) / atoms.get_volume()
    np.testing.assert_allclose(atoms.get_stress(voigt=False), 0.5 * (stress + stress.T), rtol=0, atol=1e-14)
    xx, yy, zz, yz, xz, xy = atoms.get_stress()
    assert (xx, yy, zz) == pytest.approx((stress[0, 0], stress[1, 1], stress[2, 2]), abs=1e-14)
    assert (yz, xz, xy) == pytest.approx((stress[1, 2], stress[0, 2], stress[0, 1]), abs=1e-14)
    # the stress is the strain derivative of the energy: compare with finite differences of a strained cell
    eps, h = np.zeros((3, 3)), 1e-5
    eps[0, 1] = eps[1, 0] = h / 2
    e = []
    for sign in (1, -1):
        strained = atoms.copy()
        strained.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
        strained.calc = DPCalculator(model)
        e.append(strained.get_potential_energy())
    assert (e[0] - e[1]) / (2 * h) / atoms.get_volume() == pytest.approx(xy, rel=1e-6, abs=1e-9)
    assert all(p.requires_grad for p in model.parameters())  # frozen only during the calls


def test_non_periodic_has_no_stress(tiny_model, run_model, random_frame):
    model = _cuni(tiny_model, rcut=4.0, sel=[24, 24])
    coord, atype, _ = random_frame(seed=5, natoms=8, periodic=False)
    atoms = Atoms(symbols=[model.type_map[t] for t in atype], positions=coord)
    atoms.calc = DPCalculator(model)
    ref = run_model(model, coord, atype)
    np.testing.assert_allclose(atoms.get_potential_energy(), ref["energy"], rtol=1e-13)
    np.testing.assert_allclose(atoms.get_forces(), ref["force"], rtol=0, atol=1e-12)
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        atoms.get_stress()


def test_clear_errors(tiny_model):
    model = _cuni(tiny_model, rcut=4.0, sel=[24, 24])
    atoms = _cell()
    atoms[0].symbol = "Fe"
    atoms.calc = DPCalculator(model)
    with pytest.raises(ValueError, match=r"Fe not in the model's type_map \['Cu', 'Ni'\]"):
        atoms.get_potential_energy()
    atoms = _cell()
    atoms.pbc = [True, True, False]
    atoms.calc = DPCalculator(model)
    with pytest.raises(ValueError, match="mixed periodicity"):
        atoms.get_potential_energy()
    with pytest.raises(ValueError, match="takes no fparam"):
        DPCalculator(model, fparam=[1.0])


def test_fparam_aparam(tiny_model, run_model, random_frame):
    model = _cuni(tiny_model, rcut=4.0, sel=[24, 24], numb_fparam=1, numb_aparam=1)
    coord, atype, box = random_frame(seed=2, natoms=10)
    aparam = np.linspace(-1.0, 1.0, len(atype)).reshape(-1, 1)
    atoms = Atoms(symbols=[model.type_map[t] for t in atype], positions=coord, cell=box, pbc=True)
    atoms.calc = DPCalculator(model, fparam=[0.3], aparam=aparam)
    ref = run_model(model, coord, atype, box, fparam=[0.3], aparam=aparam)
    np.testing.assert_allclose(atoms.get_potential_energy(), ref["energy"], rtol=1e-13)
    np.testing.assert_allclose(atoms.get_forces(), ref["force"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="needs fparam"):
        DPCalculator(model, aparam=aparam)
    with pytest.raises(ValueError, match="needs aparam"):
        DPCalculator(model, fparam=[0.3])


def test_neighbor_list_reuse_equals_fresh_lists_over_md(tiny_model):
    """With a small skin the candidates are searched a few times only, yet every step's list (and so the
    energy and forces, bit for bit) equals a fresh search, while neighbors cross rcut (~4.41 Å shell)."""
    model = _cuni(tiny_model)
    atoms = _cell(seed=4)
    reuse = DPCalculator(model, skin=0.3)
    fresh = DPCalculator(model, skin=0.0)
    atoms.calc = reuse
    _thermalize(atoms, 1500.0, seed=0)
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    atype = reuse.atom_types(atoms)
    counts = []
    for _ in range(60):
        dyn.run(1)
        nl = build_neighbor_list(atoms.get_positions(), atype, atoms.cell.array, model.rcut, model.sel)
        assert np.array_equal(reuse.nlist, nl.nlist) and np.array_equal(reuse.shift, nl.shift)
        probe = atoms.copy()
        probe.calc = fresh
        assert probe.get_potential_energy() == atoms.get_potential_energy()
        assert np.array_equal(probe.get_forces(), atoms.get_forces())
        assert np.array_equal(probe.get_stress(), atoms.get_stress())
        counts.append(int((nl.nlist >= 0).sum()))
    assert len(set(counts)) > 5, "neighbors should enter and leave the cutoff during the run"
    assert 2 <= reuse.neighbors.nbuild < 30, reuse.neighbors.nbuild
    # a cell change forces a new search, and the result still equals a fresh list
    before = reuse.neighbors.nbuild
    atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=True)
    atoms.get_forces()
    assert reuse.neighbors.nbuild == before + 1
    nl = build_neighbor_list(atoms.get_positions(), atype, atoms.cell.array, model.rcut, model.sel)
    assert np.array_equal(reuse.nlist, nl.nlist) and np.array_equal(reuse.shift, nl.shift)


def test_nve_conserves_energy(tiny_model):
    """200 velocity-Verlet steps of 1 fs, 32-atom Cu/Ni at 300 K, a smooth random model: the total energy
    stays within NVE_TOLERANCE_EV_PER_ATOM (0.01 meV/atom) of its start."""
    model = _cuni(tiny_model)
    atoms = _cell(seed=7, rattle=0.05)
    atoms.calc = DPCalculator(model, skin=1.0)
    _thermalize(atoms, 300.0, seed=1)
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    etot = []
    dyn.attach(lambda: etot.append(atoms.get_total_energy() / len(atoms)), interval=1)
    dyn.run(200)
    etot = np.asarray(etot)
    assert len(etot) == 201 and np.all(np.isfinite(etot))
    assert atoms.get_temperature() > 10.0  # it moved
    assert np.max(np.abs(etot - etot[0])) < NVE_TOLERANCE_EV_PER_ATOM


def test_deepmd_checkpoint_path(water_fixture):
    ref = np.load(water_fixture / "reference_data_3.npz")
    calc = DPCalculator(water_fixture / "model.ckpt.pt")
    assert calc.type_map == ["O", "H"]
    atoms = Atoms(symbols=[calc.type_map[t] for t in ref["atype"].reshape(-1)],
                  positions=ref["coord"][0].reshape(-1, 3), cell=ref["box"][0].reshape(3, 3), pbc=True)
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_potential_energy(), float(ref["energy"][0]), rtol=0, atol=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), ref["force"][0].reshape(-1, 3), rtol=0, atol=1e-10)
    stress = -ref["virial"][0].reshape(3, 3) / atoms.get_volume()
    np.testing.assert_allclose(atoms.get_stress(voigt=False), stress, rtol=0, atol=1e-12)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_md_demo_on_a_trained_checkpoint(tmp_path, capsys):
    """Train a few steps on the demo data (with the lcurve.png callback), then run scripts/md_demo.py on it."""
    cfg = compose_train([*FAST, "++callbacks.lcurve_plot._target_=dpfit.inference.lcurve_callback.LCurvePlot"],
                        tmp_path / "run")
    from dpfit.cli.train import train

    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert (tmp_path / "run" / "lcurve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md_demo = _load_script("md_demo")
    result = md_demo.main(["--ckpt", str(ckpt), "--steps", "10", "--nve-steps", "20", "--seed", "3"])
    out = capsys.readouterr().out
    assert "energy drift" in out and "atom-steps/s" in out
    assert result["natoms"] == 32
    assert math.isfinite(result["drift_mev_per_atom_per_ps"]) and result["nve_atom_steps_per_s"] > 0
