"""Compressed models (dpfit.model.tabulation, ``freeze.py compress=true``): the tables reproduce the
embedding nets to their measured bound and converge at the order of quintic Hermite pieces; the compressed
model equals the exact one within a tolerance derived from that bound on every backend and in the frozen
files (plain and on the op library); its forces are the gradient of its own energy; the refusals."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfit.data.neighbor import build_neighbor_list
from dpfit.errors import ConfigError
from dpfit.io.checkpoint import load_checkpoint, model_from_checkpoint
from dpfit.io.freeze_formats import CompressOptions, freeze_checkpoint, random_frames
from dpfit.model import tabulation
from dpfit.model.descriptor import switching_function
from dpfit.model.network import ResidualMLP
from dpfit.model.tabulation import TabulatedEmbedding, hermite_coefficients, input_ranges, node_derivatives

REPO = Path(__file__).resolve().parents[1]
WATER_MIN_NBOR_DIST = 0.8854  # the water fixture's (its checkpoint holds it)
TINY_MIN_NBOR_DIST = 1.0  # below the random frames' 1.2 Å

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _tolerance(bound: tuple[float, float], scale: float) -> float:
    """What a model output of magnitude ``scale`` may differ by, from the tables' bound (max |dg|, max
    |d(dg/ds)|): 10 x their sum, relative to the output (the water model's outputs differ by 0.2-6 x the
    sum at coarse steps, where round-off does not hide it; the tiny models' by 0.01-0.2 x)."""
    return 10.0 * sum(bound) * max(1.0, scale)


def _assert_close_to_bound(got: dict, want: dict, bound: tuple[float, float], natoms: int,
                           keys=("energy", "force", "virial")):
    """Energies and virials per atom, forces per component, within :func:`_tolerance`."""
    for key in keys:
        per_atom = natoms if key in ("energy", "virial") else 1
        a = np.asarray(got[key], dtype=np.float64).reshape(-1) / per_atom
        b = np.asarray(want[key], dtype=np.float64).reshape(-1) / per_atom
        tol = _tolerance(bound, float(np.abs(b).max()))
        assert np.abs(a - b).max() <= tol, f"{key}: {np.abs(a - b).max():.2e} > {tol:.2e}"


def _kernels_or_skip() -> str:
    from dpfit.model.kernels import load_library

    path = load_library(required=False)
    if path is None:
        pytest.skip("the op library is unavailable here")
    return path


@pytest.fixture(scope="module")
def water(water_fixture):
    path = water_fixture / "model.ckpt.pt"
    return model_from_checkpoint(load_checkpoint(path), path).eval()


@pytest.fixture(scope="module")
def water_compressed(water):
    model = copy.deepcopy(water)
    return model, model.compress(WATER_MIN_NBOR_DIST)


def _net(resnet_dt: bool = True, seed: int = 0) -> ResidualMLP:
    """An embedding net with every layer kind: 1 -> 4 (plain), 4 (same width), 8 (doubled), with idt."""
    return ResidualMLP(1, [4, 4, 8], resnet_dt, generator=torch.Generator().manual_seed(seed)).double()


# ------------------------------------------------------------------------------------------------------------
# the tables


def test_node_derivatives_equal_autograd():
    net = _net()
    s = torch.linspace(-2.0, 6.0, 9, dtype=torch.float64, requires_grad=True)
    g, g1, g2 = node_derivatives(net, s.detach())
    want = net(s.reshape(-1, 1))
    first = torch.stack([torch.autograd.grad(want[:, c].sum(), s, create_graph=True)[0] for c in range(8)], 1)
    second = torch.stack([torch.autograd.grad(first[:, c].sum(), s, retain_graph=True)[0] for c in range(8)], 1)
    torch.testing.assert_close(g, want.detach(), rtol=0, atol=1e-14)
    torch.testing.assert_close(g1, first.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(g2, second, rtol=0, atol=1e-12)


def test_pieces_match_value_slope_and_curvature_at_both_ends():
    gen = torch.Generator().manual_seed(1)
    g, g1, g2 = (torch.randn(5, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    h = 0.3
    c = hermite_coefficients(g, g1, g2, h)  # (4, 6, 3)
    k = torch.arange(6, dtype=torch.float64)[None, :, None]
    for u, node in ((0.0, slice(0, 4)), (1.0, slice(1, 5))):
        uu = torch.tensor(u, dtype=torch.float64)
        value = (c * uu**k).sum(1)
        slope = (c[:, 1:] * k[:, 1:] * uu ** (k[:, 1:] - 1)).sum(1) / h
        curvature = (c[:, 2:] * k[:, 2:] * (k[:, 2:] - 1) * uu ** (k[:, 2:] - 2)).sum(1) / h**2
        for got, want in ((value, g), (slope, g1), (curvature, g2)):
            torch.testing.assert_close(got, want[node], rtol=0, atol=1e-12)


def _random_inputs(table: TabulatedEmbedding, n: int = 20000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fine = table.lo + (table.hi - table.lo) * torch.rand(n, dtype=torch.float64, generator=gen)
    coarse = table.hi + (table.ext - table.hi) * torch.rand(n // 4, dtype=torch.float64, generator=gen)
    return fine, coarse


def _tables(name: str, request) -> list[tuple[ResidualMLP, TabulatedEmbedding]]:
    if name == "water":
        model = request.getfixturevalue("water")
        nets = list(model.descriptor.embeddings)
        ranges = input_ranges(model.descriptor, WATER_MIN_NBOR_DIST)
    else:
        nets = [_net(seed=2)]
        ranges = [tabulation.NetRange(-1.0, 4.0, 12.0)]
    return [(net, tabulation.tabulate(net, span, 0.01)) for net, span in zip(nets, ranges)]


@pytest.mark.parametrize("name", ["tiny", "water"])
def test_table_reproduces_the_net_to_its_bound(name, request):
    """At random inputs the table's g and dg/ds differ from the net's by at most its measured bound (taken
    on 5 points per piece: the peaks of the error), with room for round-off; the bound itself is ~1e-12
    relative or better in float64 at the default step."""
    for net, table in _tables(name, request):
        assert table.value_error <= 1e-13 * table.value_scale and table.tangent_error <= 1e-11 * table.tangent_scale
        fine, coarse = _random_inputs(table)
        for s, bound in ((fine, (table.value_error, table.tangent_error)),
                         (coarse, (table.value_error_ext, table.tangent_error_ext))):
            value, tangent = tabulation.table_error(table, net, s)
            assert value <= 2 * bound[0] + 4e-16 * table.value_scale, (value, bound)
            assert tangent <= 2 * bound[1] + 4e-16 * table.tangent_scale / table.step, (tangent, bound)


def test_error_falls_as_the_sixth_power_of_the_step():
    """Quintic Hermite pieces: halving the step divides the error of g by ~64 and of dg/ds by ~32 (a wrong
    coefficient would leave a lower order)."""
    net = _net(seed=3)
    span = tabulation.NetRange(-1.0, 4.0, 12.0)
    coarse, fine = tabulation.tabulate(net, span, 0.4), tabulation.tabulate(net, span, 0.2)
    assert coarse.value_error > 1e-11  # (above round-off)
    assert 40 < coarse.value_error / fine.value_error < 100
    assert 20 < coarse.tangent_error / fine.tangent_error < 50


def test_float32_table_is_as_good_as_float32():
    net = _net(seed=4).float()
    table = tabulation.tabulate(net, tabulation.NetRange(-1.0, 4.0, 12.0), 0.01)
    assert table.table.dtype == torch.float32
    assert table.value_error < 1e-6 * table.value_scale and table.tangent_error < 1e-4 * table.tangent_scale
    fine, _ = _random_inputs(table, 4000)
    value, _ = tabulation.table_error(table, net, fine)
    assert value <= 2 * table.value_error + 1e-7 * table.value_scale


@pytest.mark.parametrize("case", ["one_side", "pairs_excluded"])
def test_input_ranges_cover_every_input(tiny_model, random_frame, case):
    """Each net's range holds the padded slots' input -davg/dstd, the inputs of its real neighbours in a
    frame whose distances are >= min_nbor_dist (and 0 for an excluded pair), and its top is the input at
    min_nbor_dist itself."""
    kw = {} if case == "one_side" else {"type_one_side": False, "exclude_types": [[0, 1]]}
    model = tiny_model(**kw)
    d = model.descriptor
    ranges = input_ranges(d, TINY_MIN_NBOR_DIST)
    pad = -d.davg[..., 0] / d.dstd[..., 0]
    coord, atype, box = random_frame(seed=6, natoms=10)
    nl = build_neighbor_list(coord, atype, box, d.rcut, d.sel)
    env = d.environment(torch.from_numpy(coord[None]), torch.from_numpy(box[None]), torch.from_numpy(nl.nlist[None]),
                        torch.from_numpy(nl.shift[None]), torch.from_numpy(atype[None]))
    s = env.rr[0, :, :, 0]
    for k, span in enumerate(ranges):
        tj, ti = d.net_tj[k], d.net_ti[k]
        rows = torch.ones(len(atype), dtype=torch.bool) if ti < 0 else torch.from_numpy(atype == ti)
        block = s[rows, d.sections[tj]:d.sections[tj + 1]]
        assert span.lo - 1e-12 <= float(block.min()) and float(block.max()) <= span.hi + 1e-12
        centres = slice(None) if ti < 0 else slice(ti, ti + 1)
        excluded = ti >= 0 and ti != tj  # the pair (0, 1) either way round
        assert span.lo == pytest.approx(min(float(pad[centres, d.sections[tj]].min()), 0.0 if excluded else 1e9))
        r = torch.tensor(TINY_MIN_NBOR_DIST, dtype=torch.float64)
        top = (switching_function(r, d.rcut_smth, d.rcut) / r - d.davg[centres, d.sections[tj], 0]) \
            / d.dstd[centres, d.sections[tj], 0]
        assert span.hi == pytest.approx(max(float(top.max()), 0.0 if excluded else -1e9))
        assert span.ext > span.hi


# ------------------------------------------------------------------------------------------------------------
# the op library's evaluation


@pytest.fixture(scope="module")
def table_and_inputs():
    _kernels_or_skip()
    table = tabulation.tabulate(_net(seed=5), tabulation.NetRange(-1.0, 4.0, 12.0), 0.05)
    gen = torch.Generator().manual_seed(6)
    knots = table.lo + table.step * torch.arange(0, table.n_fine + 1, 7, dtype=torch.float64)
    s = torch.cat([-3.0 + 20.0 * torch.rand(3000, dtype=torch.float64, generator=gen), knots,
                   torch.tensor([table.hi, table.ext, table.lo - 0.5, table.ext + 2.0], dtype=torch.float64)])
    return table, s.reshape(-1, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_equals_pytorch_evaluation(table_and_inputs, dtype):
    """The op and the PyTorch evaluation agree everywhere, outside the table too (both extrapolate the end
    pieces), in float64 and float32."""
    table, s = table_and_inputs
    table = copy.deepcopy(table).to(dtype)
    s = s.to(dtype)
    with torch.no_grad():
        want = table.value_and_tangent(s)
    got = table.kernel_value_and_tangent(s)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(table(s), want[0], rtol=0, atol=tol["atol"])
    assert torch.equal(table.embed(s, False)[0], table(s)) and table.embed(s, False)[1] is None


def test_opcheck_and_no_gradient(table_and_inputs):
    table, s = table_and_inputs
    args = (s, table.table, table.lo, table.step, table.n_fine, table.step_coarse)
    torch.library.opcheck(torch.ops.dpfit.tabulated_value_and_tangent.default, args)
    g, t = torch.ops.dpfit.tabulated_value_and_tangent(s.clone().requires_grad_(True), *args[1:])
    with pytest.raises(RuntimeError, match="derivative for dpfit::tabulated_value_and_tangent is not implemented"):
        (g.sum() + t.sum()).backward()


def test_op_says_what_it_needs(table_and_inputs):
    table, s = table_and_inputs
    with pytest.raises(RuntimeError, match="s and table of one dtype"):
        torch.ops.dpfit.tabulated_value_and_tangent(s.float(), table.table, table.lo, table.step, table.n_fine,
                                                    table.step_coarse)
    with pytest.raises(RuntimeError, match="0 < n_fine < pieces"):
        torch.ops.dpfit.tabulated_value_and_tangent(s, table.table, table.lo, table.step, 0, table.step_coarse)


# ------------------------------------------------------------------------------------------------------------
# the compressed model


TINY_CASES = {"one_side": {}, "pairs": {"type_one_side": False, "exclude_types": [[0, 1]], "neuron": [4, 4, 8],
                                        "resnet_dt": True}}


@pytest.mark.parametrize("backend", ["compact", "static", "kernels"])
@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_compressed_tiny_model_equals_exact(tiny_model, random_frame, run_model, backend, case):
    if backend == "kernels":
        _kernels_or_skip()
    exact = tiny_model(**TINY_CASES[case]).use_backend(backend)
    compressed = copy.deepcopy(exact)
    compression = compressed.compress(TINY_MIN_NBOR_DIST)
    assert all(isinstance(net, TabulatedEmbedding) for net in compressed.descriptor.embeddings)
    assert compressed.backend == backend
    coord, atype, box = random_frame(seed=3, natoms=8)
    want = run_model(exact, coord, atype, box)
    got = run_model(compressed, coord, atype, box)
    _assert_close_to_bound(got, want, compression.bound(), len(atype),
                           ("energy", "force", "virial", "atom_virial"))


@pytest.mark.parametrize("backend", ["compact", "static", "kernels"])
def test_compressed_water_equals_exact(water, water_compressed, water_fixture, run_model, backend):
    if backend == "kernels":
        _kernels_or_skip()
    compressed, compression = water_compressed
    ref = np.load(water_fixture / "reference_data_3.npz")
    coord, atype, box = ref["coord"][0].reshape(-1, 3), ref["atype"], ref["box"][0].reshape(3, 3)
    want = run_model(water.use_backend(backend), coord, atype, box)
    got = run_model(compressed.use_backend(backend), coord, atype, box)
    _assert_close_to_bound(got, want, compression.bound(), len(atype),
                           ("energy", "force", "virial", "atom_energy"))


def test_model_differences_converge_with_the_step(tiny_model, random_frame, run_model):
    """At coarse steps (errors far above round-off) the forces' difference from the exact model falls with
    the tables' bound, as the fifth power of the step: the tolerance above follows the tables."""
    exact = tiny_model(**TINY_CASES["pairs"]).use_backend("compact")
    coord, atype, box = random_frame(seed=3, natoms=8)
    want = run_model(exact, coord, atype, box)
    diffs = []
    for step in (0.4, 0.2):
        model = copy.deepcopy(exact)
        compression = model.compress(TINY_MIN_NBOR_DIST, step=step)
        got = run_model(model, coord, atype, box)
        diffs.append(np.abs(got["force"] - want["force"]).max())
        _assert_close_to_bound(got, want, compression.bound(), len(atype))
    assert diffs[1] > 1e-13 and 12 < diffs[0] / diffs[1] < 100


def test_forces_are_the_gradient_of_the_compressed_energy(tiny_model, random_frame, run_model, fd_forces):
    """The tables are C2, so the compressed model's forces are -dE/dr of its own energy, also with tables so
    coarse that it is a different model (here 1e-5 eV/Å away from the exact one)."""
    exact = tiny_model(**TINY_CASES["pairs"]).use_backend("compact")
    model = copy.deepcopy(exact)
    model.compress(TINY_MIN_NBOR_DIST, step=2.0)
    coord, atype, box = random_frame(seed=4, natoms=6)
    got = run_model(model, coord, atype, box)
    assert np.abs(got["force"] - run_model(exact, coord, atype, box)["force"]).max() > 1e-5
    fd = fd_forces(lambda c: run_model(model, c, atype, box, virial=False)["energy"], coord, 1e-5)
    np.testing.assert_allclose(got["force"], fd, rtol=0, atol=1e-7)


def test_compressed_model_is_inference_only(tiny_model):
    model = tiny_model()
    model.compress(TINY_MIN_NBOR_DIST)
    assert not model.training
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()
    with pytest.raises(ValueError, match="compressed already"):
        model.compress(TINY_MIN_NBOR_DIST)
    with pytest.raises(ValueError, match="min_nbor_dist"):
        copy.deepcopy(tiny_model()).compress(model.rcut + 1.0)


# ------------------------------------------------------------------------------------------------------------
# frozen files and freeze.py

LOADER = r"""
import sys, json
sys.modules["dpfit"] = None  # any import of dpfit now fails
import numpy as np, torch
if len(sys.argv) > 3:
    torch.ops.load_library(sys.argv[3])
m = torch.jit.load(sys.argv[1])
r = np.load(sys.argv[2])
out = {}
for f in range(len(r["coord"])):
    res = m(torch.tensor(r["coord"][f]).reshape(-1, 3), torch.tensor(r["atype"]), torch.tensor(r["box"][f]))
    for k in ("energy", "force", "virial", "atom_energy"):
        out.setdefault(k, []).append(res[k].detach().numpy().tolist())
print(json.dumps(out))
"""


@pytest.mark.parametrize("kernels", [False, True], ids=["plain", "kernels"])
def test_frozen_compressed_water_without_dpfit(tmp_path, water_fixture, kernels):
    """format=dpfit compressed, loaded where dpfit cannot be imported: the plain file needs no op library
    (it calls no dpfit op), the kernels file runs on it; both equal DeePMD-kit's reference (the exact
    model, to 1e-10) within the tolerance of the printed bound."""
    library = _kernels_or_skip() if kernels else None
    out, model = freeze_checkpoint(water_fixture / "model.ckpt.pt", tmp_path / "model.pth", kernels=kernels,
                                   compress=CompressOptions(frames=1))
    assert isinstance(model.descriptor.embeddings[0], TabulatedEmbedding)
    reference = water_fixture / "reference_data_3.npz"
    proc = subprocess.run([sys.executable, "-c", LOADER, str(out), str(reference), *([library] if library else [])],
                          capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr
    got, ref = json.loads(proc.stdout.splitlines()[-1]), np.load(reference)
    natoms = len(ref["atype"])
    for f in range(len(ref["coord"])):
        frame = {k: np.array(got[k][f]) for k in got}
        _assert_close_to_bound(frame, {k: ref[k][f] for k in got}, model.compression.bound(), natoms)


def test_lammps_file_lower_path_equals_forward(tmp_path, tiny_model, random_frame, run_model):
    """format=lammps compressed (both paths in the file): forward_lower on LAMMPS's unsorted list with ghosts
    equals forward, which equals the exact model within the bound."""
    from test_deepmd_export import _check_lower_equals_forward

    from dpfit.io.deepmd_export import deepmd_model_params
    from dpfit.io.deepmd_pth import freeze_for_deepmd

    exact = tiny_model(**TINY_CASES["pairs"])
    params = deepmd_model_params(exact)
    model = copy.deepcopy(exact)
    compression = model.compress(TINY_MIN_NBOR_DIST)
    pth = torch.jit.load(str(freeze_for_deepmd(model, tmp_path / "t.pth", params=params)))
    assert json.loads(pth.get_model_def_script())["descriptor"]["resnet_dt"] is True
    coord, atype, box = random_frame(seed=2, natoms=8)
    full = _check_lower_equals_forward(pth, coord, atype, box, skin=1.0, seed=1)
    want = run_model(exact, coord, atype, box)
    _assert_close_to_bound({k: v.numpy() for k, v in full.items()}, want, compression.bound(), len(atype))


def _printed_bound(stdout: str) -> tuple[float, float]:
    m = re.search(r"max \|dg\| (\S+) .*max \|d\(dg/ds\)\| (\S+) ", stdout)
    assert m, stdout
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("kernels", ["off", "on"])
def test_freeze_cli_compress(tmp_path, water_fixture, kernels):
    """freeze.py format=lammps compress=true: prints range, steps, size, the bound and the comparison with the
    exact model; the file (forward and forward_lower) equals the reference within the printed bound."""
    library = _kernels_or_skip() if kernels == "on" else None
    out = tmp_path / "model.pth"
    proc = subprocess.run([sys.executable, str(REPO / "freeze.py"), f"ckpt_path={water_fixture / 'model.ckpt.pt'}",
                           f"output={out}", "format=lammps", "compress=true", f"kernels={kernels}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"min_nbor_dist = {WATER_MIN_NBOR_DIST:.4g} Å) with step 0.01" in text and "MiB" in text, text
    assert re.search(r"max \|dF\| \S+ eV/Å", text) and f"{'kernels' if library else 'compact'} backend" in text
    value, tangent = _printed_bound(text)
    assert 0 < value < 1e-12 and 0 < tangent < 1e-10
    from test_deepmd_export import _check_lower_equals_forward

    pth = torch.jit.load(str(out))  # (this process has the library loaded where kernels=on)
    ref = np.load(water_fixture / "reference_data_3.npz")
    full = _check_lower_equals_forward(pth, ref["coord"][0].astype(np.float64), ref["atype"],
                                       ref["box"][0].astype(np.float64).reshape(3, 3), skin=1.0)
    _assert_close_to_bound({k: v.numpy() for k, v in full.items()}, {k: ref[k][0] for k in ref.files},
                           (value, tangent), len(ref["atype"]), ("energy", "force", "virial", "atom_energy"))


def test_freeze_refusals(tmp_path, water_fixture):
    """format=deepmd refuses compress; a checkpoint without min_nbor_dist needs it on the command line."""
    ckpt = water_fixture / "model.ckpt.pt"
    with pytest.raises(ConfigError, match="DeePMD-kit compresses itself"):
        freeze_checkpoint(ckpt, tmp_path / "x.pt", fmt="deepmd", compress=CompressOptions())
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["model"].pop("model.Default.min_nbor_dist")
    bare = tmp_path / "no_dist.pt"
    torch.save(state, bare)
    with pytest.raises(ConfigError, match=r"holds no min_nbor_dist.*min_nbor_dist=<Å>"):
        freeze_checkpoint(bare, tmp_path / "x.pth", compress=CompressOptions(frames=0))
    out, model = freeze_checkpoint(bare, tmp_path / "x.pth", min_nbor_dist=0.9, compress=CompressOptions(frames=0))
    assert model.compression.min_nbor_dist == 0.9 and out.is_file()
    assert "not compared" in model.compression.summary()[-1]


def test_random_check_frames_respect_min_nbor_dist():
    frames = random_frames(2, [46, 92], 6.0, 0.9, 2, seed=1)
    for coord, atype, box in frames:
        side = float(box[0, 0])
        d = coord[:, None] - coord[None]
        d = d - side * torch.round(d / side)
        dist = d.norm(dim=-1) + torch.eye(len(coord), dtype=torch.float64) * 1e9
        assert float(dist.min()) >= 0.9 and float(dist.min()) < 1.35
        assert int((atype == 1).sum()) == 2 * int((atype == 0).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_frozen_compressed_file_on_cuda(tmp_path, tiny_model, random_frame):
    """A frozen compressed file moved to a GPU takes its static path there (the tables in plain PyTorch):
    the same numbers as its CPU path."""
    from dpfit.io.export import freeze

    model = tiny_model(**TINY_CASES["pairs"])
    model.compress(TINY_MIN_NBOR_DIST)
    file = torch.jit.load(str(freeze(model, tmp_path / "m.pth")))
    coord, atype, box = (torch.from_numpy(x) for x in random_frame(seed=2, natoms=8))
    want = file(coord, atype, box)
    file = file.to("cuda")
    got = file(coord.cuda(), atype.cuda(), box.cuda())
    for key in ("energy", "force", "virial"):
        torch.testing.assert_close(got[key].cpu(), want[key], rtol=1e-10, atol=1e-10)


def test_frozen_compressed_gpu_path_equals_cpu_path(tmp_path, tiny_model, random_frame):
    """The frozen file's GPU path (static layout, the tables in plain PyTorch, scripted), run on the CPU,
    equals its CPU path (compact layout)."""
    from dpfit.io.export import freeze, torch_neighbor_list

    model = tiny_model(**TINY_CASES["pairs"])
    model.compress(TINY_MIN_NBOR_DIST)
    paths = torch.jit.load(str(freeze(model, tmp_path / "m.pth"))).model
    coord, atype, box = (torch.from_numpy(x) for x in random_frame(seed=2, natoms=8))
    wrapped, nlist, shift = torch_neighbor_list(coord, atype, box, model.rcut, model.sel)
    args = (wrapped[None], atype[None], nlist[None], box[None], shift[None], None, None, True, True, True, False)
    want = paths(*args[:7], True)  # (coordinates on the CPU: the CPU path)
    got = paths.gpu_model(*args)
    for key in ("energy", "force", "virial", "atom_virial"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)
